//! Optimizers: the Runge-Kutta solver of the gradient flow (`rk`) and the Euler-type baselines
//! (`baselines`). All of them work on the same flat buffers (one `ParamLayout`) and pull their
//! gradients from a `VectorField`, so a baseline and an RK method see exactly the same oracle.
//!
//! Contract shared by every implementation:
//! - `step` either commits a finite θ_{n+1} together with the optimizer state, or returns an
//!   error and leaves θ and the state exactly as they were (non-finite values never corrupt the
//!   state; the trainer then stops with its last good checkpoint intact).
//! - `state`/`load_state` round-trip everything a step reads, bit for bit, so a resumed run is
//!   bit-identical to an uninterrupted one.

pub mod arith;
pub mod baselines;
/// The RK solver on the GPU (feature `cuda`); without the feature a stub whose `GpuRk` cannot
/// be built (it needs kernels, which do not exist then).
#[cfg(feature = "cuda")]
pub mod gpu;
#[cfg(not(feature = "cuda"))]
#[path = "gpu_stub.rs"]
pub mod gpu;
pub mod rk;
pub mod step_size;

use crate::error::Result;
use crate::field::VectorField;
use crate::scalar::Scalar;

/// What one step did, for the metrics log.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepReport {
    /// L_B(θ_n): the loss at the first stage (free, SPEC §1).
    pub loss: f64,
    /// The step size (learning rate) of the accepted update.
    pub h: f64,
    /// Gradient evaluations this step spent, including probes and rejected attempts.
    pub grad_evals: u64,
    /// DALR's estimate v = ‖J_f f‖/‖f‖ when DALR is in use.
    pub dalr_v: Option<f64>,
    /// Error-controlled steps: the accepted step's scaled error estimate (≤ 1).
    pub error_estimate: Option<f64>,
    /// Error-controlled steps: attempts rejected before acceptance.
    pub rejected: u32,
    /// Attempts redone with a smaller h because a value became NaN/Inf.
    pub nonfinite_retries: u32,
}

/// A snapshot of an optimizer's state: named flat buffers (layout of θ) and scalars.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OptimizerState<F = f32> {
    pub buffers: Vec<(String, Vec<F>)>,
    pub scalars: serde_json::Map<String, serde_json::Value>,
}

impl<F: Clone> OptimizerState<F> {
    pub fn buffer(&self, name: &str) -> Option<&Vec<F>> {
        self.buffers.iter().find(|(n, _)| n == name).map(|(_, b)| b)
    }
}

pub trait Optimizer<F: Scalar = f32> {
    /// Short description for logs and the summary, e.g. `rk(rk4)` or `adam`.
    fn name(&self) -> String;
    /// Take optimizer step `step` (0-based n; schedules and bias corrections use it) in place.
    fn step(&mut self, step: u64, theta: &mut [F], field: &mut dyn VectorField<F>) -> Result<StepReport>;
    /// Everything a step reads, for a checkpoint. Fails only where the state must first be
    /// copied from a device (the GPU solver).
    fn state(&self) -> Result<OptimizerState<F>>;
    fn load_state(&mut self, state: &OptimizerState<F>) -> Result<()>;
    /// Bring θ to the host. An optimizer that keeps θ and its state on a GPU between steps
    /// (the RK solver on the `cuda` back end) leaves the host θ stale after `step` and writes it
    /// here; the trainer calls this before it reads θ (evaluation, checkpoint, the final model)
    /// and before `state`. Host optimizers have nothing to do.
    fn sync_theta(&mut self, theta: &mut [F]) -> Result<()> {
        let _ = theta;
        Ok(())
    }
    /// Set the learning rate of the next step. The baselines use it for schedules applied from
    /// outside; the RK solver schedules h itself (SPEC §3-4): for it this is an error.
    fn set_lr(&mut self, lr: f64) -> Result<()> {
        let _ = lr;
        Err(crate::error::Error::optimizer(format!(
            "{} schedules its own step size; its learning rate cannot be set from outside",
            self.name()
        )))
    }
}
