//! `NcclComm`: the NCCL back end (feature `cuda`), one rank per process and one GPU per rank,
//! through cudarc. NCCL moves the data; a *bootstrap* communicator (`MpiComm` under a launcher,
//! `SingleProcess` for one process) carries the NCCL unique id at construction and does the
//! cheap host-side work afterwards.
//!
//! Construction. `NcclComm::new(bootstrap, device_ordinal, timeout)` opens the GPU and a stream
//! on it (`with_stream` takes the caller's stream instead), then, over the bootstrap: every rank
//! reports whether its GPU setup worked (one f64 sum), so a rank whose GPU failed makes every
//! rank return an error instead of leaving its peers in NCCL's init; rank 0 creates the NCCL
//! unique id and `broadcast_nccl_id` (`nccl_id.rs`) sends its 128 bytes to every rank as the bits of
//! 32 f32 (the bootstrap's `broadcast` moves f32 slices verbatim); then every rank calls
//! `ncclCommInitRank`. Rank and world size are the bootstrap's. `rendezvous::connect_nccl` does
//! all of this for a binary, picking GPU `local_rank % device_count`.
//!
//! Which collectives go where. Data collectives run on NCCL: the device-buffer methods
//! (`all_reduce_sum_device`, `reduce_scatter_sum_device`, `all_gather_device`,
//! `broadcast_device`) work on `CudaSlice`/`CudaView` buffers of this communicator's context with
//! no host round trip, and are what the trainer's GPU path calls, with its kernels on `stream()`.
//! The host-slice trait methods (`Communicator::all_reduce_sum(&mut [f32])` and friends) exist
//! for compatibility with host code: each copies into a reused device scratch buffer, runs the
//! same device collective and copies back. `all_reduce_sum_f64` (losses, counts), `barrier` and
//! `abort` go through the bootstrap: a scalar is not worth a device round trip, and only the
//! bootstrap can end the whole job (`MPI_Abort`).
//!
//! Agreement before data moves. Like `MpiComm`, every collective first checks that the ranks
//! agree on its shape (length of the buffer or block, broadcast root) and that no rank has a
//! local problem (a buffer on another GPU, reduce-scatter/all-gather buffers that are not
//! world_size blocks against one, a scratch buffer that could not be allocated), with one tiny
//! NCCL `ncclMax` all-reduce of the crate's 8 agreement words (`watchdog::Shape`, shared with
//! `mpi.rs`) through pinned host memory. A disagreement returns a
//! `CommError` on every rank alike, so all ranks leave together instead of hanging in a
//! mismatched NCCL call. It costs one small extra NCCL call (tens of µs) per collective.
//! Failures *after* the agreement (an NCCL enqueue error, a CUDA error on the stream, an
//! asynchronous NCCL error such as a peer's network failure) end the whole job, for the reason
//! `mpi.rs` keeps `MPI_ERRORS_ARE_FATAL`: the peers would otherwise wait forever.
//!
//! Completion and the watchdog. NCCL calls only enqueue work on the stream, and a dead peer makes
//! that work never finish. Every collective therefore waits for its own completion before
//! returning: it records a (reused) event after the NCCL call and polls it with
//! `cuEventQuery`, yielding the thread for the first polls and then sleeping 1/16 of the time
//! waited so far (20 µs to 1 ms), so a poll costs little CPU and adds at most ~6% to the wait.
//! Each poll also reads `ncclCommGetAsyncError`. With `timeout = Some(t)`, a call (agreement
//! included, so `t` also bounds waiting for a slower peer; a device-buffer call first finishes
//! the work already queued on its stream, which the clock does not count) that has not finished after `t` prints
//! `rank R: NCCL <op> did not finish within T s; aborting the job`, aborts the NCCL communicator
//! (`ncclCommAbort`, which also stops its kernels) and calls `bootstrap.abort(124)`, which under
//! MPI is `MPI_Abort` on the world: every rank ends. The watchdog runs in the calling thread
//! (the poll loop), so it needs no extra thread and no cross-thread MPI call. `ncclCommInitRank`
//! blocks inside NCCL instead; during it a watchdog thread (`watchdog::Watchdog`, as `MpiComm`'s)
//! ends this process with SIGABRT after `t` (it cannot call the bootstrap, which is not shared
//! across threads), and the launcher ends the rest of the job.
//!
//! Consequence: the device methods are synchronous with the host: they return once the data is
//! in place on this GPU, ready for the host or any stream. Work the trainer enqueued on
//! `stream()` before the call runs first (stream order); to overlap communication with compute,
//! call from a second thread with buffers on another stream of the same context.
//!
//! Bit-identical results (the crate invariant): NCCL's all-reduce algorithms (ring, tree,
//! NVLS/CollNet) each reduce an element once and distribute the result, so every rank gets the
//! same bits; `examples/nccl_smoke.rs` checks this on random data by broadcasting rank 0's sums.
//!
//! Lifetime. Dropping an `NcclComm` calls `ncclCommAbort` (as cudarc does), not
//! `ncclCommDestroy`: no operation of ours is in flight at that point (each one waited for its
//! completion), and abort never waits for peers that may have exited already. The bootstrap is
//! dropped last, so `MPI_Finalize` comes after NCCL is gone.
//!
//! cudarc's safe `nccl::Comm` is not `Send` and keeps its `ncclComm_t` private, so neither
//! `ncclCommAbort` nor `ncclCommGetAsyncError` could be called on it; this file drives NCCL through
//! cudarc's `result`/`sys` layer instead, with cudarc's driver API for memory, streams, events.

use crate::watchdog::{self, Op, Shape, Watchdog, Words, AGREE_WORDS};
use crate::{CommError, Communicator, Result};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError, PinnedHostSlice,
};
use cudarc::nccl::{result as nccl, sys};
use std::ffi::{c_void, CStr};
use std::io::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The exit code the watchdog passes to the bootstrap's `abort` (as in `mpi.rs`).
pub use crate::watchdog::WATCHDOG_EXIT_CODE;
/// The exit code when NCCL or CUDA fails after the ranks agreed to run a collective.
pub const FAILURE_EXIT_CODE: i32 = 1;
/// Polls that only yield the thread before the poll loop starts sleeping.
const SPIN_POLLS: u32 = 64;
/// Bounds of the poll loop's sleep (it sleeps 1/16 of the time waited so far).
const MIN_POLL_SLEEP: Duration = Duration::from_micros(20);
const MAX_POLL_SLEEP: Duration = Duration::from_millis(1);

