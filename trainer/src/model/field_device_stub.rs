//! `ModelField::eval_device` in a build without the `cuda` feature: the same names as
//! `field_device.rs`. It takes RK kernels and device buffers, of which such a build has none
//! (`kernels::cuda_stub`), so it can never be called.

use super::ModelField;
use crate::error::Result;
use crate::kernels::cuda::{DeviceBuf, RkKernels};

/// The device parameters: no values without CUDA.
pub(super) enum DeviceParams {}

impl ModelField<'_> {
    /// Unreachable without CUDA: there are no kernels to pass.
    pub fn eval_device(&mut self, kernels: &RkKernels, theta: &DeviceBuf, grad: &mut DeviceBuf) -> Result<f64> {
        let _ = (theta, grad);
        match *kernels {}
    }
}
