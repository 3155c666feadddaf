//! `optim::gpu` in a build without the `cuda` feature: the same names as `gpu/mod.rs`. `GpuRk`
//! needs kernels (`kernels::cuda::RkKernels`), of which a build without CUDA has none, so no
//! value of it can exist and every method body is unreachable.

use std::sync::Arc;

use crate::error::Result;
use crate::field::VectorField;
use crate::kernels::cuda::RkKernels;
use crate::optim::rk::RkOptions;
use crate::optim::{Optimizer, OptimizerState, StepReport};

/// The RK solver on the GPU: no values without CUDA.
pub enum GpuRk {}

impl GpuRk {
    pub fn new(opts: RkOptions, kernels: Arc<RkKernels>) -> Result<Self> {
        let _ = opts;
        match *kernels {}
    }
}

impl Optimizer<f32> for GpuRk {
    fn name(&self) -> String {
        match *self {}
    }
    fn step(&mut self, _: u64, _: &mut [f32], _: &mut dyn VectorField<f32>) -> Result<StepReport> {
        match *self {}
    }
    fn state(&self) -> Result<OptimizerState<f32>> {
        match *self {}
    }
    fn load_state(&mut self, _: &OptimizerState<f32>) -> Result<()> {
        match *self {}
    }
}