/// The GPU for a rank: `local_rank % device_count` (or `rank % device_count` when the launcher
/// did not say the local rank). Errors when there is no driver or no GPU.
pub fn pick_device(rank: usize, local_rank: Option<usize>) -> Result<usize> {
    let count = CudaContext::device_count().map_err(|e| CommError::Cuda {
        rank,
        what: "cannot query CUDA devices".into(),
        detail: e.to_string(),
    })?;
    let count = usize::try_from(count).unwrap_or(0);
    if count == 0 {
        return Err(CommError::NoGpu { rank });
    }
    Ok(local_rank.unwrap_or(rank) % count)
}

/// Number of CUDA devices, or why it cannot be known.
pub fn device_count() -> std::result::Result<usize, String> {
    CudaContext::device_count().map(|n| n.max(0) as usize).map_err(|e| format!("cannot query CUDA devices: {e}"))
}

/// The NCCL library's version as (major, minor, patch), from `ncclGetVersion`.
pub fn nccl_version() -> Option<(u32, u32, u32)> {
    let code = u32::try_from(nccl::get_nccl_version().ok()?).ok()?;
    // NCCL ≥ 2.9 encodes major·10000 + minor·100 + patch; older ones major·1000 + minor·100 + patch.
    Some(if code >= 10000 {
        (code / 10000, code / 100 % 100, code % 100)
    } else {
        (code / 1000, code / 100 % 10, code % 100)
    })
}

/// The raw NCCL communicator. NCCL allows a communicator to be used from any thread as long as
/// calls on it are not concurrent; `NcclComm` serializes them with its `state` mutex.
struct RawComm(sys::ncclComm_t);

// SAFETY: see above; the pointer is only used under `NcclComm::state` (or, in `abort`-like
// paths, by the one thread that is ending the process).
unsafe impl Send for RawComm {}

/// What the collectives share, under one lock: the completion event and reused buffers.
struct State {
    /// Recorded after each NCCL call; polled by `wait`.
    done: CudaEvent,
    /// Agreement words on the device and in pinned host memory.
    agree_dev: CudaSlice<i64>,
    agree_host: PinnedHostSlice<i64>,
    /// Host-path scratch: `input` holds the data going in (and the result of in-place
    /// all-reduce and broadcast), `output` the result of reduce-scatter and all-gather.
    input: Option<CudaSlice<f32>>,
    output: Option<CudaSlice<f32>>,
}

/// One rank of an NCCL job, on one GPU. See the module doc.
pub struct NcclComm {
    rank: usize,
    size: usize,
    timeout: Option<Duration>,
    comm: RawComm,
    state: Mutex<State>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    // Last: dropped after the NCCL communicator is gone (`MPI_Finalize` for `MpiComm`). None for
    // a communicator `joined` over one it does not own.
    bootstrap: Option<Box<dyn Communicator>>,
}

/// A CUDA driver failure while `what` was being done.
fn cuda_error(rank: usize, what: String, e: DriverError) -> CommError {
    CommError::Cuda { rank, what, detail: e.to_string() }
}

