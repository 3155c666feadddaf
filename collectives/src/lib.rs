//! Collective communication for data-parallel training: one `Communicator` trait and one file
//! per back end: `single` (one process; every collective is the identity), `local` (ranks as
//! threads of one process, for tests), `mpi` (one rank per process, feature `mpi`) and `nccl`
//! (one rank per process and GPU, feature `cuda`: NCCL moves device buffers, and a *bootstrap*
//! communicator, MPI or single-process, carries its unique id and the host-side scalars).
//! `rendezvous::connect` is the one entry point a binary needs (`rendezvous::connect_nccl` for
//! NCCL).
//!
//! Invariant every back end keeps: after `all_reduce_sum`, every rank holds bit-identical
//! buffers, so every rank forms the same RK stage points (SPEC §5).
//!
//! Layers. A module uses only modules of lower layers (and every module uses `lib.rs`); nothing
//! calls upward, so each layer can be read, and tested, without the ones above it:
//!
//! ```text
//! layer  module      uses                                  what it is
//! 3      rendezvous  launcher nccl_id single mpi nccl      connect, connect_nccl: pick the back end, join it
//! 2      mpi         launcher watchdog                     MpiComm (feature `mpi`)
//! 2      nccl        watchdog nccl_id                      NcclComm (feature `cuda`), its self-check;
//!                                                          without the feature `nccl_stub.rs`: the same
//!                                                          names, `NcclComm` has no values
//! 2      local       watchdog                              LocalGroup: ranks as threads, for tests
//! 1      watchdog    -                                     agreement before data moves; time limit per call
//! 1      launcher    -                                     where mpirun/PMI/PMIx/srun put this process
//! 1      nccl_id     -                                     the NCCL unique id over a bootstrap communicator
//! 1      single      -                                     SingleProcess
//! 0      lib.rs      -                                     Communicator, CommError, Result, check_blocks
//! ```
//!
//! `launcher`, `nccl_id` and `watchdog` are private: `rendezvous` re-exports the public items of
//! the first two (`launched_world`, `local_rank`, `broadcast_nccl_id`, ...), and `mpi` and `nccl`
//! re-export `WATCHDOG_EXIT_CODE`. Besides its own definitions, `lib.rs` only declares modules
//! and re-exports their types; it calls into none of them.
//!
//! Errors. Every failure a communicator or its constructor reports is a `CommError` variant
//! (only the NCCL diagnostics for a binary, `nccl::device_count` and `nccl::self_check`, report
//! a `String`). A failure after the ranks agreed to run a collective (an MPI or NCCL error in
//! flight, a call past its time limit) is not returned: it ends the whole job, since the peers
//! would otherwise wait forever (`watchdog`).

mod launcher;
pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;
#[cfg(not(feature = "cuda"))]
#[path = "nccl_stub.rs"]
pub mod nccl;
mod nccl_id;
pub mod rendezvous;
pub mod single;
mod watchdog;

#[cfg(feature = "mpi")]
pub use crate::mpi::MpiComm;
pub use crate::nccl::NcclComm;
pub use local::LocalGroup;
pub use rendezvous::connect;
pub use single::SingleProcess;

