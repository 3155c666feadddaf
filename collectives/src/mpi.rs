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
//! shape of a collective (buffer length, chunk length, broadcast root, and that no rank's own
//! reduce-scatter/all-gather buffers are inconsistent) with one `MPI_MAX` all-reduce of the
//! crate's agreement words (`watchdog::Shape`); a disagreement returns a `CommError` on every
//! rank alike, so all ranks leave the collective together instead of deadlocking in mismatched
//! chunk loops.
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
//! Watchdog. With `init(Some(t))` a background thread (`watchdog::Watchdog`) looks every 100 ms
//! at an atomic word that holds "collective started at" and the op's name; when one trait call
//! has been in flight for more than `t` it prints
//! `rank R: collective <op> waited more than T s; aborting the job` to stderr and ends the job.
//! `t` bounds a whole call, including time spent waiting for a slower peer (rank 0 writing a
//! checkpoint while others wait at a barrier), so pick it well above the longest legitimate
//! wait. The thread makes no MPI call except `MPI_Abort`. We request `MPI_THREAD_MULTIPLE`, the
//! only level at which another thread may call `MPI_Abort` while the main thread sits inside a
//! collective; Open MPI 4 and MPICH grant it. If the library grants less, the watchdog prints and
//! then calls `std::process::abort()`: the launcher sees a rank killed by SIGABRT and tears down
//! the rest of the job itself.

use crate::watchdog::{self, InFlight, Op, Shape, Watchdog, AGREE_WORDS};
use crate::{CommError, Communicator, Result};
use ::mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use ::mpi::environment::Universe;
use ::mpi::topology::{Communicator as _, SimpleCommunicator};
use ::mpi::Threading;
use std::io::Write as _;
use std::sync::Mutex;
use std::thread::ThreadId;
use std::time::Duration;

pub use crate::watchdog::WATCHDOG_EXIT_CODE;

/// Elements per MPI call when a buffer is cut into chunks: 8 Mi f32 = 32 MiB, far below MPI's
/// `int` count limit and large enough that per-call latency is noise next to bandwidth.
pub const DEFAULT_CHUNK_LEN: usize = 8 << 20;

/// One rank of an MPI job on `MPI_COMM_WORLD`. See the module doc for its lifetime, errors and
/// watchdog.
pub struct MpiComm {
    rank: usize,
    size: usize,
    /// Elements per MPI call; the same on every rank (checked at every collective).
    chunk_len: usize,
    /// Reused send buffer for all-reduce, at most `chunk_len` long.
    scratch: Mutex<Vec<f32>>,
    /// The thread that ends the job when a call outlives `timeout` (None without a timeout).
    watchdog: Option<Watchdog>,
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
        watchdog::check_timeout(env_rank, timeout)?;
        let (universe, provided) = ::mpi::initialize_with_threading(Threading::Multiple)
            .ok_or(CommError::MpiAlreadyInitialized { rank: env_rank })?;
        let world = SimpleCommunicator::world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let multiple = provided == Threading::Multiple;
        let watchdog = match timeout {
            None => None,
            Some(t) => Some(Watchdog::spawn("mpi-watchdog", rank, t, move |op, _| expire(op, rank, t, multiple))?),
        };
        Ok(MpiComm {
            rank,
            size,
            chunk_len: DEFAULT_CHUNK_LEN,
            scratch: Mutex::new(Vec::new()),
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

    /// Starts the watchdog's clock on `op` for as long as the guard lives.
    fn enter(&self, op: Op) -> Option<InFlight<'_>> {
        self.watchdog.as_ref().map(|w| w.enter(op))
    }

    /// The agreement before data moves (`watchdog::Shape`): every rank passed the same length
    /// and root, uses the same chunk length, and no rank has a `problem` with its own buffers;
    /// one `MPI_MAX` all-reduce. Either every rank proceeds or every rank returns an error.
    fn agree(&self, op: Op, len: usize, root: usize, problem: Option<CommError>) -> Result<()> {
        let shape = Shape { chunk_len: self.chunk_len, ..Shape::new(op, len).rooted(root) };
        shape.agree(self.rank, self.size, problem, |mine| {
            let mut max = [0i64; AGREE_WORDS];
            SimpleCommunicator::world().all_reduce_into(&mine[..], &mut max[..], SystemOperation::max());
            max
        })
    }
}

/// The watchdog's `on_expiry`: see the module doc.
fn expire(op: Op, rank: usize, timeout: Duration, multiple: bool) {
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

impl Drop for MpiComm {
    fn drop(&mut self) {
        // Stop and join the watchdog before `_universe` drops and finalizes MPI.
        drop(self.watchdog.take());
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
        self.agree(Op::AllReduceSum, buf.len(), 0, None)?;
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
        // Agree first (this also checks that the root is in the world).
        self.agree(Op::Broadcast, buf.len(), root, None)?;
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
        let _in_flight = self.enter(Op::ReduceScatterSum);
        // A rank whose pair of lengths is inconsistent tells its peers in the agreement, so
        // every rank errors together instead of some entering the collective.
        let problem = crate::check_blocks(self, send.len(), recv.len()).err();
        self.agree(Op::ReduceScatterSum, recv.len(), 0, problem)?;
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
        let problem = crate::check_blocks(self, recv.len(), send.len()).err();
        self.agree(Op::AllGather, send.len(), 0, problem)?;
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
        let _ = writeln!(
            std::io::stderr(),
            "rank {}: abort({code}) off the MPI thread; ending this rank with SIGABRT",
            self.rank
        );
        std::process::abort()
    }
    fn collective_timeout(&self) -> Option<Duration> {
        self.timeout
    }
    fn name(&self) -> &'static str {
        "mpi"
    }
}
