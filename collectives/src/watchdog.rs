//! What keeps a multi-rank collective from hanging, written once for every back end and
//! independent of features: the *agreement* the ranks reach before data moves, and the *time
//! limit* on one call. `mpi` uses both, `nccl` both (its collectives check the limit in their own
//! poll loop; the thread here guards its init), `local` the agreement.
//!
//! Agreement. Ranks that pass different shapes to one collective (buffer lengths, broadcast
//! roots, chunk lengths) would sit in mismatched calls forever. So before any data moves, each
//! rank describes its call in a few words (`Shape::words`) and the back end reduces them with
//! `MAX` across ranks: one `MPI_MAX` all-reduce (`mpi`), one `ncclMax` all-reduce (`nccl`), a slot
//! table (`local`). Each value v goes in as the pair (v, −v), so the one reduction yields every
//! value's maximum and minimum at once; a rank that cannot take part (its own buffers do not fit,
//! its GPU scratch could not be allocated) puts in its rank + 1. `Shape::verdict` reads the
//! maxima, which are the same on every rank, so either every rank runs the collective or every
//! rank returns the same error (a rank with a problem of its own returns that problem).
//!
//! Time limit. A peer that died or never calls leaves the others waiting inside MPI or NCCL,
//! where no error ever comes back. `Watchdog` is a thread that looks every 100 ms at one atomic
//! word holding the call in flight and its start time; when a call has run longer than the limit
//! it hands the call to the back end's `on_expiry`, which prints what waited and ends the whole
//! job (`MPI_Abort`, or SIGABRT for the launcher to see) with `WATCHDOG_EXIT_CODE`.

// Built and tested in every build; without the `mpi` and `cuda` features only `local` uses it.
#![cfg_attr(not(any(feature = "mpi", feature = "cuda")), allow(dead_code))]

use crate::{CommError, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The exit code of a job ended by a watchdog (the code of coreutils `timeout`).
pub const WATCHDOG_EXIT_CODE: i32 = 124;
/// How often the watchdog thread looks at the call in flight.
const POLL: Duration = Duration::from_millis(100);

/// A collective (or a back end's init), as messages and the watchdog name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    AllReduceSum = 1,
    AllReduceSumF64 = 2,
    Broadcast = 3,
    Barrier = 4,
    ReduceScatterSum = 5,
    AllGather = 6,
    /// A back end joining its world (`ncclCommInitRank`).
    Init = 7,
}

impl Op {
    /// Bits of the watchdog's word that hold the op (codes 1..=7; 0 is "none").
    const BITS: u32 = 3;
    const ALL: [Op; 7] = [
        Op::AllReduceSum,
        Op::AllReduceSumF64,
        Op::Broadcast,
        Op::Barrier,
        Op::ReduceScatterSum,
        Op::AllGather,
        Op::Init,
    ];

    fn from_code(code: u64) -> Option<Op> {
        Op::ALL.into_iter().find(|op| *op as u64 == code)
    }

    /// The `Communicator` method's name, for watchdog messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::AllReduceSum => "all_reduce_sum",
            Op::AllReduceSumF64 => "all_reduce_sum_f64",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
            Op::ReduceScatterSum => "reduce_scatter_sum",
            Op::AllGather => "all_gather",
            Op::Init => "init",
        }
    }

    /// The collective in words, for error messages (`CommError`'s `op`).
    pub(crate) fn what(self) -> &'static str {
        match self {
            Op::AllReduceSum => "all-reduce",
            Op::AllReduceSumF64 => "scalar all-reduce",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
            Op::ReduceScatterSum => "reduce-scatter",
            Op::AllGather => "all-gather",
            Op::Init => "init",
        }
    }
}

/// A time limit of zero is an error (`None` means no limit).
pub(crate) fn check_timeout(rank: usize, timeout: Option<Duration>) -> Result<()> {
    match timeout {
        Some(t) if t.is_zero() => Err(CommError::ZeroTimeout { rank }),
        _ => Ok(()),
    }
}