/// `ncclGetErrorString` plus, when there is one, `ncclGetLastError`'s detail.
fn nccl_error_text(comm: sys::ncclComm_t, code: sys::ncclResult_t) -> String {
    // SAFETY: NCCL returns static or per-communicator NUL-terminated strings (or null).
    let text = |p: *const std::ffi::c_char| {
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    let base = text(unsafe { sys::ncclGetErrorString(code) }).unwrap_or_default();
    let last = text(unsafe { sys::ncclGetLastError(comm) }).filter(|s| !s.is_empty());
    match last {
        Some(last) => format!("{code:?} ({base}): {last}"),
        None => format!("{code:?} ({base})"),
    }
}

impl NcclComm {
    /// Joins an NCCL communicator over `bootstrap` (every rank of it must call this), on GPU
    /// `device_ordinal` with a new stream of that device. With `timeout`, the watchdog ends the
    /// job when one collective (or the NCCL init) takes longer than that. World 1 works with
    /// `SingleProcess` as bootstrap.
    pub fn new(bootstrap: Box<dyn Communicator>, device_ordinal: usize, timeout: Option<Duration>) -> Result<NcclComm> {
        let rank = bootstrap.rank();
        let stream = CudaContext::new(device_ordinal)
            .and_then(|ctx| ctx.new_stream())
            .map_err(|e| cuda_error(rank, format!("cannot open GPU {device_ordinal}"), e));
        Self::init(bootstrap, stream, timeout)
    }

    /// As `new`, but on the caller's stream (and its context), so that NCCL and the caller's
    /// kernels are ordered on one stream.
    pub fn with_stream(
        bootstrap: Box<dyn Communicator>,
        stream: Arc<CudaStream>,
        timeout: Option<Duration>,
    ) -> Result<NcclComm> {
        Self::init(bootstrap, Ok(stream), timeout)
    }

    /// An NCCL communicator on the caller's stream, bootstrapped over a communicator the caller
    /// keeps (the trainer's MPI world): for the device collectives next to it. It does not own
    /// the bootstrap, so its scalar collectives and `barrier` return an error (use the
    /// bootstrap), and the watchdog (and `abort`) end this process with the exit code instead of
    /// `MPI_Abort`; the launcher (mpirun, srun) then ends the rest of the job.
    pub fn joined(
        bootstrap: &dyn Communicator,
        stream: Arc<CudaStream>,
        timeout: Option<Duration>,
    ) -> Result<NcclComm> {
        Self::init_over(bootstrap, Ok(stream), timeout)
    }

    fn init(
        bootstrap: Box<dyn Communicator>,
        stream: Result<Arc<CudaStream>>,
        timeout: Option<Duration>,
    ) -> Result<NcclComm> {
        let mut comm = Self::init_over(&*bootstrap, stream, timeout)?;
        comm.bootstrap = Some(bootstrap);
        Ok(comm)
    }

    fn init_over(
        bootstrap: &dyn Communicator,
        stream: Result<Arc<CudaStream>>,
        timeout: Option<Duration>,
    ) -> Result<NcclComm> {
        let (rank, size) = (bootstrap.rank(), bootstrap.world_size());
        watchdog::check_timeout(rank, timeout)?;
        if i32::try_from(size).is_err() {
            return Err(CommError::WorldTooLarge { rank, world: size });
        }
        // Everything that can fail locally happens before the first collective, and every rank
        // learns whether every rank got this far.
        let setup = stream.and_then(|stream| {
            let ctx = stream.context().clone();
            let local = || -> std::result::Result<State, DriverError> {
                ctx.bind_to_thread()?;
                Ok(State {
                    done: ctx.new_event(None)?,
                    agree_dev: stream.alloc_zeros::<i64>(AGREE_WORDS)?,
                    // SAFETY: written before every read (`agree`); flags 0: cached, not write-combined.
                    agree_host: unsafe { ctx.alloc_pinned_with_flags::<i64>(AGREE_WORDS, 0) }?,
                    input: None,
                    output: None,
                })
            };
            let state = local().map_err(|e| cuda_error(rank, format!("cannot set up GPU {}", ctx.ordinal()), e))?;
            Ok((stream, ctx, state))
        });
        let failures = bootstrap.all_reduce_sum_f64(if setup.is_err() { 1.0 } else { 0.0 })?;
        let (stream, ctx, state) = setup?;
        if failures > 0.0 {
            return Err(CommError::PeerGpuSetup { rank, failures: failures as usize });
        }

        // The unique id: created on rank 0, broadcast over the bootstrap.
        let (mine, id_error) = if rank == 0 {
            match nccl::get_uniqueid() {
                Ok(id) => (Some(id.internal.map(|c| c as u8)), None),
                Err(e) => {
                    let detail = nccl_error_text(std::ptr::null_mut(), e.0);
                    (None, Some(CommError::Nccl { rank, call: "ncclGetUniqueId", detail }))
                }
            }
        } else {
            (None, None)
        };
        let shared = crate::nccl_id::broadcast_nccl_id(bootstrap, mine.as_ref());
        if let Some(e) = id_error {
            return Err(e);
        }
        let id = sys::ncclUniqueId { internal: shared?.map(|b| b as std::ffi::c_char) };

        // ncclCommInitRank blocks until every rank has joined; a watchdog thread bounds it.
        ctx.bind_to_thread().map_err(|e| cuda_error(rank, format!("cannot bind GPU {}", ctx.ordinal()), e))?;
        let guard = match timeout {
            None => None,
            Some(t) => Some(Watchdog::spawn("nccl-init-watchdog", rank, t, move |_, _| {
                let _ = writeln!(
                    std::io::stderr(),
                    "rank {rank}: NCCL init did not finish within {} s; aborting the job",
                    t.as_secs_f64()
                );
                std::process::abort();
            })?),
        };
        let in_flight = guard.as_ref().map(|g| g.enter(Op::Init));
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out pointer; size and rank fit i32 (checked above, rank < size).
        let init = unsafe { nccl::comm_init_rank(&mut comm, size as i32, id, rank as i32) };
        drop(in_flight);
        drop(guard);
        if let Err(e) = init {
            let detail = nccl_error_text(std::ptr::null_mut(), e.0);
            if size == 1 {
                return Err(CommError::Nccl { rank, call: "ncclCommInitRank", detail });
            }
            // Peers may still sit in their init, or have joined a communicator that will never
            // be complete: end the job rather than return (dropping the bootstrap would call
            // `MPI_Finalize`, which waits for them).
            let _ = writeln!(std::io::stderr(), "rank {rank}: ncclCommInitRank failed: {detail}; aborting the job");
            bootstrap.abort(FAILURE_EXIT_CODE);
        }
        Ok(NcclComm {
            rank,
            size,
            timeout,
            comm: RawComm(comm),
            state: Mutex::new(state),
            stream,
            ctx,
            bootstrap: None,
        })
    }

    /// The stream every NCCL call of this communicator runs on; run the kernels that produce and
    /// consume the buffers on it (allocate them with `stream().alloc_zeros` etc.).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA context (GPU) of this rank.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The GPU ordinal of this rank.
    pub fn device_ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The watchdog's limit per collective, if armed.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The communicator that bootstrapped this one (and carries the scalar all-reduce, the
    /// barrier and `abort`); None for a `joined` communicator.
    pub fn bootstrap(&self) -> Option<&dyn Communicator> {
        self.bootstrap.as_deref()
    }

    /// The bootstrap, or the error a `joined` communicator gives for host-side scalar work.
    fn owned_bootstrap(&self, op: Op) -> Result<&dyn Communicator> {
        self.bootstrap().ok_or(CommError::NotOwned { rank: self.rank, op: op.name() })
    }

    /// End the job: `abort` on the owned bootstrap, else the end of this process.
    fn end_process(&self, code: i32) -> ! {
        match self.bootstrap() {
            Some(b) => b.abort(code),
            None => std::process::exit(code),
        }
    }

    /// Element-wise sum over ranks of a device buffer, in place. Returns once the sums are in
    /// `buf` (see the module doc on completion). Every rank must pass the same length.
    pub fn all_reduce_sum_device<B: DevicePtrMut<f32>>(&self, buf: &mut B) -> Result<()> {
        let started = self.settle(Op::AllReduceSum);
        let mut st = self.lock();
        let problem = self.foreign(buf.stream());
        self.agree(&mut st, Op::AllReduceSum, buf.len(), 0, problem, started)?;
        let len = buf.len();
        if len > 0 {
            let (ptr, _record) = buf.device_ptr_mut(&self.stream);
            self.enqueue(Op::AllReduceSum, ptr, ptr, len);
        }
        self.wait(&st, Op::AllReduceSum, started);
        Ok(())
    }

    /// Reduce-scatter of device buffers: `send` holds world_size blocks of `recv.len()`; the sum
    /// over ranks of block `rank` lands in `recv`. Every rank must pass the same block length.
    pub fn reduce_scatter_sum_device<S: DevicePtr<f32>, R: DevicePtrMut<f32>>(
        &self,
        send: &S,
        recv: &mut R,
    ) -> Result<()> {
        let started = self.settle(Op::ReduceScatterSum);
        let mut st = self.lock();
        let problem = self
            .foreign(send.stream())
            .or_else(|| self.foreign(recv.stream()))
            .or_else(|| crate::check_blocks(self, send.len(), recv.len()).err());
        self.agree(&mut st, Op::ReduceScatterSum, recv.len(), 0, problem, started)?;
        let block = recv.len();
        if block > 0 {
            let (src, _record_src) = send.device_ptr(&self.stream);
            let (dst, _record_dst) = recv.device_ptr_mut(&self.stream);
            self.enqueue(Op::ReduceScatterSum, src, dst, block);
        }
        self.wait(&st, Op::ReduceScatterSum, started);
        Ok(())
    }

    /// All-gather of device buffers: every rank's `send` concatenated in rank order into `recv`
    /// (world_size blocks of `send.len()`). Every rank must pass the same block length.
    pub fn all_gather_device<S: DevicePtr<f32>, R: DevicePtrMut<f32>>(&self, send: &S, recv: &mut R) -> Result<()> {
        let started = self.settle(Op::AllGather);
        let mut st = self.lock();
        let problem = self
            .foreign(send.stream())
            .or_else(|| self.foreign(recv.stream()))
            .or_else(|| crate::check_blocks(self, recv.len(), send.len()).err());
        self.agree(&mut st, Op::AllGather, send.len(), 0, problem, started)?;
        let block = send.len();
        if block > 0 {
            let (src, _record_src) = send.device_ptr(&self.stream);
            let (dst, _record_dst) = recv.device_ptr_mut(&self.stream);
            self.enqueue(Op::AllGather, src, dst, block);
        }
        self.wait(&st, Op::AllGather, started);
        Ok(())
    }

    /// Copies `root`'s device buffer to every rank, in place.
    pub fn broadcast_device<B: DevicePtrMut<f32>>(&self, buf: &mut B, root: usize) -> Result<()> {
        let started = self.settle(Op::Broadcast);
        let mut st = self.lock();
        let problem = self.foreign(buf.stream());
        self.agree(&mut st, Op::Broadcast, buf.len(), root, problem, started)?;
        let len = buf.len();
        if len > 0 {
            let (ptr, _record) = buf.device_ptr_mut(&self.stream);
            self.enqueue_rooted(Op::Broadcast, root, ptr, ptr, len);
        }
        self.wait(&st, Op::Broadcast, started);
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A local problem if `stream` (a buffer's) belongs to another GPU context than ours.
    fn foreign(&self, stream: &Arc<CudaStream>) -> Option<CommError> {
        let theirs = stream.context();
        (**theirs != *self.ctx).then(|| CommError::ForeignBuffer {
            rank: self.rank,
            buffer_gpu: theirs.ordinal(),
            comm_gpu: self.ctx.ordinal(),
        })
    }

    /// The start of a device collective: finishes the work already queued on the stream (the
    /// computation that produced the buffer, e.g. a backward pass) and starts the watchdog's
    /// clock. Without this, `timeout` would also bound this rank's own queued computation, and a
    /// short timeout could end a healthy job whose last kernels are slow.
    fn settle(&self, op: Op) -> Instant {
        if let Err(e) = self.ctx.bind_to_thread().and_then(|()| self.stream.synchronize()) {
            self.end_job(format!("{}: the computation before it failed on the GPU: {e}", op.name()), FAILURE_EXIT_CODE);
        }
        Instant::now()
    }

    /// The agreement before data moves (`watchdog::Shape`): every rank passed the same `len`
    /// and `root` and no rank has a local `problem`, with one `ncclMax` all-reduce of the
    /// agreement words. Every rank gets the same answer, so either all proceed or all return an
    /// error. A CUDA or NCCL failure in the reduction itself ends the job.
    fn agree(
        &self,
        st: &mut State,
        op: Op,
        len: usize,
        root: usize,
        problem: Option<CommError>,
        started: Instant,
    ) -> Result<()> {
        let shape = Shape::new(op, len).rooted(root);
        shape.agree(self.rank, self.size, problem, |mine| self.max_over_ranks(st, op, mine, started))
    }

    /// The element-wise maximum of every rank's `mine`, through NCCL and pinned host memory.
    fn max_over_ranks(&self, st: &mut State, op: Op, mine: Words, started: Instant) -> Words {
        if let Err(e) = self.ctx.bind_to_thread() {
            self.end_job(format!("{}: cannot bind GPU {}: {e}", op.name(), self.ctx.ordinal()), FAILURE_EXIT_CODE);
        }
        let State { done, agree_dev, agree_host, .. } = st;
        let copied_in = agree_host
            .as_mut_slice()
            .map(|h| h.copy_from_slice(&mine))
            .and_then(|()| self.stream.memcpy_htod(&*agree_host, agree_dev));
        if let Err(e) = copied_in {
            self.end_job(format!("{}: copying the length check to the GPU failed: {e}", op.name()), FAILURE_EXIT_CODE);
        }
        {
            let (ptr, _record) = agree_dev.device_ptr_mut(&self.stream);
            // SAFETY: `ptr` holds AGREE_WORDS i64 on our context; in place is allowed.
            let r = unsafe {
                nccl::all_reduce(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    AGREE_WORDS,
                    sys::ncclDataType_t::ncclInt64,
                    sys::ncclRedOp_t::ncclMax,
                    self.comm.0,
                    self.stream.cu_stream() as sys::cudaStream_t,
                )
            };
            if let Err(e) = r {
                self.end_job(
                    format!("{}: the NCCL length check failed: {}", op.name(), nccl_error_text(self.comm.0, e.0)),
                    FAILURE_EXIT_CODE,
                );
            }
        }
        if let Err(e) = self.stream.memcpy_dtoh(agree_dev, agree_host) {
            self.end_job(format!("{}: copying the length check back failed: {e}", op.name()), FAILURE_EXIT_CODE);
        }
        self.wait_for(done, op, started);
        match agree_host.as_slice().map(Words::try_from) {
            Ok(Ok(max)) => max,
            Ok(Err(_)) => self.end_job(format!("{}: the length check came back short", op.name()), FAILURE_EXIT_CODE),
            Err(e) => self.end_job(format!("{}: reading the length check failed: {e}", op.name()), FAILURE_EXIT_CODE),
        }
    }

    /// Enqueues one NCCL collective of f32 on our stream (in place when `send == recv`); `count`
    /// is NCCL's: elements for all-reduce and broadcast, the block for reduce-scatter and
    /// all-gather. The ranks have agreed on the shape, so an enqueue error ends the job.
    fn enqueue(&self, op: Op, send: u64, recv: u64, count: usize) {
        self.enqueue_rooted(op, 0, send, recv, count)
    }

    fn enqueue_rooted(&self, op: Op, root: usize, send: u64, recv: u64, count: usize) {
        let (src, dst) = (send as *const c_void, recv as *mut c_void);
        let (f32_, comm, stream) =
            (sys::ncclDataType_t::ncclFloat32, self.comm.0, self.stream.cu_stream() as sys::cudaStream_t);
        let sum = sys::ncclRedOp_t::ncclSum;
        // SAFETY: the pointers come from cudarc buffers of our context whose lengths the caller
        // checked against `count` (and world_size·count where NCCL reads or writes that much).
        let r = unsafe {
            match op {
                Op::AllReduceSum => nccl::all_reduce(src, dst, count, f32_, sum, comm, stream),
                Op::ReduceScatterSum => nccl::reduce_scatter(src, dst, count, f32_, sum, comm, stream),
                Op::AllGather => nccl::all_gather(src, dst, count, f32_, comm, stream),
                Op::Broadcast => nccl::broadcast(src, dst, count, f32_, root as i32, comm, stream),
                // Not data collectives: no caller passes them.
                Op::AllReduceSumF64 | Op::Barrier | Op::Init => {
                    self.end_job(format!("{} is not an NCCL data collective", op.name()), FAILURE_EXIT_CODE)
                }
            }
        };
        if let Err(e) = r {
            self.end_job(format!("NCCL {} failed: {}", op.name(), nccl_error_text(comm, e.0)), FAILURE_EXIT_CODE);
        }
    }

    fn wait(&self, st: &State, op: Op, started: Instant) {
        self.wait_for(&st.done, op, started)
    }

    /// Waits until the work enqueued so far on our stream has finished: records `done` and polls
    /// it (see the module doc), checking NCCL's asynchronous error and the watchdog's deadline.
    fn wait_for(&self, done: &CudaEvent, op: Op, started: Instant) {
        if let Err(e) = done.record(&self.stream) {
            self.end_job(format!("{}: recording a CUDA event failed: {e}", op.name()), FAILURE_EXIT_CODE);
        }
        let mut polls = 0u32;
        loop {
            match done.try_is_complete() {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    self.end_job(format!("{}: CUDA error while waiting for NCCL: {e}", op.name()), FAILURE_EXIT_CODE)
                }
            }
            let mut async_error = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator and a valid out pointer.
            let queried = unsafe { sys::ncclCommGetAsyncError(self.comm.0, &mut async_error) };
            for code in [queried, async_error] {
                if code != sys::ncclResult_t::ncclSuccess && code != sys::ncclResult_t::ncclInProgress {
                    self.end_job(
                        format!("NCCL {} failed: {}", op.name(), nccl_error_text(self.comm.0, code)),
                        FAILURE_EXIT_CODE,
                    );
                }
            }
            let waited = started.elapsed();
            if let Some(t) = self.timeout {
                if waited > t {
                    self.end_job(
                        format!("NCCL {} did not finish within {} s; aborting the job", op.name(), t.as_secs_f64()),
                        WATCHDOG_EXIT_CODE,
                    );
                }
            }
            polls += 1;
            if polls <= SPIN_POLLS {
                std::thread::yield_now();
            } else {
                std::thread::sleep((waited / 16).clamp(MIN_POLL_SLEEP, MAX_POLL_SLEEP));
            }
        }
    }

    /// Prints `rank R: <msg>` (with "; aborting the job" unless `msg` says so), aborts the NCCL
    /// communicator (stopping its kernels) and ends the whole job through the bootstrap.
    fn end_job(&self, msg: String, code: i32) -> ! {
        let tail = if msg.ends_with("aborting the job") { "" } else { "; aborting the job" };
        let _ = writeln!(std::io::stderr(), "rank {}: {msg}{tail}", self.rank);
        // SAFETY: a live communicator; the job ends below, so it is never used (or dropped) again.
        unsafe {
            sys::ncclCommAbort(self.comm.0);
        }
        self.end_process(code)
    }

    /// Host-path helper: makes `slot` a device buffer of at least `len` f32 (kept for reuse).
    fn scratch(&self, slot: &mut Option<CudaSlice<f32>>, len: usize) -> Option<CommError> {
        if slot.as_ref().is_some_and(|s| s.len() >= len) || len == 0 {
            return None;
        }
        *slot = None; // free the old one first
                      // SAFETY: every element is written (htod or by NCCL) before it is read.
        match unsafe { self.stream.alloc::<f32>(len) } {
            Ok(s) => {
                *slot = Some(s);
                None
            }
            Err(e) => Some(cuda_error(self.rank, format!("cannot allocate {len} f32 of GPU scratch"), e)),
        }
    }

    /// Host-path helper: a scratch buffer is missing after the agreement, which cannot happen
    /// (`scratch` allocates it or reports a problem, and the agreement fails on a problem). Ends
    /// the job rather than panic: the peers are already in the collective.
    fn no_scratch(&self, op: Op) -> ! {
        let msg = format!("{}: the GPU scratch buffer is missing after the length check", op.name());
        self.end_job(msg, FAILURE_EXIT_CODE)
    }

    /// Host-path helper: `host` into the first `host.len()` elements of `dev`.
    fn upload(&self, op: Op, host: &[f32], dev: &mut CudaSlice<f32>) {
        if let Err(e) = self.stream.memcpy_htod(host, &mut dev.slice_mut(..host.len())) {
            self.end_job(format!("{}: copy to the GPU failed: {e}", op.name()), FAILURE_EXIT_CODE);
        }
    }

    /// Host-path helper: the first `host.len()` elements of `dev` into `host` (after `wait`).
    fn download(&self, op: Op, dev: &CudaSlice<f32>, host: &mut [f32]) {
        if let Err(e) = self.stream.memcpy_dtoh(&dev.slice(..host.len()), host) {
            self.end_job(format!("{}: copy from the GPU failed: {e}", op.name()), FAILURE_EXIT_CODE);
        }
    }

    /// The host path of all-reduce and broadcast: in place on the `input` scratch.
    fn host_in_place(&self, op: Op, buf: &mut [f32], root: usize) -> Result<()> {
        let started = Instant::now();
        let mut guard = self.lock();
        let st = &mut *guard;
        let problem = self.scratch(&mut st.input, buf.len());
        self.agree(st, op, buf.len(), root, problem, started)?;
        if buf.is_empty() {
            return Ok(());
        }
        let Some(dev) = st.input.as_mut() else { self.no_scratch(op) };
        self.upload(op, buf, dev);
        {
            let mut view = dev.slice_mut(..buf.len());
            let (ptr, _record) = view.device_ptr_mut(&self.stream);
            self.enqueue_rooted(op, root, ptr, ptr, buf.len());
        }
        self.wait_for(&st.done, op, started);
        self.download(op, dev, buf);
        Ok(())
    }

    /// The host path of reduce-scatter and all-gather: `send` via the `input` scratch, the
    /// result via `output`. `block` is the agreed length.
    fn host_sharded(
        &self,
        op: Op,
        send: &[f32],
        recv: &mut [f32],
        block: usize,
        problem: Option<CommError>,
    ) -> Result<()> {
        let started = Instant::now();
        let mut guard = self.lock();
        let st = &mut *guard;
        let problem = problem
            .or_else(|| self.scratch(&mut st.input, send.len()))
            .or_else(|| self.scratch(&mut st.output, recv.len()));
        self.agree(st, op, block, 0, problem, started)?;
        if block == 0 {
            return Ok(());
        }
        let (Some(input), Some(output)) = (st.input.as_mut(), st.output.as_mut()) else { self.no_scratch(op) };
        self.upload(op, send, input);
        {
            let src_view = input.slice(..send.len());
            let mut dst_view = output.slice_mut(..recv.len());
            let (src, _record_src) = src_view.device_ptr(&self.stream);
            let (dst, _record_dst) = dst_view.device_ptr_mut(&self.stream);
            self.enqueue(op, src, dst, block);
        }
        self.wait_for(&st.done, op, started);
        self.download(op, output, recv);
        Ok(())
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // No collective of ours is in flight (each waited for completion); abort never waits for
        // peers. See the module doc.
        let _ = self.ctx.bind_to_thread();
        // SAFETY: a live communicator, used by no one after this.
        unsafe {
            sys::ncclCommAbort(self.comm.0);
        }
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    /// Compatibility path: host → device scratch → NCCL → host. The trainer's GPU path calls
    /// `all_reduce_sum_device` instead.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.host_in_place(Op::AllReduceSum, buf, 0)
    }
    /// Through the bootstrap (a scalar is not worth a device round trip).
    fn all_reduce_sum_f64(&self, x: f64) -> Result<f64> {
        self.owned_bootstrap(Op::AllReduceSumF64)?.all_reduce_sum_f64(x)
    }
    /// Compatibility path through device scratch, like `all_reduce_sum`.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.host_in_place(Op::Broadcast, buf, root)
    }
    /// Through the bootstrap.
    fn barrier(&self) -> Result<()> {
        self.owned_bootstrap(Op::Barrier)?.barrier()
    }
    /// Compatibility path through device scratch; the GPU path is `reduce_scatter_sum_device`.
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let problem = crate::check_blocks(self, send.len(), recv.len()).err();
        let block = recv.len();
        self.host_sharded(Op::ReduceScatterSum, send, recv, block, problem)
    }
    /// Compatibility path through device scratch; the GPU path is `all_gather_device`.
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let problem = crate::check_blocks(self, recv.len(), send.len()).err();
        self.host_sharded(Op::AllGather, send, recv, send.len(), problem)
    }
    /// Through the bootstrap: `MPI_Abort` under MPI, the end of this process for
    /// `SingleProcess`. No NCCL work of ours is in flight outside a collective call.
    fn abort(&self, code: i32) -> ! {
        self.end_process(code)
    }
    fn collective_timeout(&self) -> Option<Duration> {
        self.timeout
    }
    fn name(&self) -> &'static str {
        "nccl"
    }
}

