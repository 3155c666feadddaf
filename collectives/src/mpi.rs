//! `MpiComm`: the MPI back end (feature `mpi`), one rank per process on `MPI_COMM_WORLD`, through
//! rsmpi. How a process learns that it was started by `mpirun`/`srun` lives in `launcher` (its
//! public functions are `rendezvous::launched_world` etc.), which `rendezvous::connect` reads to
//! decide whether to create an `MpiComm` at all; this file only talks MPI.
//!
//! Lifetime. `MpiComm::init` calls `MPI_Init_thread` and the value owns the MPI universe;
//! dropping it stops the watchdog and calls `MPI_Finalize`, so keep one `MpiComm` for the whole
//! run and drop it by returning from `main` (not `std::process::exit`, which skips the finalize
//! and makes `mpirun` report the rank as failed). A panic must never unwind into that drop: the
//! finalize would wait for peers that are themselves waiting in a collective, and the job would
//! hang. The binary therefore installs a panic hook that calls `Communicator::abort`, and release
//! builds use `panic = "abort"` (workspace Cargo.toml).
//!
//! Errors. `MPI_COMM_WORLD` keeps MPI's default error handler, `MPI_ERRORS_ARE_FATAL`: a failed
//! MPI call ends the whole job rather than returning to a rank whose peers would then wait
//! forever. What we check ourselves, before any data moves, is that every rank agrees on the
//! shape of a collective (buffer length, chunk length, broadcast root) with one 6-value
//! `MPI_MAX` all-reduce; a disagreement returns a `CommError` on every rank alike, so all ranks
//! leave the collective together instead of deadlocking in mismatched chunk loops.
//!
//! In-place all-reduce. mpi-sys exports no `MPI_IN_PLACE` (it is a macro whose value differs
//! between implementations: `(void *) 1` in Open MPI, `(void *) -1` in MPICH), so each chunk is
//! copied into a reused scratch buffer and reduced from there into the caller's buffer. The
//! scratch holds at most one chunk (32 MiB by default), and a memcpy of a chunk costs far less
//! than moving it over any interconnect. Chunking also keeps every call's count within MPI's
//! `int` (rsmpi's `Count` is `i32`), so buffers of any size work.
//!
//! Bit-identical results (the crate invariant): MPI does not promise them in general, but Open
//! MPI's and MPICH's all-reduce algorithms for a commutative built-in op either reduce each
//! element on one rank and distribute it (ring, reduce-scatter + allgather) or combine the same
//! operands on every rank; `examples/mpi_smoke.rs` checks the invariant on random data.
//!
//! Watchdog. With `init(Some(t))` a background thread looks every 100 ms at an atomic word that
//! holds "collective started at" and the op's name; when one trait call has been in flight for
//! more than `t` it prints `rank R: collective <op> waited more than T s; aborting the job` to
//! stderr and ends the job. `t` bounds a whole call, including time spent waiting for a slower
//! peer (rank 0 writing a checkpoint while others wait at a barrier), so pick it well above the
//! longest legitimate wait. The thread makes no MPI call except `MPI_Abort`. We request
//! `MPI_THREAD_MULTIPLE`, the only level at which another thread may call `MPI_Abort` while the
//! main thread sits inside a collective; Open MPI 4 and MPICH grant it. If the library grants
//! less, the watchdog prints and then calls `std::process::abort()`: the launcher sees a rank
//! killed by SIGABRT and tears down the rest of the job itself.

use crate::{CommError, Communicator, Result};
use ::mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use ::mpi::environment::Universe;
use ::mpi::topology::{Communicator as _, SimpleCommunicator};
use ::mpi::Threading;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

/// Elements per MPI call when a buffer is cut into chunks: 8 Mi f32 = 32 MiB, far below MPI's
/// `int` count limit and large enough that per-call latency is noise next to bandwidth.
pub const DEFAULT_CHUNK_LEN: usize = 8 << 20;
/// The exit code the watchdog passes to `MPI_Abort` (the code of coreutils `timeout`).
pub const WATCHDOG_EXIT_CODE: i32 = 124;
/// How often the watchdog looks at the collective in flight.
const WATCHDOG_POLL: Duration = Duration::from_millis(100);

