//! The prefetching decode pool of the image-folder format: `data.workers` threads that decode
//! and augment the samples of the next training steps — this rank's slice of each global batch —
//! while the model computes, into a cache keyed by (step, sample index) and bounded by
//! `data.prefetch_mib`.
//!
//! Why this is exact: a sample's bytes are a pure function of (seed, step, index) (decode, then
//! `transform::rrc_flip` drawn from those three), so it does not matter which thread made them,
//! or whether they came from the cache or were decoded when the batch was gathered: the
//! training trajectory is bit-identical for any number of workers, with or without prefetching
//! (tested in `imagefolder::tests`, and through the binary in `launch/tests/imagefolder.rs`).
//!
//! The plan (step → this rank's indices, the sampler's batch cut as `ShardedField` cuts it) is
//! asked for one step at a time, by whichever worker reaches that step. Workers claim samples in
//! plan order, at most `ahead` steps beyond the step being gathered (`ahead` = what fits in the
//! budget, at least 1). The gathering thread ([`Shared::fetch`]) takes what is ready, decodes
//! itself what no worker has claimed yet (so the first step after a start or a resume does not
//! wait for a queue) and waits for what is in flight; then it frees the step and moves the
//! window on. A decode error is kept as the sample's result and returned by `fetch`, naming the
//! file, so the job stops through the field's batch error, never a panic in a worker.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Step → the indices this rank gathers at that step.
pub type Plan = Box<dyn FnMut(u64) -> Vec<usize> + Send>;
/// (step, sample index, scratch) → the sample's augmented bytes, or an error naming its file.
pub type Decode = Arc<dyn Fn(u64, usize, &mut Vec<u8>) -> Result<Vec<u8>, String> + Send + Sync>;

enum Slot {
    InFlight,
    Done(Result<Vec<u8>, String>),
}

struct State {
    plan: Plan,
    /// Steps `end..` are never planned (the run's last step is `end − 1`).
    end: u64,
    /// The step workers are claiming from, its batch once planned, and the next position.
    cursor: u64,
    batch: Option<Vec<usize>>,
    pos: usize,
    /// The step the trainer gathers next; workers stay within `next..next + ahead`.
    next: u64,
    ahead: u64,
    slots: HashMap<(u64, usize), Slot>,
    shutdown: bool,
    /// Samples `fetch` found decoded (or in flight) against those it decoded itself.
    hits: u64,
    misses: u64,
}

/// What the workers and the gathering thread share.
pub struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    decode: Decode,
}