// ---- self-check -----------------------------------------------------------------------------
//
// The correctness checks and the bus-bandwidth timing of a communicator, as a library function so
// that `examples/nccl_smoke.rs` (any number of ranks under mpirun) and `kutta bench nccl` (the
// one binary `scripts/gpu-check` carries to the GPU machine) run the same code.

/// What [`self_check`] measured. The time is the slowest rank's (the collective's time).
#[derive(Clone, Debug)]
pub struct SelfCheck {
    pub world_size: usize,
    /// This rank's GPU ordinal and name.
    pub device_ordinal: usize,
    pub device: String,
    /// `ncclGetVersion`, as (major, minor, patch).
    pub nccl_version: Option<(u32, u32, u32)>,
    /// The timed all-reduce: `mib` MiB of f32, `iters` calls after 3 warm-up calls.
    pub mib: usize,
    pub iters: usize,
    pub seconds_per_call: f64,
    /// Bytes / time (nccl-tests' algbw), GB/s.
    pub algbw_gb_per_s: f64,
    /// algbw · 2(n−1)/n (nccl-tests' busbw; 0 on one rank, where nothing crosses a link), GB/s.
    pub busbw_gb_per_s: f64,
}

impl SelfCheck {
    /// One line: checks passed, the all-reduce time and bandwidths.
    pub fn describe(&self) -> String {
        let version = self.nccl_version.map_or_else(|| "?".into(), |(a, b, c)| format!("{a}.{b}.{c}"));
        format!(
            "all_reduce_sum_device {} MiB × {} on {} rank(s): {:.3} ms per call, algbw {:.2} GB/s, busbw {:.2} GB/s (NCCL {version})",
            self.mib,
            self.iters,
            self.world_size,
            self.seconds_per_call * 1e3,
            self.algbw_gb_per_s,
            self.busbw_gb_per_s
        )
    }
}