/// The collective a rank is in, as the watchdog reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    AllReduceSum = 1,
    AllReduceSumF64 = 2,
    Broadcast = 3,
    Barrier = 4,
    ReduceScatter = 5,
    AllGather = 6,
}

impl Op {
    const BITS: u32 = 3;

    fn from_code(code: u64) -> Option<Op> {
        match code {
            1 => Some(Op::AllReduceSum),
            2 => Some(Op::AllReduceSumF64),
            3 => Some(Op::Broadcast),
            4 => Some(Op::Barrier),
            5 => Some(Op::ReduceScatter),
            6 => Some(Op::AllGather),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Op::AllReduceSum => "all_reduce_sum",
            Op::AllReduceSumF64 => "all_reduce_sum_f64",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
            Op::ReduceScatter => "reduce_scatter_sum",
            Op::AllGather => "all_gather",
        }
    }
}

/// What the watchdog thread shares with the rank: one word, written at the start and end of
/// every collective, so the op name and its start time can never be read torn apart.
struct InFlightClock {
    /// 0 when no collective is in flight; otherwise `((ms since epoch) + 1) << Op::BITS | op`.
    word: AtomicU64,
    epoch: Instant,
    stop: AtomicBool,
}

impl InFlightClock {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The op in flight and how long it has been running, if any.
    fn in_flight(&self) -> Option<(Op, Duration)> {
        let w = self.word.load(Ordering::Acquire);
        let op = Op::from_code(w & ((1 << Op::BITS) - 1))?;
        let started = (w >> Op::BITS) - 1;
        Some((op, Duration::from_millis(self.now_ms().saturating_sub(started))))
    }
}

/// Marks a collective as in flight for as long as it lives.
struct InFlight<'a>(&'a InFlightClock);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.word.store(0, Ordering::Release);
    }
}

/// One rank of an MPI job on `MPI_COMM_WORLD`. See the module doc for its lifetime, errors and
/// watchdog.
pub struct MpiComm {
    rank: usize,
    size: usize,
    /// Elements per MPI call; the same on every rank (checked at every collective).
    chunk_len: usize,
    /// Reused send buffer for all-reduce, at most `chunk_len` long.
    scratch: Mutex<Vec<f32>>,
    clock: Arc<InFlightClock>,
    watchdog: Option<JoinHandle<()>>,
    /// The watchdog's limit per collective call.
    timeout: Option<Duration>,
    /// MPI granted `MPI_THREAD_MULTIPLE`: any thread may call `MPI_Abort`.
    multiple: bool,
    init_thread: ThreadId,
    // Last: dropped after the watchdog has been joined (`Drop for MpiComm`), calls MPI_Finalize.
    _universe: Universe,
}

impl MpiComm {
    /// Initializes MPI (requesting `MPI_THREAD_MULTIPLE`) and joins `MPI_COMM_WORLD`. With
    /// `timeout`, a watchdog ends the job when one collective call takes longer than that.
    /// Call once per process, from the main thread; a second call is an error.
    pub fn init(timeout: Option<Duration>) -> Result<MpiComm> {
        let env_rank = crate::launcher::launched_world().map_or(0, |(r, _)| r);
        if let Some(t) = timeout {
            if t.is_zero() {
                return Err(CommError::Failed { rank: env_rank, msg: "collective timeout must be positive".into() });
            }
        }
        let (universe, provided) = ::mpi::initialize_with_threading(Threading::Multiple).ok_or_else(|| CommError::Failed {
            rank: env_rank,
            msg: "MPI is already initialized in this process (create one MpiComm per process)".into(),
        })?;
        let world = SimpleCommunicator::world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let clock = Arc::new(InFlightClock { word: AtomicU64::new(0), epoch: Instant::now(), stop: AtomicBool::new(false) });
        let multiple = provided == Threading::Multiple;
        let watchdog = match timeout {
            None => None,
            Some(t) => {
                let clock = clock.clone();
                let spawned = std::thread::Builder::new()
                    .name("mpi-watchdog".into())
                    .spawn(move || watch(&clock, rank, t, multiple))
                    .map_err(|e| CommError::Failed { rank, msg: format!("cannot start the collective watchdog thread: {e}") })?;
                Some(spawned)
            }
        };
        Ok(MpiComm {
            rank,
            size,
            chunk_len: DEFAULT_CHUNK_LEN,
            scratch: Mutex::new(Vec::new()),
            clock,
            watchdog,
            timeout,
            multiple,
            init_thread: std::thread::current().id(),
            _universe: universe,
        })
    }

