//! Rendezvous: how a process joins its world, kept apart from the collectives (as c10d keeps
//! its stores apart from its process groups). `connect` is the one entry point a binary needs:
//! it reads where a launcher put this process (`launched_world`, from `launcher`) and joins the
//! matching back end, `MpiComm` under a launcher and `SingleProcess` otherwise. `connect_nccl`
//! (feature `cuda`) then joins NCCL over that communicator, whose broadcast carries the NCCL
//! unique id (`broadcast_nccl_id`, from `nccl_id`).
//!
//! This is the top layer of the crate: it uses the back ends, and no back end uses it. What the
//! back ends themselves need (the launcher's variables for `mpi`, the id exchange for `nccl`)
//! lives in the modules below, re-exported here under their public names.

pub use crate::launcher::{launched_world, launched_world_from, local_rank, local_rank_from};
pub use crate::nccl_id::{broadcast_nccl_id, NCCL_ID_BYTES};

use crate::launcher::{self, Launch};
use crate::{CommError, Communicator, Result, SingleProcess};
use std::time::Duration;

/// The communicator for this process: MPI when a launcher started it (and the `mpi` feature is
/// on), `SingleProcess` otherwise. A plain `kutta` run on a laptop never initializes MPI, even
/// when built with the feature. `timeout` arms the MPI collective watchdog (see `mpi.rs`).
pub fn connect(timeout: Option<Duration>) -> Result<Box<dyn Communicator>> {
    connect_from(launcher::launch(), timeout)
}

pub(crate) fn connect_from(launch: Option<Launch>, timeout: Option<Duration>) -> Result<Box<dyn Communicator>> {
    match launch {
        None => Ok(Box::new(SingleProcess)),
        Some(launch) => connect_launched(launch, timeout),
    }
}

#[cfg(not(feature = "mpi"))]
fn connect_launched(launch: Launch, _timeout: Option<Duration>) -> Result<Box<dyn Communicator>> {
    match launch.size {
        Some(1) => Ok(Box::new(SingleProcess)),
        // A bare PMIx rank 0 of unknown size is taken for a single process; its peers, if any,
        // have rank > 0 and fail here, and the launcher ends the job.
        None if launch.rank == 0 => Ok(Box::new(SingleProcess)),
        size => Err(CommError::MpiNotBuilt { rank: launch.rank, size }),
    }
}

#[cfg(feature = "mpi")]
fn connect_launched(launch: Launch, timeout: Option<Duration>) -> Result<Box<dyn Communicator>> {
    let comm = crate::MpiComm::init(timeout)?;
    let (rank, size) = (comm.rank(), comm.world_size());
    if rank != launch.rank || launch.size.is_some_and(|n| n != size) {
        return Err(CommError::LauncherMismatch {
            rank,
            size,
            launcher: launch.launcher,
            launched_rank: launch.rank,
            launched_size: launch.size,
        });
    }
    Ok(Box::new(comm))
}

/// An NCCL communicator for this process, bootstrapped over `connect(timeout)` (MPI under a
/// launcher, `SingleProcess` otherwise), on GPU `local_rank % device_count` (rank 0 of a
/// single-process run takes GPU 0). `timeout` arms both the MPI watchdog and NCCL's (see
/// `nccl.rs`).
pub fn connect_nccl(timeout: Option<Duration>) -> Result<crate::nccl::NcclComm> {
    let bootstrap = connect(timeout)?;
    let ordinal = crate::nccl::pick_device(bootstrap.rank(), local_rank())?;
    crate::nccl::NcclComm::new(bootstrap, ordinal, timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_launcher_connects_a_single_process_without_mpi() {
        let c = connect_from(None, None).unwrap();
        assert_eq!((c.rank(), c.world_size(), c.name()), (0, 1, SingleProcess.name()));
    }

    #[cfg(not(feature = "mpi"))]
    #[test]
    fn multi_rank_launch_without_the_mpi_feature_says_how_to_build() {
        let launch = Launch { launcher: "Open MPI", rank: 1, size: Some(4) };
        let msg = connect_from(Some(launch), None).err().expect("must fail").to_string();
        assert_eq!(
            msg,
            "rank 1: launched as rank 1 of 4, but this kutta was built without the `mpi` feature: \
             cargo build --release --features mpi"
        );
        let one = connect_from(Some(Launch { launcher: "Slurm", rank: 0, size: Some(1) }), None).unwrap();
        assert_eq!(one.world_size(), 1);
    }
}
