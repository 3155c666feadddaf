//! A team of compute threads that runs one piece of work together in lock step, the way an
//! OpenMP parallel region does: every member runs the same code, takes its own share of each
//! loop (`Member::part`) and meets the others at a spinning barrier (`Member::sync`) wherever
//! the next phase reads what the others wrote.
//!
//! Why not one rayon call per kernel: a gradient evaluation of the MLP at batch 16 is ~1 ms of
//! some twenty GEMMs and passes of 10–100 µs each. A rayon call per kernel sends its second half
//! to a worker that has usually gone to sleep since the last call, and waking it (a futex, on a
//! virtual machine an inter-processor interrupt) costs about as much as the half it was sent to
//! do, so the kernels ran on one thread below ~16 M multiply-adds. A team wakes its members once
//! per evaluation and keeps them spinning between phases (a barrier costs well under a µs), which
//! is what PyTorch's OpenMP threads do too.
//!
//! Members are rayon workers (plus the calling thread as member 0), so a team never adds
//! threads beyond the `threads` decision. A team is only formed from outside rayon's pool: a
//! member 0 that were itself a rayon worker could wait at a barrier for a member queued behind
//! it. A panicking member poisons the barrier, so the others panic too instead of waiting
//! forever (release builds abort on the first panic anyway).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Spins at a barrier before yielding the core to the scheduler between checks (a member that
/// is not running, when the machine is oversubscribed, then costs a time slice, not a hang).
const SPINS_BEFORE_YIELD: u32 = 1 << 14;

/// The size of a team for `work` (e.g. multiply-adds) of one evaluation on this process's
/// compute threads: one member (no team) below `min_work_per_member` per member, or from inside
/// rayon's pool.
pub fn size_for(work: usize, min_work_per_member: usize) -> usize {
    #[cfg(test)]
    if let Some(size) = FORCED_SIZE.get() {
        return size;
    }
    if rayon::current_thread_index().is_some() {
        return 1;
    }
    rayon::current_num_threads().min(work / min_work_per_member.max(1)).max(1)
}

