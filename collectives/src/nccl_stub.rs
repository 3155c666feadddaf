//! `nccl` in a build without the `cuda` feature: the same names as `nccl.rs`, so that callers
//! read the same with and without the feature. `NcclComm::joined` fails with "built without
//! CUDA"; no `NcclComm` value can exist, so its collectives are unreachable.

use std::time::Duration;

use crate::{CommError, Communicator, Result};

/// An NCCL communicator: no values without CUDA.
pub enum NcclComm {}

/// Always an error: this build has no GPUs to pick from.
pub fn pick_device(rank: usize, local_rank: Option<usize>) -> Result<usize> {
    let _ = local_rank;
    Err(CommError::NcclNotBuilt { rank })
}

impl NcclComm {
    /// Always an error: this build has no NCCL.
    pub fn new(bootstrap: Box<dyn Communicator>, device_ordinal: usize, timeout: Option<Duration>) -> Result<NcclComm> {
        let _ = (device_ordinal, timeout);
        Err(CommError::NcclNotBuilt { rank: bootstrap.rank() })
    }

    /// Always an error: this build has no NCCL. `stream` stands for the CUDA stream the real one
    /// takes.
    pub fn joined<S>(bootstrap: &dyn Communicator, stream: S, timeout: Option<Duration>) -> Result<NcclComm> {
        let _ = (stream, timeout);
        Err(CommError::NcclNotBuilt { rank: bootstrap.rank() })
    }

    /// Unreachable: no `NcclComm` exists without CUDA.
    pub fn all_reduce_sum_device<B>(&self, buf: &mut B) -> Result<()> {
        let _ = buf;
        match *self {}
    }
}