    /// Elements per MPI call for large buffers (default `DEFAULT_CHUNK_LEN`), clamped to
    /// `1..=i32::MAX`. Every rank must set the same value; a mismatch is reported as an error by
    /// the next all-reduce or broadcast. Small values exist for tests of the chunked path.
    pub fn set_chunk_len(&mut self, elems: usize) {
        self.chunk_len = elems.clamp(1, i32::MAX as usize);
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        scratch.truncate(self.chunk_len);
        scratch.shrink_to(self.chunk_len);
    }

    pub fn chunk_len(&self) -> usize {
        self.chunk_len
    }

    /// Whether MPI granted `MPI_THREAD_MULTIPLE` (the watchdog and `abort` from other threads
    /// then use `MPI_Abort`; otherwise they end this process with SIGABRT).
    pub fn thread_multiple(&self) -> bool {
        self.multiple
    }

    fn enter(&self, op: Op) -> InFlight<'_> {
        let word = ((self.clock.now_ms() + 1) << Op::BITS) | op as u64;
        self.clock.word.store(word, Ordering::Release);
        InFlight(&self.clock)
    }

    /// Checks that every rank passed the same `len` and `root` and uses the same chunk length,
    /// with one all-reduce of `[x, -x]` pairs under `MPI_MAX` (max and min at once). Every rank
    /// gets the same answer, so either all proceed or all return the same error.
    fn agree(&self, what: &str, len: usize, root: usize) -> Result<()> {
        let mine = [len as i64, -(len as i64), self.chunk_len as i64, -(self.chunk_len as i64), root as i64, -(root as i64)];
        let mut max = [0i64; 6];
        SimpleCommunicator::world().all_reduce_into(&mine[..], &mut max[..], SystemOperation::max());
        let range = |i: usize| (-max[i + 1], max[i]);
        let fail = |msg: String| Err(CommError::Failed { rank: self.rank, msg });
        let (lo, hi) = range(0);
        if lo != hi {
            return fail(format!("{what} of {len} values on this rank, but the ranks passed between {lo} and {hi}"));
        }
        let (lo, hi) = range(2);
        if lo != hi {
            return fail(format!("{what}: chunk lengths differ across ranks ({lo} to {hi}); call set_chunk_len alike on every rank"));
        }
        let (lo, hi) = range(4);
        if lo != hi {
            return fail(format!("{what}: ranks name different roots ({lo} to {hi})"));
        }
        Ok(())
    }
}

