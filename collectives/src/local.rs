//! `LocalGroup`: N ranks as N threads of one process, for tests of the multi-rank logic without
//! MPI (as burn tests collectives with CPU threads standing in for devices). Every collective is
//! a rendezvous of all N threads on a shared slot table; sums are formed in rank order on every
//! rank, so all ranks get bit-identical results, as the trait requires. All-reduce and broadcast
//! run the same agreement as the MPI and NCCL back ends (`watchdog::Shape`), so ranks that pass
//! different lengths or roots all return the same error, as they would under MPI.

use crate::watchdog::{Op, Shape, Words, AGREE_WORDS};
use crate::{Communicator, Result};
use std::sync::{Arc, Barrier, Mutex, MutexGuard};

struct Shared {
    barrier: Barrier,
    /// One deposit per rank for the collective in progress.
    slots: Mutex<Vec<Vec<f32>>>,
    scalars: Mutex<Vec<f64>>,
    /// Each rank's agreement words for the collective in progress.
    words: Mutex<Vec<Words>>,
}

/// One rank's handle. Create a whole group with `LocalGroup::new(n)` and move each handle to
/// its own thread.
pub struct LocalGroup {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

impl LocalGroup {
    /// The handles of a group of `size` ranks, rank order. Panics when `size` is 0.
    pub fn new(size: usize) -> Vec<LocalGroup> {
        assert!(size > 0, "a group needs at least one rank");
        let shared = Arc::new(Shared {
            barrier: Barrier::new(size),
            slots: Mutex::new(vec![Vec::new(); size]),
            scalars: Mutex::new(vec![0.0; size]),
            words: Mutex::new(vec![[0; AGREE_WORDS]; size]),
        });
        (0..size).map(|rank| LocalGroup { rank, size, shared: shared.clone() }).collect()
    }