/// Every correctness check of `comm` ([`check_collectives`]), then `iters` timed in-place
/// all-reduces of `mib` MiB ([`all_reduce_seconds`]), then the slowest rank's time. Collective:
/// every rank of the world must call it. On `Err` in a world of more than one rank the caller
/// must end the job (`comm.abort`): peers may be waiting in a collective this rank left.
pub fn self_check(comm: &NcclComm, mib: usize, iters: usize) -> std::result::Result<SelfCheck, String> {
    if mib == 0 || iters == 0 {
        return Err("the all-reduce size (MiB) and the iteration count must be positive".into());
    }
    check_collectives(comm)?;
    let per_call = all_reduce_seconds(comm, mib, iters)?;
    let n = comm.world_size();
    // The slowest rank's time is the collective's time.
    let mut times = vec![0.0f32; n];
    times[comm.rank()] = per_call as f32;
    comm.all_reduce_sum(&mut times).map_err(|e| e.to_string())?;
    let slowest = times.into_iter().fold(0.0f32, f32::max) as f64;
    let algbw = (mib << 20) as f64 / slowest / 1e9;
    Ok(SelfCheck {
        world_size: n,
        device_ordinal: comm.device_ordinal(),
        device: comm.context().name().unwrap_or_else(|_| "?".into()),
        nccl_version: nccl_version(),
        mib,
        iters,
        seconds_per_call: slowest,
        algbw_gb_per_s: algbw,
        busbw_gb_per_s: algbw * 2.0 * (n as f64 - 1.0) / n as f64,
    })
}

