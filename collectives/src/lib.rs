//! Collective communication for data-parallel training: one `Communicator` trait and one file
//! per back end: `single` (one process; every collective is the identity), `local` (ranks as
//! threads of one process, for tests), `mpi` (one rank per process, behind the `mpi` feature).
//! NCCL arrives behind the `cuda` feature. Rendezvous (how a process learns its world from its
//! launcher, and later how an NCCL id travels) lives in `rendezvous`, apart from the collectives;
//! `rendezvous::connect` is the one entry point a binary needs.
//!
//! Invariant every back end keeps: after `all_reduce_sum`, every rank holds bit-identical
//! buffers, so every rank forms the same RK stage points (SPEC §5).

pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod rendezvous;
pub mod single;

pub use local::LocalGroup;
#[cfg(feature = "mpi")]
pub use crate::mpi::MpiComm;
pub use rendezvous::connect;
pub use single::SingleProcess;

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("rank {rank}: {msg}")]
    Failed { rank: usize, msg: String },
    #[error("collective timed out after {seconds} s on rank {rank}")]
    Timeout { rank: usize, seconds: f64 },
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
    /// The back end, for logs: "mpi" for `MpiComm`. The default is the implementing type's short
    /// name (`SingleProcess`, `LocalGroup`) until a back end overrides it.
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
    fn is_writer(&self) -> bool {
        (**self).is_writer()
    }
    fn abort(&self, code: i32) -> ! {
        (**self).abort(code)
    }
    fn name(&self) -> &'static str {
        (**self).name()
    }
}