/// The watchdog thread's loop: see the module doc.
fn watch(clock: &InFlightClock, rank: usize, timeout: Duration, multiple: bool) {
    while !clock.stop.load(Ordering::Acquire) {
        std::thread::park_timeout(WATCHDOG_POLL);
        let Some((op, waited)) = clock.in_flight() else { continue };
        if waited <= timeout {
            continue;
        }
        let _ = writeln!(
            std::io::stderr(),
            "rank {rank}: collective {} waited more than {} s; aborting the job",
            op.name(),
            timeout.as_secs_f64()
        );
        if multiple {
            // Allowed from any thread under MPI_THREAD_MULTIPLE; never returns.
            SimpleCommunicator::world().abort(WATCHDOG_EXIT_CODE);
        }
        let _ = writeln!(
            std::io::stderr(),
            "rank {rank}: MPI lacks MPI_THREAD_MULTIPLE, so ending this rank with SIGABRT instead of MPI_Abort"
        );
        std::process::abort();
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        // Stop and join the watchdog before `_universe` drops and finalizes MPI.
        if let Some(handle) = self.watchdog.take() {
            self.clock.stop.store(true, Ordering::Release);
            handle.thread().unpark();
            let _ = handle.join();
        }
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let _in_flight = self.enter(Op::AllReduceSum);
        self.agree("all-reduce", buf.len(), 0)?;
        let world = SimpleCommunicator::world();
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        for chunk in buf.chunks_mut(self.chunk_len) {
            scratch.clear();
            scratch.extend_from_slice(chunk);
            world.all_reduce_into(&scratch[..], chunk, SystemOperation::sum());
        }
        Ok(())
    }
    fn all_reduce_sum_f64(&self, x: f64) -> Result<f64> {
        let _in_flight = self.enter(Op::AllReduceSumF64);
        let mut sum = 0.0f64;
        SimpleCommunicator::world().all_reduce_into(&x, &mut sum, SystemOperation::sum());
        Ok(sum)
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let _in_flight = self.enter(Op::Broadcast);
        // Agree first: then every rank sees the same root and takes the same branch below.
        self.agree("broadcast", buf.len(), root)?;
        if root >= self.size {
            return Err(CommError::Failed { rank: self.rank, msg: format!("broadcast from rank {root} in a world of {}", self.size) });
        }
        let world = SimpleCommunicator::world();
        let root = world.process_at_rank(root as i32);
        for chunk in buf.chunks_mut(self.chunk_len) {
            root.broadcast_into(chunk);
        }
        Ok(())
    }
    /// `MPI_Reduce_scatter_block`, one call per slice of the block: slice `o..o+c` of every
    /// rank's block is packed contiguously into the scratch buffer (world·c ≤ chunk length) and
    /// reduced into `recv[o..o+c]`. When the whole send buffer fits one chunk it goes as is.
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let _in_flight = self.enter(Op::ReduceScatter);
        // A rank whose pair of lengths is inconsistent agrees on an impossible length, so every
        // rank errors together instead of some entering the collective.
        let ok = send.len() == recv.len() * self.size;
        self.agree("reduce-scatter", if ok { recv.len() } else { usize::MAX >> 2 }, 0)?;
        crate::check_blocks(self, send.len(), recv.len())?;
        let world = SimpleCommunicator::world();
        let b = recv.len();
        if send.len() <= self.chunk_len {
            world.reduce_scatter_block_into(send, recv, SystemOperation::sum());
            return Ok(());
        }
        let c = (self.chunk_len / self.size).max(1);
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        for (i, out) in recv.chunks_mut(c).enumerate() {
            let o = i * c;
            scratch.clear();
            for r in 0..self.size {
                scratch.extend_from_slice(&send[r * b + o..r * b + o + out.len()]);
            }
            world.reduce_scatter_block_into(&scratch[..], out, SystemOperation::sum());
        }
        Ok(())
    }
    /// `MPI_Allgather`, sliced like `reduce_scatter_sum` for large blocks.
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let _in_flight = self.enter(Op::AllGather);
        let ok = recv.len() == send.len() * self.size;
        self.agree("all-gather", if ok { send.len() } else { usize::MAX >> 2 }, 0)?;
        crate::check_blocks(self, recv.len(), send.len())?;
        let world = SimpleCommunicator::world();
        let b = send.len();
        if recv.len() <= self.chunk_len {
            world.all_gather_into(send, recv);
            return Ok(());
        }
        let c = (self.chunk_len / self.size).max(1);
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        for (i, part) in send.chunks(c).enumerate() {
            let o = i * c;
            scratch.clear();
            scratch.resize(part.len() * self.size, 0.0);
            world.all_gather_into(part, &mut scratch[..]);
            for r in 0..self.size {
                recv[r * b + o..r * b + o + part.len()].copy_from_slice(&scratch[r * part.len()..(r + 1) * part.len()]);
            }
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        let _in_flight = self.enter(Op::Barrier);
        SimpleCommunicator::world().barrier();
        Ok(())
    }
    /// `MPI_Abort` on `MPI_COMM_WORLD`: the launcher ends every rank. From a thread other than
    /// the one that initialized MPI, and without `MPI_THREAD_MULTIPLE`, MPI may not be called,
    /// so this rank ends itself with SIGABRT and the launcher ends the rest.
    fn abort(&self, code: i32) -> ! {
        if self.multiple || std::thread::current().id() == self.init_thread {
            SimpleCommunicator::world().abort(code);
        }
        let _ = writeln!(std::io::stderr(), "rank {}: abort({code}) off the MPI thread; ending this rank with SIGABRT", self.rank);
        std::process::abort()
    }
    fn collective_timeout(&self) -> Option<Duration> {
        self.timeout
    }
    fn name(&self) -> &'static str {
        "mpi"
    }
}