// ---- agreement ------------------------------------------------------------------------------

/// Words of the agreement reduction: `[len, −len, chunk, −chunk, root, −root, bad, 0]`.
pub(crate) const AGREE_WORDS: usize = 8;
pub(crate) type Words = [i64; AGREE_WORDS];

/// What one rank passes to a collective, as every rank must agree on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    pub op: Op,
    /// Elements (all-reduce, broadcast) or the block length (reduce-scatter, all-gather).
    pub len: usize,
    /// The broadcast root; 0 for the others.
    pub root: usize,
    /// The back end's chunk length (`MpiComm::set_chunk_len`); 0 where it has none.
    pub chunk_len: usize,
}

impl Shape {
    pub(crate) fn new(op: Op, len: usize) -> Shape {
        Shape { op, len, root: 0, chunk_len: 0 }
    }

    pub(crate) fn rooted(self, root: usize) -> Shape {
        Shape { root, ..self }
    }

    /// This rank's words for the `MAX` reduction; `problem`: this rank cannot take part.
    pub(crate) fn words(&self, rank: usize, problem: bool) -> Words {
        let v = |x: usize| i64::try_from(x).unwrap_or(i64::MAX);
        let bad = if problem { v(rank).saturating_add(1) } else { 0 };
        let (len, chunk, root) = (v(self.len), v(self.chunk_len), v(self.root));
        [len, -len, chunk, -chunk, root, -root, bad, 0]
    }

    /// The verdict on `max`, the element-wise maximum over every rank's `words`: the same on
    /// every rank that passed the same `op` (only this rank's own `len` appears in a message).
    pub(crate) fn verdict(&self, rank: usize, world: usize, max: &Words) -> Result<()> {
        let n = |x: i64| usize::try_from(x).unwrap_or(0);
        // (min, max) of the value at word `i`.
        let range = |i: usize| (n(max[i + 1].saturating_neg()), n(max[i]));
        let op = self.op.what();
        if max[6] > 0 {
            return Err(CommError::PeerCannotRun { rank, op, peer: n(max[6] - 1) });
        }
        let (lo, hi) = range(0);
        if lo != hi {
            return Err(CommError::LengthMismatch { rank, op, len: self.len, lo, hi });
        }
        let (lo, hi) = range(2);
        if lo != hi {
            return Err(CommError::ChunkMismatch { rank, op, lo, hi });
        }
        let (lo, hi) = range(4);
        if lo != hi {
            return Err(CommError::RootMismatch { rank, op, lo, hi });
        }
        if self.root >= world {
            return Err(CommError::RootOutsideWorld { rank, op, root: self.root, world });
        }
        Ok(())
    }

    /// The whole agreement: this rank's words through `max_over_ranks` (the back end's `MAX`
    /// reduction across ranks, which every rank must reach), then the verdict. A rank with a
    /// local `problem` still takes part, so its peers learn of it, then returns its problem.
    pub(crate) fn agree(
        &self,
        rank: usize,
        world: usize,
        problem: Option<CommError>,
        max_over_ranks: impl FnOnce(Words) -> Words,
    ) -> Result<()> {
        let max = max_over_ranks(self.words(rank, problem.is_some()));
        match problem {
            Some(e) => Err(e),
            None => self.verdict(rank, world, &max),
        }
    }
}

// ---- time limit -----------------------------------------------------------------------------

/// What the watchdog thread shares with the rank: one word, written at the start and end of
/// every call, so the op and its start time can never be read torn apart.
struct Clock {
    /// 0 when no call is in flight; otherwise `((ms since epoch) + 1) << Op::BITS | op`.
    word: AtomicU64,
    epoch: Instant,
    stop: AtomicBool,
}

impl Clock {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX >> Op::BITS)
    }

    /// The op in flight and how long it has been running, if any.
    fn in_flight(&self) -> Option<(Op, Duration)> {
        let w = self.word.load(Ordering::Acquire);
        let op = Op::from_code(w & ((1 << Op::BITS) - 1))?;
        let started = (w >> Op::BITS).saturating_sub(1);
        Some((op, Duration::from_millis(self.now_ms().saturating_sub(started))))
    }
}

