//! Collective communication for data-parallel training: one `Communicator` trait and one file
//! per back end: `single` (one process; every collective is the identity), `local` (ranks as
//! threads of one process, for tests), `mpi` (one rank per process, behind the `mpi` feature).
//! NCCL behind the `cuda` feature (`nccl`). `rendezvous` (how a process joins its world) sits on
//! top of the back ends; what they need of it themselves lives below them: `launcher` (where
//! mpirun/srun put this process) and `nccl_id` (how an NCCL id travels over a bootstrap
//! communicator). `rendezvous::connect` is the one entry point a binary needs.
//!
//! Invariant every back end keeps: after `all_reduce_sum`, every rank holds bit-identical
//! buffers, so every rank forms the same RK stage points (SPEC §5).

mod launcher;
pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;
mod nccl_id;
pub mod rendezvous;
pub mod single;

pub use local::LocalGroup;
#[cfg(feature = "mpi")]
pub use crate::mpi::MpiComm;
#[cfg(feature = "cuda")]
pub use crate::nccl::NcclComm;
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
        return Err(CommError::Failed {
            rank: comm.rank(),
            msg: format!("a sharded collective needs {} × {block} elements, got {whole}", comm.world_size()),
        });
    }
    Ok(())
}