#[cfg(test)]
thread_local! {
    /// `size_for`'s answer on this thread, for tests that compare team sizes.
    pub(crate) static FORCED_SIZE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` on `size` members at once (`f(&member)` on each) and returns when all have
/// finished. `size` is at most rayon's thread count (the caller is member 0, the others run on
/// workers; one team runs at a time per process, later ones wait). With `size` 1, `f` runs on the calling thread alone and `sync` costs nothing.
pub fn run(size: usize, f: impl Fn(&Member) + Sync) {
    // Members 1.. each need a worker of rayon's pool.
    let size = size.min(rayon::current_num_threads()).max(1);
    let barrier = Barrier {
        size,
        arrived: AtomicUsize::new(0),
        generation: AtomicUsize::new(0),
        poisoned: AtomicBool::new(false),
    };
    let member = |id: usize| {
        let m = Member { id, size: barrier.size, barrier: &barrier };
        let _poison = PoisonOnPanic(&barrier);
        f(&m);
    };
    if barrier.size == 1 {
        return member(0);
    }
    // One team at a time per process: two teams sharing the pool could each hold a worker
    // spinning for a member queued behind the other's.
    let _one_team = TEAMS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    rayon::in_place_scope(|s| {
        for id in 1..barrier.size {
            let member = &member;
            s.spawn(move |_| member(id));
        }
        member(0);
    });
}

static TEAMS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// One thread of a team: its number (0 is the caller of `run`) and the team's size.
pub struct Member<'a> {
    pub id: usize,
    pub size: usize,
    barrier: &'a Barrier,
}

impl Member<'_> {
    /// Waits until every member has reached this call: what each member wrote before it is
    /// visible to all after it.
    pub fn sync(&self) {
        if self.size > 1 {
            self.barrier.wait();
        }
    }

    /// Runs `f(i)` for tasks i in 0..tasks claimed one at a time from `next` (shared by the
    /// team and starting at 0): every task runs exactly once, on whichever member claims it.
    pub fn claim(&self, next: &AtomicUsize, tasks: usize, mut f: impl FnMut(usize)) {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= tasks {
                return;
            }
            f(i);
        }
    }

    /// This member's share of 0..len: contiguous blocks in member order, each a multiple of
    /// `align` long except the last (possibly empty).
    pub fn part(&self, len: usize, align: usize) -> Range<usize> {
        part(len, align, self.id, self.size)
    }
}

/// Block `id` of `parts` over 0..len (see `Member::part`).
pub fn part(len: usize, align: usize, id: usize, parts: usize) -> Range<usize> {
    let chunk = len.div_ceil(parts.max(1)).next_multiple_of(align.max(1));
    (id * chunk).min(len)..((id + 1) * chunk).min(len)
}

/// A centralised barrier: the last member to arrive resets the count and opens the next
/// generation; the others spin on the generation number.
struct Barrier {
    size: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    poisoned: AtomicBool,
}

impl Barrier {
    fn wait(&self) {
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.size {
            // Every other member has arrived and is spinning on `generation`: the reset is
            // published by the Release below before any of them can arrive again.
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.store(generation.wrapping_add(1), Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == generation {
            if self.poisoned.load(Ordering::Relaxed) {
                panic!("another member of this compute team panicked");
            }
            if spins < SPINS_BEFORE_YIELD {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// Marks the barrier poisoned when the member holding it unwinds.
struct PoisonOnPanic<'a>(&'a Barrier);

impl Drop for PoisonOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.poisoned.store(true, Ordering::Relaxed);
        }
    }
}

/// A buffer that the members of a team write in disjoint parts and read whole after a `sync`.
/// Copying it hands out the same buffer: the borrow checker cannot see the disjointness, the
/// caller of each `unsafe` method promises it.
pub struct Shared<'a, T> {
    ptr: *mut T,
    len: usize,
    _buf: std::marker::PhantomData<&'a mut [T]>,
}

impl<T> Clone for Shared<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Shared<'_, T> {}
// SAFETY: access goes through the unsafe methods below, whose callers keep writes disjoint and
// separate them from reads by a barrier.
unsafe impl<T: Send> Send for Shared<'_, T> {}
unsafe impl<T: Send> Sync for Shared<'_, T> {}

impl<'a, T> Shared<'a, T> {
    pub fn new(buf: &'a mut [T]) -> Self {
        Self { ptr: buf.as_mut_ptr(), len: buf.len(), _buf: std::marker::PhantomData }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole buffer, read-only.
    ///
    /// # Safety
    /// No member writes any part of it while the returned slice is alive.
    pub unsafe fn get(&self) -> &'a [T] {
        std::slice::from_raw_parts(self.ptr, self.len)
    }

    /// The whole buffer, writable.
    ///
    /// # Safety
    /// While the returned slice is alive, no other member reads or writes the elements this
    /// member writes through it, and this member writes only elements no one else touches.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get_mut(&self) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.ptr, self.len)
    }

    /// The first `len` values (at most all of them).
    pub fn prefix(&self, len: usize) -> Self {
        Self { len: len.min(self.len), ..*self }
    }

    /// The values in `r`, clamped to the buffer.
    pub fn range(&self, r: Range<usize>) -> Self {
        let start = r.start.min(self.len);
        // SAFETY: start ≤ len, so the pointer stays inside (or one past) the buffer.
        Self { ptr: unsafe { self.ptr.add(start) }, len: r.end.clamp(start, self.len) - start, _buf: self._buf }
    }

    /// The pointer to element 0 (for kernels that take raw pointers).
    pub fn ptr(&self) -> *mut T {
        self.ptr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_range_once() {
        for (len, align, parts) in [(500, 16, 2), (16, 16, 2), (10, 16, 2), (0, 4, 3), (7, 1, 3), (128, 16, 4)] {
            let mut seen = vec![0u8; len];
            for id in 0..parts {
                let r = part(len, align, id, parts);
                assert!(r.start <= r.end && r.end <= len);
                if r.end < len {
                    assert_eq!(r.len() % align, 0, "{len} {align} {parts} {id}: {r:?}");
                }
                for i in r {
                    seen[i] += 1;
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "{len} {align} {parts}: {seen:?}");
        }
    }

    /// Phases separated by `sync` see every member's writes of the phase before: each round
    /// adds to the member's own block, then every member sums the whole buffer.
    #[test]
    fn members_see_each_others_writes_after_sync() {
        let mut buf = vec![0u64; 300];
        let mut sums = vec![0u64; 3];
        let (shared, totals) = (Shared::new(&mut buf), Shared::new(&mut sums));
        let size = 3.min(rayon::current_num_threads());
        run(size, |m| {
            for round in 0..50u64 {
                // SAFETY: each member writes its own block, then reads all after the sync, and
                // writes its own slot of `totals`.
                unsafe {
                    for v in &mut shared.get_mut()[m.part(300, 1)] {
                        *v += round + m.id as u64;
                    }
                }
                m.sync();
                let total: u64 = unsafe { shared.get() }.iter().sum();
                m.sync();
                unsafe { totals.get_mut()[m.id] = total };
            }
        });
        let want: u64 =
            (0..size).map(|id| part(300, 1, id, size).len() as u64 * (0..50).map(|q| q + id as u64).sum::<u64>()).sum();
        assert_eq!(&sums[..size], &vec![want; size][..]);
    }

    #[test]
    fn one_member_runs_on_the_caller() {
        let caller = std::thread::current().id();
        let mut ran = false;
        let flag = std::sync::Mutex::new(&mut ran);
        run(1, |m| {
            assert_eq!((m.id, m.size), (0, 1));
            assert_eq!(std::thread::current().id(), caller);
            m.sync();
            **flag.lock().unwrap() = true;
        });
        assert!(ran);
    }

    #[test]
    fn a_panicking_member_does_not_hang_the_others() {
        let r = std::panic::catch_unwind(|| {
            run(2, |m| {
                if m.id == 1 {
                    panic!("member 1 fails");
                }
                m.sync();
            })
        });
        assert!(r.is_err());
    }
}