/// Marks a call as in flight for as long as it lives (`Watchdog::enter`).
pub(crate) struct InFlight<'a>(&'a Clock);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.word.store(0, Ordering::Release);
    }
}

/// A thread that watches one call at a time (`enter`) and calls `on_expiry` once when a call
/// has been in flight longer than the limit. Dropping it stops and joins the thread.
pub(crate) struct Watchdog {
    clock: Arc<Clock>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts the thread, named `thread`. `on_expiry(op, waited)` runs on it; the back ends'
    /// print what waited and end the job (it may also return, and the watchdog then stops).
    pub(crate) fn spawn(
        thread: &'static str,
        rank: usize,
        timeout: Duration,
        on_expiry: impl FnOnce(Op, Duration) + Send + 'static,
    ) -> Result<Watchdog> {
        let clock = Arc::new(Clock { word: AtomicU64::new(0), epoch: Instant::now(), stop: AtomicBool::new(false) });
        let watched = clock.clone();
        let handle = std::thread::Builder::new()
            .name(thread.into())
            .spawn(move || watch(&watched, timeout, on_expiry))
            .map_err(|source| CommError::Thread { rank, thread, source })?;
        Ok(Watchdog { clock, thread: Some(handle) })
    }

    /// Starts the clock on `op`; it stops when the returned guard drops.
    pub(crate) fn enter(&self, op: Op) -> InFlight<'_> {
        let word = ((self.clock.now_ms() + 1) << Op::BITS) | op as u64;
        self.clock.word.store(word, Ordering::Release);
        InFlight(&self.clock)
    }
}

