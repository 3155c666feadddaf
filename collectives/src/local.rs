//! `LocalGroup`: N ranks as N threads of one process, for tests of the multi-rank logic without
//! MPI (as burn tests collectives with CPU threads standing in for devices). Every collective is
//! a rendezvous of all N threads on a shared slot table; sums are formed in rank order on every
//! rank, so all ranks get bit-identical results, as the trait requires.

use crate::{CommError, Communicator, Result};
use std::sync::{Arc, Barrier, Mutex};

struct Shared {
    barrier: Barrier,
    /// One deposit per rank for the collective in progress.
    slots: Mutex<Vec<Vec<f32>>>,
    scalars: Mutex<Vec<f64>>,
}

/// One rank's handle. Create a whole group with `LocalGroup::new(n)` and move each handle to
/// its own thread.
pub struct LocalGroup {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

impl LocalGroup {
    pub fn new(size: usize) -> Vec<LocalGroup> {
        assert!(size > 0, "a group needs at least one rank");
        let shared = Arc::new(Shared {
            barrier: Barrier::new(size),
            slots: Mutex::new(vec![Vec::new(); size]),
            scalars: Mutex::new(vec![0.0; size]),
        });
        (0..size).map(|rank| LocalGroup { rank, size, shared: shared.clone() }).collect()
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Vec<f32>>> {
        self.shared.slots.lock().unwrap_or_else(|p| p.into_inner())
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
        self.slots()[self.rank] = buf.to_vec();
        self.shared.barrier.wait();
        {
            let slots = self.slots();
            if slots.iter().any(|s| s.len() != buf.len()) {
                let (lo, hi) = slots.iter().fold((usize::MAX, 0), |(lo, hi), s| (lo.min(s.len()), hi.max(s.len())));
                return Err(CommError::LengthMismatch { rank: self.rank, op: "all-reduce", len: buf.len(), lo, hi });
            }
            buf.copy_from_slice(&slots[0]);
            for s in &slots[1..] {
                buf.iter_mut().zip(s).for_each(|(b, x)| *b += *x);
            }
        }
        self.shared.barrier.wait();
        Ok(())
    }
    fn all_reduce_sum_f64(&self, x: f64) -> Result<f64> {
        self.shared.scalars.lock().unwrap_or_else(|p| p.into_inner())[self.rank] = x;
        self.shared.barrier.wait();
        let s = self.shared.scalars.lock().unwrap_or_else(|p| p.into_inner()).iter().sum();
        self.shared.barrier.wait();
        Ok(s)
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        if root >= self.size {
            return Err(CommError::RootOutsideWorld { rank: self.rank, op: "broadcast", root, world: self.size });
        }
        if self.rank == root {
            self.slots()[root] = buf.to_vec();
        }
        self.shared.barrier.wait();
        if self.rank != root {
            let slots = self.slots();
            let (len, sent) = (buf.len(), slots[root].len());
            if sent != len {
                let (lo, hi) = (len.min(sent), len.max(sent));
                return Err(CommError::LengthMismatch { rank: self.rank, op: "broadcast", len, lo, hi });
            }
            buf.copy_from_slice(&slots[root]);
        }
        self.shared.barrier.wait();
        Ok(())
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
}
