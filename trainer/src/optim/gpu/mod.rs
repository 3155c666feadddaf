//! `GpuRk`: the RK solver with θ, its stage buffers and its state on the GPU (feature `cuda`).
//!
//! `RkSolver<f32, Arc<RkKernels>>` does the step; this wrapper fits it to the trainer's
//! `Optimizer` interface, whose θ is a host slice. θ is uploaded once (the first step, or after
//! `load_state`) and then stays on the device: a step reads θ_n there, every stage gradient comes
//! from the field's device evaluation (`VectorField::on_device`, NCCL-all-reduced across ranks)
//! and θ_{n+1} is written there. The host θ is therefore stale after `step` until `sync_theta`
//! downloads it (with G and m for `state`), which the trainer does before every evaluation,
//! checkpoint and at the end. Nothing but the loss and a few scalars crosses to the host per step.

pub mod backend;
pub mod check;

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::field::VectorField;
use crate::kernels::cuda::{DeviceBuf, RkKernels};
use crate::kernels::MAX_STAGES;
use crate::optim::arith::Arith;
use crate::optim::rk::{RkOptions, RkSolver};
use crate::optim::{Optimizer, OptimizerState, StepReport};

pub struct GpuRk {
    solver: RkSolver<f32, Arc<RkKernels>>,
    /// θ on the device; None until the first step (or after `load_state`) uploads it.
    theta: Option<DeviceBuf>,
    /// G and m as of the last `sync_theta`, for `state`.
    synced: Option<OptimizerState<f32>>,
}

impl GpuRk {
    pub fn new(opts: RkOptions, kernels: Arc<RkKernels>) -> Result<Self> {
        let s = opts.tableau.stages();
        if s > MAX_STAGES + 1 {
            return Err(Error::config(
                "optimizer.tableau",
                format!("`{}` has {s} stages; the GPU kernels combine at most {MAX_STAGES} stage gradients per stage point ({} stages): set train.device = \"cpu\"", opts.tableau.name, MAX_STAGES + 1),
            ));
        }
        Ok(Self { solver: RkSolver::with_backend(opts, kernels)?, theta: None, synced: None })
    }
}

impl Optimizer<f32> for GpuRk {
    fn name(&self) -> String {
        // The same name as the host solver: checkpoints resume across devices.
        format!("rk({})", self.solver.options().tableau.name)
    }

    fn step(&mut self, step: u64, theta: &mut [f32], field: &mut dyn VectorField<f32>) -> Result<StepReport> {
        let dev = field.on_device().ok_or_else(|| {
            Error::internal("the RK solver runs on the GPU, but the gradient field evaluates on the host (ShardedField::use_gpu was not called)")
        })?;
        let theta_dev = match &mut self.theta {
            Some(t) => t,
            none => none.insert(self.solver.backend().upload(theta)?),
        };
        self.synced = None;
        self.solver.step_on(step, theta_dev, dev)
    }

    fn state(&self) -> Result<OptimizerState<f32>> {
        match &self.synced {
            Some(st) => Ok(st.clone()),
            // The trainer syncs first; this is the fallback for other callers.
            None => self.solver.state_on_host(),
        }
    }

    fn load_state(&mut self, state: &OptimizerState<f32>) -> Result<()> {
        self.solver.load_state_from_host(state)?;
        // θ comes with the state (a checkpoint): take the host θ at the next step.
        self.theta = None;
        self.synced = None;
        Ok(())
    }

    fn sync_theta(&mut self, theta: &mut [f32]) -> Result<()> {
        if let Some(t) = &self.theta {
            if t.len() != theta.len() {
                return Err(Error::internal(format!(
                    "θ on the GPU has {} entries, the host buffer {}",
                    t.len(),
                    theta.len()
                )));
            }
            self.solver.backend().stream().memcpy_dtoh(t, theta).map_err(|e| {
                Error::from(crate::kernels::cuda::KernelError::from(e)).context("copying θ from the GPU")
            })?;
        }
        self.synced = Some(self.solver.state_on_host()?);
        Ok(())
    }
}