/// The watchdog thread's loop.
fn watch(clock: &Clock, timeout: Duration, on_expiry: impl FnOnce(Op, Duration)) {
    while !clock.stop.load(Ordering::Acquire) {
        std::thread::park_timeout(POLL);
        match clock.in_flight() {
            Some((op, waited)) if waited > timeout => return on_expiry(op, waited),
            _ => {}
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(handle) = self.thread.take() {
            self.clock.stop.store(true, Ordering::Release);
            handle.thread().unpark();
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// The element-wise max over the ranks' words, as the back ends' reductions form it.
    fn max_of(words: &[Words]) -> Words {
        let mut max = [i64::MIN; AGREE_WORDS];
        for w in words {
            max.iter_mut().zip(w).for_each(|(m, x)| *m = (*m).max(*x));
        }
        max
    }

    /// Every rank's verdict when rank r passes `shapes[r]` (and has a problem if `problems[r]`).
    fn verdicts(shapes: &[Shape], problems: &[bool]) -> Vec<Result<()>> {
        let words: Vec<Words> = shapes.iter().enumerate().map(|(r, s)| s.words(r, problems[r])).collect();
        let max = max_of(&words);
        let world = shapes.len();
        (0..world)
            .map(|r| {
                let problem = problems[r].then_some(CommError::BlockMismatch { rank: r, world, block: 1, whole: 0 });
                shapes[r].agree(r, world, problem, |mine| {
                    assert_eq!(mine, words[r]);
                    max
                })
            })
            .collect()
    }

    #[test]
    fn same_shape_on_every_rank_agrees() {
        let s = Shape { chunk_len: 7, ..Shape::new(Op::Broadcast, 1000).rooted(2) };
        assert!(verdicts(&[s; 3], &[false; 3]).iter().all(|v| v.is_ok()));
        let empty = Shape::new(Op::AllReduceSum, 0);
        assert!(verdicts(&[empty; 2], &[false; 2]).iter().all(|v| v.is_ok()));
    }

    #[test]
    fn each_disagreement_is_an_error_on_every_rank() {
        let s = Shape::new(Op::AllReduceSum, 4);
        let texts =
            |v: Vec<Result<()>>| v.into_iter().map(|r| r.expect_err("must fail").to_string()).collect::<Vec<_>>();

        let lens = texts(verdicts(&[s, Shape { len: 3, ..s }, Shape { len: 9, ..s }], &[false; 3]));
        assert_eq!(lens[1], "rank 1: all-reduce of 3 values on this rank, but the ranks passed between 3 and 9");
        assert!(lens[0].ends_with("all-reduce of 4 values on this rank, but the ranks passed between 3 and 9"));

        let chunks = texts(verdicts(&[Shape { chunk_len: 5, ..s }, Shape { chunk_len: 6, ..s }], &[false; 2]));
        assert_eq!(
            chunks[0],
            "rank 0: all-reduce: chunk lengths differ across ranks (5 to 6); call set_chunk_len alike on every rank"
        );

        let b = Shape::new(Op::Broadcast, 4);
        let roots = texts(verdicts(&[b.rooted(0), b.rooted(1)], &[false; 2]));
        assert_eq!(roots[1], "rank 1: broadcast: ranks name different roots (0 to 1)");

        let outside = texts(verdicts(&[b.rooted(2); 2], &[false; 2]));
        assert_eq!(outside[0], "rank 0: broadcast from rank 2 in a world of 2");

        // A rank with a problem of its own returns it; the others learn which rank it was.
        let r = Shape::new(Op::ReduceScatterSum, 4);
        let peer = texts(verdicts(&[r; 3], &[false, true, false]));
        assert_eq!(peer[0], "rank 0: reduce-scatter: rank 1 passed buffers it cannot use, so no rank runs it");
        assert_eq!(peer[2], "rank 2: reduce-scatter: rank 1 passed buffers it cannot use, so no rank runs it");
        assert_eq!(peer[1], "rank 1: a sharded collective needs 3 × 1 elements, got 0");
    }

    #[test]
    fn every_op_code_round_trips() {
        for op in Op::ALL {
            assert_eq!(Op::from_code(op as u64), Some(op));
            assert!(!op.name().is_empty() && !op.what().is_empty());
        }
        assert_eq!(Op::from_code(0), None);
        let zero = check_timeout(3, Some(Duration::ZERO)).expect_err("a zero timeout must fail");
        assert_eq!(zero.to_string(), "rank 3: collective timeout must be positive");
        assert!(check_timeout(0, None).is_ok() && check_timeout(0, Some(Duration::from_millis(1))).is_ok());
    }

    #[test]
    fn watchdog_reports_a_call_held_past_the_limit() {
        let (tx, rx) = mpsc::channel();
        let dog = Watchdog::spawn("test-watchdog", 0, Duration::from_millis(150), move |op, waited| {
            let _ = tx.send((op, waited));
        })
        .unwrap();
        let start = Instant::now();
        let in_flight = dog.enter(Op::Barrier);
        let (op, waited) = rx.recv_timeout(Duration::from_secs(10)).expect("the watchdog must fire");
        assert_eq!(op, Op::Barrier);
        assert!(waited > Duration::from_millis(150), "{waited:?}");
        assert!(start.elapsed() >= Duration::from_millis(150), "{:?}", start.elapsed());
        drop(in_flight);
        drop(dog);
    }

    #[test]
    fn watchdog_stays_quiet_for_short_calls_and_stops_promptly() {
        let (tx, rx) = mpsc::channel();
        let dog = Watchdog::spawn("test-watchdog", 0, Duration::from_millis(300), move |op, waited| {
            let _ = tx.send((op, waited));
        })
        .unwrap();
        // Many short calls spanning several limits, then idle time: nothing is ever overdue.
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(900) {
            let _call = dog.enter(Op::AllReduceSum);
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(400));
        let stopping = Instant::now();
        drop(dog);
        assert!(stopping.elapsed() < Duration::from_secs(2), "drop took {:?}", stopping.elapsed());
        assert!(rx.try_recv().is_err(), "the watchdog fired on short calls");
    }
}