/// The running pool; dropping it stops and joins the workers.
pub struct Prefetcher {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Prefetcher {
    /// Start `workers` threads prefetching steps `start..end` of `plan`, at most `ahead` steps
    /// beyond the one being gathered.
    pub fn start(plan: Plan, decode: Decode, start: u64, end: u64, ahead: u64, workers: usize) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                plan,
                end,
                cursor: start,
                batch: None,
                pos: 0,
                next: start,
                ahead: ahead.max(1),
                slots: HashMap::new(),
                shutdown: false,
                hits: 0,
                misses: 0,
            }),
            wake: Condvar::new(),
            decode,
        });
        let threads = (0..workers.max(1))
            .filter_map(|k| {
                let s = shared.clone();
                // A thread that cannot be spawned only means less prefetching: `fetch` decodes
                // what no worker claimed.
                std::thread::Builder::new().name(format!("kutta-decode-{k}")).spawn(move || s.work()).ok()
            })
            .collect();
        Prefetcher { shared, threads }
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// (samples `fetch` took from the workers, samples it decoded itself).
    pub fn hits_and_misses(&self) -> (u64, u64) {
        let st = self.shared.lock();
        (st.hits, st.misses)
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code holding the lock can panic on user input; a poisoned lock's data is still
        // consistent (every update is a single insert or counter change).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.wake.wait(g).unwrap_or_else(|e| e.into_inner())
    }

    /// A worker: claim the next planned sample inside the window, decode it, store it.
    fn work(&self) {
        let mut scratch = Vec::new();
        let mut g = self.lock();
        loop {
            let st = &mut *g;
            if st.shutdown {
                return;
            }
            if st.cursor < st.next {
                (st.cursor, st.batch, st.pos) = (st.next, None, 0);
            }
            if st.cursor >= st.end || st.cursor >= st.next.saturating_add(st.ahead) {
                g = self.wait(g);
                continue;
            }
            let step = st.cursor;
            let batch = st.batch.get_or_insert_with(|| (st.plan)(step));
            let Some(&index) = batch.get(st.pos) else {
                (st.cursor, st.batch, st.pos) = (step + 1, None, 0);
                continue;
            };
            st.pos += 1;
            if st.slots.contains_key(&(step, index)) {
                continue;
            }
            st.slots.insert((step, index), Slot::InFlight);
            drop(g);
            let result = (self.decode)(step, index, &mut scratch);
            g = self.lock();
            if step >= g.next {
                g.slots.insert((step, index), Slot::Done(result));
            } else {
                g.slots.remove(&(step, index));
            }
            self.wake.notify_all();
        }
    }

    /// The bytes of `indices` at `step`, each handed to `put(position, bytes)`: from the cache,
    /// decoded here, or waited for. Then the step is freed and the window moves past it.
    pub fn fetch(&self, step: u64, indices: &[usize], put: &mut dyn FnMut(usize, &[u8])) -> Result<(), String> {
        let mut scratch = Vec::new();
        let mut g = self.lock();
        if g.next != step {
            g.next = step;
            g.slots.retain(|k, _| k.0 >= step);
            self.wake.notify_all();
        }
        let mut pending = Vec::new();
        for (pos, &index) in indices.iter().enumerate() {
            let key = (step, index);
            match g.slots.get(&key) {
                Some(Slot::Done(r)) => {
                    put(pos, r.as_deref()?);
                    g.hits += 1;
                }
                Some(Slot::InFlight) => pending.push(pos),
                None => {
                    g.slots.insert(key, Slot::InFlight);
                    drop(g);
                    let r = (self.decode)(step, index, &mut scratch);
                    g = self.lock();
                    g.misses += 1;
                    self.wake.notify_all();
                    let slot = g.slots.entry(key).insert_entry(Slot::Done(r)).into_mut();
                    let Slot::Done(r) = slot else { unreachable!("just stored") };
                    put(pos, r.as_deref()?);
                }
            }
        }
        for pos in pending {
            let key = (step, indices[pos]);
            loop {
                match g.slots.get(&key) {
                    Some(Slot::Done(r)) => {
                        put(pos, r.as_deref()?);
                        g.hits += 1;
                        break;
                    }
                    Some(Slot::InFlight) => g = self.wait(g),
                    None => {
                        // Only another fetch moving the window could drop it: decode here.
                        drop(g);
                        let r = (self.decode)(step, indices[pos], &mut scratch);
                        put(pos, r.as_deref()?);
                        g = self.lock();
                        g.misses += 1;
                        break;
                    }
                }
            }
        }
        g.next = step + 1;
        g.slots.retain(|k, _| k.0 > step);
        self.wake.notify_all();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_fn() -> Decode {
        Arc::new(|step, index, _: &mut Vec<u8>| {
            if index == 999 {
                return Err(format!("sample {index}: bad file"));
            }
            Ok(vec![(step as u8).wrapping_mul(31) ^ index as u8; 4])
        })
    }

    #[test]
    fn fetch_matches_direct_decode_with_any_worker_count() {
        let plan = |step: u64| -> Vec<usize> { (0..6).map(|k| ((step as usize) * 5 + k * 3) % 17).collect() };
        for workers in [1, 2, 4] {
            let p = Prefetcher::start(Box::new(plan), decode_fn(), 3, 40, 2, workers);
            for step in 3..40 {
                if step % 5 == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                let idx = plan(step);
                let mut got = vec![Vec::new(); idx.len()];
                p.shared().fetch(step, &idx, &mut |pos, b| got[pos] = b.to_vec()).unwrap();
                for (pos, &i) in idx.iter().enumerate() {
                    assert_eq!(got[pos], (decode_fn())(step, i, &mut Vec::new()).unwrap());
                }
            }
            let (hits, misses) = p.hits_and_misses();
            assert_eq!(hits + misses, 37 * 6, "{workers} workers");
        }
    }

    #[test]
    fn unplanned_indices_and_errors() {
        let p = Prefetcher::start(Box::new(|_| vec![1, 2, 2, 3]), decode_fn(), 0, 5, 1, 2);
        let mut got = Vec::new();
        p.shared().fetch(0, &[7, 2, 2], &mut |_, b| got.push(b.to_vec())).unwrap();
        assert_eq!(got.len(), 3);
        let err = p.shared().fetch(1, &[1, 999], &mut |_, _| {}).unwrap_err();
        assert!(err.contains("999"), "{err}");
        drop(p);
    }
}