/// Every failure a communicator reports, each naming the rank that reports it. The shape
/// variants come from the agreement every multi-rank back end runs before data moves (see
/// `watchdog`), so all ranks return them alike; the others from joining a world (launcher, MPI,
/// GPU, NCCL setup). Failures *after* the ranks agreed (an MPI or NCCL error in flight, a
/// collective that outlives its time limit) are not returned at all: they end the whole job,
/// because the peers would otherwise wait forever.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    // ---- the shape of a collective ----------------------------------------------------------
    /// The ranks passed buffers of different lengths (blocks, for reduce-scatter/all-gather).
    #[error("rank {rank}: {op} of {len} values on this rank, but the ranks passed between {lo} and {hi}")]
    LengthMismatch { rank: usize, op: &'static str, len: usize, lo: usize, hi: usize },
    /// `MpiComm::set_chunk_len` was not called alike on every rank.
    #[error(
        "rank {rank}: {op}: chunk lengths differ across ranks ({lo} to {hi}); call set_chunk_len alike on every rank"
    )]
    ChunkMismatch { rank: usize, op: &'static str, lo: usize, hi: usize },
    /// The ranks named different broadcast roots.
    #[error("rank {rank}: {op}: ranks name different roots ({lo} to {hi})")]
    RootMismatch { rank: usize, op: &'static str, lo: usize, hi: usize },
    /// The broadcast root is not a rank of the world.
    #[error("rank {rank}: {op} from rank {root} in a world of {world}")]
    RootOutsideWorld { rank: usize, op: &'static str, root: usize, world: usize },
    /// A reduce-scatter/all-gather pair that is not world_size blocks against one block.
    #[error("rank {rank}: a sharded collective needs {world} × {block} elements, got {whole}")]
    BlockMismatch { rank: usize, world: usize, block: usize, whole: usize },
    /// Another rank could not take part (its own buffers were wrong, or it lacked GPU memory),
    /// so no rank ran the collective. That rank returns its own error.
    #[error("rank {rank}: {op}: rank {peer} passed buffers it cannot use, so no rank runs it")]
    PeerCannotRun { rank: usize, op: &'static str, peer: usize },

    // ---- joining a world ----------------------------------------------------------------------
    /// A zero collective timeout (`None` is "no watchdog").
    #[error("rank {rank}: collective timeout must be positive")]
    ZeroTimeout { rank: usize },
    /// A watchdog thread could not be started.
    #[error("rank {rank}: cannot start the {thread} thread: {source}")]
    Thread {
        rank: usize,
        thread: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A launcher started this process as one rank of several, but the crate was built without
    /// the `mpi` feature. `size` is `None` when the launcher did not say it.
    #[error(
        "rank {rank}: launched as rank {rank} of {}, but this kutta was built without the `mpi` feature: \
         cargo build --release --features mpi",
        world_size_text(*.size)
    )]
    MpiNotBuilt { rank: usize, size: Option<usize> },
    /// `MpiComm::init` was called twice in one process.
    #[error("rank {rank}: MPI is already initialized in this process (create one MpiComm per process)")]
    MpiAlreadyInitialized { rank: usize },
    /// The launcher's variables and MPI disagree on this process's place in the world.
    #[error(
        "rank {rank}: {launcher} launched this process as rank {launched_rank}{}, but MPI sees rank {rank} of \
         {size}: is this kutta linked against the MPI that launched it?",
        launched_size.map_or_else(String::new, |n| format!(" of {n}"))
    )]
    LauncherMismatch {
        rank: usize,
        size: usize,
        launcher: &'static str,
        launched_rank: usize,
        launched_size: Option<usize>,
    },

    // ---- GPUs and NCCL (feature `cuda`) -------------------------------------------------------
    /// NCCL was asked of a kutta built without the `cuda` feature (`nccl_stub.rs`).
    #[error("rank {rank}: NCCL needs a kutta built with the `cuda` feature: cargo build --release --features cuda")]
    NcclNotBuilt { rank: usize },
    /// No CUDA device to put a rank on.
    #[error("rank {rank}: no CUDA device is visible (check CUDA_VISIBLE_DEVICES)")]
    NoGpu { rank: usize },
    /// A CUDA driver call failed before any data moved: `what` was being done, `detail` is the
    /// driver's message.
    #[error("rank {rank}: {what}: {detail}")]
    Cuda { rank: usize, what: String, detail: String },
    /// A device buffer on another GPU than the communicator's.
    #[error("rank {rank}: a buffer on GPU {buffer_gpu} passed to the NCCL communicator of GPU {comm_gpu}")]
    ForeignBuffer { rank: usize, buffer_gpu: usize, comm_gpu: usize },
    /// Some ranks could not set up their GPU, so no rank joins NCCL.
    #[error("rank {rank}: {failures} rank(s) could not set up their GPU; no rank joins NCCL")]
    PeerGpuSetup { rank: usize, failures: usize },
    /// NCCL counts ranks in an `int`.
    #[error("rank {rank}: NCCL cannot hold a world of {world} ranks")]
    WorldTooLarge { rank: usize, world: usize },
    /// An NCCL call that returns to its caller (id creation, a world-of-one init) failed.
    #[error("rank {rank}: {call} failed: {detail}")]
    Nccl { rank: usize, call: &'static str, detail: String },
    /// Rank 0 sent no NCCL unique id (creating it failed there).
    #[error("rank {rank}: rank 0 could not create the NCCL unique id, so no rank can join NCCL")]
    NoNcclId { rank: usize },
    /// Host-side work (`all_reduce_sum_f64`, `barrier`) asked of an `NcclComm::joined`
    /// communicator, which does not own the communicator it was joined over.
    #[error("rank {rank}: {op}: this NCCL communicator was joined over a communicator it does not own; call that one")]
    NotOwned { rank: usize, op: &'static str },
}

/// "4", or "an unknown number" when a launcher did not say the world size.
fn world_size_text(size: Option<usize>) -> String {
    size.map_or_else(|| "an unknown number".to_string(), |n| n.to_string())
}

pub type Result<T> = std::result::Result<T, CommError>;

pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum across ranks, in place; every rank ends with the same values.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Sum of one f64 across ranks (losses, counts).
    fn all_reduce_sum_f64(&self, x: f64) -> Result<f64>;
    /// Copy `root`'s buffer to every rank.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Reduce-scatter: `send` holds world_size equal blocks (length world_size·recv.len()); the
    /// element-wise sum over ranks of block `rank` lands in `recv`. With `all_gather` this is the
    /// sharded optimizer's pair (ZeRO): the same bytes on the wire as one all-reduce.
    /// The default goes through `all_reduce_sum` on a copy (twice the traffic); real back ends
    /// override it.
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_blocks(self, send.len(), recv.len())?;
        let mut all = send.to_vec();
        self.all_reduce_sum(&mut all)?;
        let b = recv.len();
        recv.copy_from_slice(&all[self.rank() * b..(self.rank() + 1) * b]);
        Ok(())
    }
    /// All-gather: every rank's `send` (equal lengths) concatenated in rank order into `recv`
    /// (length world_size·send.len()). The default sums zero-padded copies with `all_reduce_sum`
    /// (exact: x + 0 = x); real back ends override it.
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_blocks(self, recv.len(), send.len())?;
        let b = send.len();
        recv.iter_mut().for_each(|x| *x = 0.0);
        recv[self.rank() * b..(self.rank() + 1) * b].copy_from_slice(send);
        self.all_reduce_sum(recv)
    }
    /// True on the rank that writes files (rank 0).
    fn is_writer(&self) -> bool {
        self.rank() == 0
    }
    /// Ends the whole job, every rank, with exit code `code`; never returns. The binary's panic
    /// hook calls it, so a panic on one rank never leaves its peers waiting in a collective.
    /// Default: end this process, which is the whole job when there is one process (and, for
    /// `LocalGroup`, every thread-rank at once). MPI: `MPI_Abort` on the world.
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    /// The limit the back end's watchdog puts on one collective call, if it has one (MPI with
    /// `--collective-timeout`); a communicator joined next to this one (NCCL) takes the same.
    fn collective_timeout(&self) -> Option<std::time::Duration> {
        None
    }
    /// The back end, for logs: "single", "local", "mpi", "nccl" for this crate's back ends. The
    /// default, for communicators defined elsewhere, is the implementing type's short name.
    fn name(&self) -> &'static str {
        let full = std::any::type_name::<Self>();
        full.rsplit("::").next().unwrap_or(full)
    }
}