/// Uniform values in [-1, 1), the same sequence for the same `seed` on every rank.
fn check_random(seed: u64, len: usize) -> Vec<f32> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (seed + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

fn check_upload(s: &Arc<CudaStream>, host: &[f32]) -> std::result::Result<CudaSlice<f32>, String> {
    s.clone_htod(host).map_err(|e| format!("copy to the GPU: {e}"))
}

fn check_download(s: &Arc<CudaStream>, dev: &CudaSlice<f32>) -> std::result::Result<Vec<f32>, String> {
    s.clone_dtoh(dev).map_err(|e| format!("copy from the GPU: {e}"))
}

/// The first element where `got` differs from `want(i)`, as a message.
fn check_mismatch(what: &str, got: &[f32], want: impl Fn(usize) -> f32) -> std::result::Result<(), String> {
    match (0..got.len()).find(|&i| got[i] != want(i)) {
        Some(i) => Err(format!("{what}: element {i} is {}, want {}", got[i], want(i))),
        None => Ok(()),
    }
}

/// All correctness checks, in an order identical on every rank (each one is a collective): every
/// device collective against closed-form values, all-reduce of random data against a recomputed
/// sum with bit-identical results on every rank, the host-slice and scalar paths, and (on more
/// than one rank) disagreements that must be errors after which the communicator still works.
pub fn check_collectives(comm: &NcclComm) -> std::result::Result<(), String> {
    let (rank, n) = (comm.rank(), comm.world_size());
    let s = comm.stream().clone();
    let e = |e: CommError| e.to_string();
    if comm.name() != "nccl" {
        return Err("name() is not \"nccl\"".into());
    }
    let ranks_sum = (n * (n + 1) / 2) as f32;

    // Exact sums: small integers times 0.5, on the device.
    let len = 10_007;
    let mut buf = check_upload(&s, &(0..len).map(|i| (rank + 1) as f32 * (i % 1000) as f32 * 0.5).collect::<Vec<_>>())?;
    comm.all_reduce_sum_device(&mut buf).map_err(e)?;
    check_mismatch("all_reduce_sum_device", &check_download(&s, &buf)?, |i| ranks_sum * (i % 1000) as f32 * 0.5)?;

    // Random data: every rank's data is reproducible anywhere, so each rank recomputes the sum
    // (in its own order, hence a tolerance) and checks that all ranks hold the same bits.
    let mut noisy = check_upload(&s, &check_random(rank as u64, len))?;
    comm.all_reduce_sum_device(&mut noisy).map_err(e)?;
    let sums = check_download(&s, &noisy)?;
    let mut want = vec![0.0f64; len];
    for r in 0..n {
        for (w, x) in want.iter_mut().zip(check_random(r as u64, len)) {
            *w += x as f64;
        }
    }
    if let Some(i) = (0..len).find(|&i| (sums[i] as f64 - want[i]).abs() > 1e-5 * n as f64) {
        return Err(format!("all_reduce_sum_device of random data: element {i} is {}, want {}", sums[i], want[i]));
    }
    let mut rank0 = check_upload(&s, &sums)?;
    comm.broadcast_device(&mut rank0, 0).map_err(e)?;
    if check_download(&s, &rank0)?.iter().zip(&sums).any(|(a, b)| a.to_bits() != b.to_bits()) {
        return Err("all_reduce_sum_device of random data: sums differ from rank 0's in some bits".into());
    }

    // Reduce-scatter and all-gather on the device, with a block that is not a round number.
    let b = 1001;
    let send = check_upload(&s, &(0..n * b).map(|i| (rank + 1) as f32 * i as f32 * 0.5).collect::<Vec<_>>())?;
    let mut recv = s.alloc_zeros::<f32>(b).map_err(|e| e.to_string())?;
    comm.reduce_scatter_sum_device(&send, &mut recv).map_err(e)?;
    check_mismatch("reduce_scatter_sum_device", &check_download(&s, &recv)?, |i| {
        ranks_sum * (rank * b + i) as f32 * 0.5
    })?;
    let mine = check_upload(&s, &(0..b).map(|i| (rank * 10_000 + i) as f32).collect::<Vec<_>>())?;
    let mut all = s.alloc_zeros::<f32>(n * b).map_err(|e| e.to_string())?;
    comm.all_gather_device(&mine, &mut all).map_err(e)?;
    check_mismatch("all_gather_device", &check_download(&s, &all)?, |i| ((i / b) * 10_000 + i % b) as f32)?;

    // The host-slice path.
    let mut host: Vec<f32> = (0..len).map(|i| (rank + 1) as f32 * (i % 1000) as f32 * 0.5).collect();
    comm.all_reduce_sum(&mut host).map_err(e)?;
    check_mismatch("all_reduce_sum (host)", &host, |i| ranks_sum * (i % 1000) as f32 * 0.5)?;
    let send_host: Vec<f32> = (0..n * b).map(|i| (rank + 1) as f32 * i as f32 * 0.5).collect();
    let mut recv_host = vec![0.0f32; b];
    comm.reduce_scatter_sum(&send_host, &mut recv_host).map_err(e)?;
    check_mismatch("reduce_scatter_sum (host)", &recv_host, |i| ranks_sum * (rank * b + i) as f32 * 0.5)?;
    let mut all_host = vec![0.0f32; n * b];
    comm.all_gather(&(0..b).map(|i| (rank * 10_000 + i) as f32).collect::<Vec<_>>(), &mut all_host).map_err(e)?;
    check_mismatch("all_gather (host)", &all_host, |i| ((i / b) * 10_000 + i % b) as f32)?;
    let root = n - 1;
    let mut bc: Vec<f32> = if rank == root { (0..len).map(|i| i as f32 - 3.25).collect() } else { vec![f32::NAN; len] };
    comm.broadcast(&mut bc, root).map_err(e)?;
    check_mismatch("broadcast (host)", &bc, |i| i as f32 - 3.25)?;

    // The scalar path (the bootstrap).
    let x = comm.all_reduce_sum_f64(rank as f64 + 0.25).map_err(e)?;
    let want_x = (n * (n - 1) / 2) as f64 + 0.25 * n as f64;
    if x != want_x {
        return Err(format!("all_reduce_sum_f64 is {x}, want {want_x}"));
    }

    // Disagreements are errors on every rank, and the communicator stays usable after them.
    if n > 1 {
        let mut uneven = s.alloc_zeros::<f32>(if rank == 0 { 3 } else { 4 }).map_err(|e| e.to_string())?;
        if comm.all_reduce_sum_device(&mut uneven).is_ok() {
            return Err("all_reduce_sum_device with lengths differing across ranks succeeded".into());
        }
        let mut bad_recv = s.alloc_zeros::<f32>(if rank == 0 { b + 1 } else { b }).map_err(|e| e.to_string())?;
        if comm.reduce_scatter_sum_device(&send, &mut bad_recv).is_ok() {
            return Err("reduce_scatter_sum_device with a bad block on rank 0 succeeded".into());
        }
    }
    if comm.broadcast(&mut [0.0f32; 2], n).is_ok() {
        return Err("broadcast from a rank outside the world succeeded".into());
    }
    comm.barrier().map_err(e)?;
    if comm.all_reduce_sum_f64(1.0).map_err(e)? != n as f64 {
        return Err("all_reduce_sum_f64 after the error paths is wrong".into());
    }
    let mut again = check_upload(&s, &[1.0, 2.0])?;
    comm.all_reduce_sum_device(&mut again).map_err(e)?;
    check_mismatch("all_reduce_sum_device after the error paths", &check_download(&s, &again)?, |i| {
        (i + 1) as f32 * n as f32
    })?;
    Ok(())
}

/// Times `iters` in-place all-reduces of `mib` MiB (after 3 warm-up calls), then checks one
/// all-reduce of that size exactly. Returns this rank's seconds per all-reduce.
pub fn all_reduce_seconds(comm: &NcclComm, mib: usize, iters: usize) -> std::result::Result<f64, String> {
    let (rank, n) = (comm.rank(), comm.world_size());
    let s = comm.stream().clone();
    let len = mib << 18; // f32 per MiB
    let e = |e: CommError| e.to_string();
    let mut buf = s.alloc_zeros::<f32>(len).map_err(|e| format!("cannot allocate {mib} MiB on the GPU: {e}"))?;
    for _ in 0..3 {
        comm.all_reduce_sum_device(&mut buf).map_err(e)?;
    }
    comm.barrier().map_err(e)?;
    let start = Instant::now();
    for _ in 0..iters {
        comm.all_reduce_sum_device(&mut buf).map_err(e)?;
    }
    let per_call = start.elapsed().as_secs_f64() / iters.max(1) as f64;
    // Exact check of the large buffer: (rank + 1) · (i mod 1024) sums to n(n+1)/2 · (i mod 1024).
    let pattern: Vec<f32> = (0..len).map(|i| (rank + 1) as f32 * (i % 1024) as f32).collect();
    s.memcpy_htod(&pattern, &mut buf).map_err(|e| format!("copy to the GPU: {e}"))?;
    comm.all_reduce_sum_device(&mut buf).map_err(e)?;
    let ranks_sum = (n * (n + 1) / 2) as f32;
    check_mismatch(&format!("all_reduce_sum_device of {mib} MiB"), &check_download(&s, &buf)?, |i| {
        ranks_sum * (i % 1024) as f32
    })?;
    Ok(per_call)
}
