//! Collective communication for data-parallel training: one `Communicator` trait and one file
//! per back end: `single` (one process; every collective is the identity), `local` (ranks as
//! threads of one process, for tests). MPI and NCCL
//! back ends arrive behind the `mpi` and `cuda` features; rendezvous (how ranks find each other,
//! how an NCCL id travels) will live apart from the collectives themselves.
//!
//! Invariant every back end keeps: after `all_reduce_sum`, every rank holds bit-identical
//! buffers, so every rank forms the same RK stage points (SPEC §5).

pub mod local;
pub mod single;

pub use local::LocalGroup;
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
}