/// A boxed communicator (what `rendezvous::connect` returns) is a communicator.
impl<C: Communicator + ?Sized> Communicator for Box<C> {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        (**self).all_reduce_sum(buf)
    }
    fn all_reduce_sum_f64(&self, x: f64) -> Result<f64> {
        (**self).all_reduce_sum_f64(x)
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        (**self).broadcast(buf, root)
    }
    fn barrier(&self) -> Result<()> {
        (**self).barrier()
    }
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        (**self).reduce_scatter_sum(send, recv)
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        (**self).all_gather(send, recv)
    }
    fn is_writer(&self) -> bool {
        (**self).is_writer()
    }
    fn abort(&self, code: i32) -> ! {
        (**self).abort(code)
    }
    fn collective_timeout(&self) -> Option<std::time::Duration> {
        (**self).collective_timeout()
    }
    fn name(&self) -> &'static str {
        (**self).name()
    }
}

/// A reduce-scatter/all-gather buffer pair must be world_size blocks against one block.
pub fn check_blocks<C: Communicator + ?Sized>(comm: &C, whole: usize, block: usize) -> Result<()> {
    if whole != block * comm.world_size() {
        return Err(CommError::BlockMismatch { rank: comm.rank(), world: comm.world_size(), block, whole });
    }
    Ok(())
}