    fn slots(&self) -> MutexGuard<'_, Vec<Vec<f32>>> {
        self.shared.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn words(&self) -> MutexGuard<'_, Vec<Words>> {
        self.shared.words.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One collective: deposits this rank's agreement words (and, through `deposit`, its data),
    /// waits for every rank, then runs `take` only if the ranks agree, and waits again before
    /// anyone may deposit for the next collective. Every rank passes both barriers, agreeing or
    /// not, so an error never leaves a peer behind.
    fn collective(&self, shape: Shape, deposit: impl FnOnce(), take: impl FnOnce()) -> Result<()> {
        self.words()[self.rank] = shape.words(self.rank, false);
        deposit();
        self.shared.barrier.wait();
        let max = self.words().iter().fold([i64::MIN; AGREE_WORDS], |mut m, w| {
            m.iter_mut().zip(w).for_each(|(m, x)| *m = (*m).max(*x));
            m
        });
        let verdict = shape.verdict(self.rank, self.size, &max);
        if verdict.is_ok() {
            take();
        }
        self.shared.barrier.wait();
        verdict
    }
}

impl Communicator for LocalGroup {
    fn name(&self) -> &'static str {
        "local"
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let data = buf.to_vec();
        self.collective(
            Shape::new(Op::AllReduceSum, buf.len()),
            || self.slots()[self.rank] = data,
            || {
                let slots = self.slots();
                buf.copy_from_slice(&slots[0]);
                for s in &slots[1..] {
                    buf.iter_mut().zip(s).for_each(|(b, x)| *b += *x);
                }
            },
        )
    }
    fn all_reduce_sum_f64(&self, x: f64) -> Result<f64> {
        self.shared.scalars.lock().unwrap_or_else(|p| p.into_inner())[self.rank] = x;
        self.shared.barrier.wait();
        let s = self.shared.scalars.lock().unwrap_or_else(|p| p.into_inner()).iter().sum();
        self.shared.barrier.wait();
        Ok(s)
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let data = (self.rank == root).then(|| buf.to_vec());
        self.collective(
            Shape::new(Op::Broadcast, buf.len()).rooted(root),
            || {
                if let Some(data) = data {
                    self.slots()[root] = data;
                }
            },
            || {
                if self.rank != root {
                    buf.copy_from_slice(&self.slots()[root]);
                }
            },
        )
    }
    fn barrier(&self) -> Result<()> {
        self.shared.barrier.wait();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_reduce_broadcast_and_scalars_agree_on_every_rank() {
        let results: Vec<(Vec<f32>, Vec<f32>, f64)> = std::thread::scope(|s| {
            let handles: Vec<_> = LocalGroup::new(3)
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let r = c.rank() as f32;
                        let mut a = vec![r, 10.0 * r, 0.1];
                        c.all_reduce_sum(&mut a).unwrap();
                        let mut b = if c.rank() == 1 { vec![7.0, 8.0] } else { vec![0.0, 0.0] };
                        c.broadcast(&mut b, 1).unwrap();
                        let x = c.all_reduce_sum_f64(c.rank() as f64 + 0.5).unwrap();
                        c.barrier().unwrap();
                        (a, b, x)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (a, b, x) in &results {
            assert_eq!(a, &vec![3.0, 30.0, 0.1f32 + 0.1 + 0.1]);
            assert_eq!(b, &vec![7.0, 8.0]);
            assert_eq!(*x, 4.5);
        }
    }

    /// The trait's default reduce-scatter and all-gather (through all-reduce) on thread ranks:
    /// block r of the sum lands on rank r; the gathered blocks come back in rank order.
    #[test]
    fn reduce_scatter_and_all_gather() {
        let results: Vec<(Vec<f32>, Vec<f32>, bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = LocalGroup::new(3)
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let r = c.rank() as f32;
                        let send: Vec<f32> = (0..6).map(|i| i as f32 + r).collect();
                        let mut mine = vec![0.0; 2];
                        c.reduce_scatter_sum(&send, &mut mine).unwrap();
                        let mut all = vec![0.0; 6];
                        c.all_gather(&[r, -r], &mut all).unwrap();
                        let mismatch = c.all_gather(&[r], &mut all).is_err();
                        (mine, all, mismatch)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, (mine, all, mismatch)) in results.iter().enumerate() {
            // Σ_r (i + r) = 3i + 3 for i in rank's block [2·rank, 2·rank + 2).
            let want: Vec<f32> = (2 * rank..2 * rank + 2).map(|i| 3.0 * i as f32 + 3.0).collect();
            assert_eq!(mine, &want);
            assert_eq!(all, &vec![0.0, -0.0, 1.0, -1.0, 2.0, -2.0]);
            assert!(mismatch, "a block of 1 into 6 values on 3 ranks must be an error");
        }
    }

    /// Ranks that pass different lengths or roots all get an error (none is left waiting in a
    /// barrier), and the group works afterwards.
    #[test]
    fn disagreements_are_errors_on_every_rank() {
        let results: Vec<(String, String, String, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = LocalGroup::new(3)
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let text = |r: Result<()>| r.err().map(|e| e.to_string()).unwrap_or_default();
                        let mut uneven = vec![1.0f32; if c.rank() == 0 { 3 } else { 4 }];
                        let reduce = text(c.all_reduce_sum(&mut uneven));
                        let bcast = text(c.broadcast(&mut uneven, 1));
                        let root = text(c.broadcast(&mut [0.0; 2], c.rank()));
                        let mut ok = vec![c.rank() as f32; 2];
                        c.broadcast(&mut ok, 2).unwrap();
                        c.all_reduce_sum(&mut ok).unwrap();
                        (reduce, bcast, root, ok)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, (reduce, bcast, root, ok)) in results.iter().enumerate() {
            let len = if rank == 0 { 3 } else { 4 };
            let want =
                format!("rank {rank}: all-reduce of {len} values on this rank, but the ranks passed between 3 and 4");
            assert_eq!(reduce, &want);
            assert!(bcast.contains("the ranks passed between 3 and 4"), "{bcast}");
            assert_eq!(root, &format!("rank {rank}: broadcast: ranks name different roots (0 to 2)"));
            assert_eq!(ok, &vec![6.0, 6.0]);
        }
    }
}
