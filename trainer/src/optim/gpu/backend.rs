//! The RK solver's GPU back end (feature `cuda`): `optim::arith::Arith` on `Arc<RkKernels>`
//! (shared with the field that evaluates on the same stream), so `RkSolver<f32, Arc<RkKernels>>`
//! keeps k_1, the stage points, the accumulators, the stage gradients, G, m and D as
//! `CudaSlice<f32>` on the GPU and does every buffer operation of a step with the fused kernels
//! of `rk.cu` on the kernels' stream (which must be the model's stream, so the gradients the
//! model writes and the kernels that read them are ordered without events).
//!
//! Copies and fills use the driver (`memcpy_dtod`, `memset`), downloads and uploads happen only
//! for checkpoints and resuming. Each reduction returns its sum to the host, which synchronizes
//! the stream: per RK4 step that is one non-finite check per stage gradient, one for the update,
//! plus the norms DALR or error control need.

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use crate::error::Result;
use crate::kernels::cuda::{In, KernelError, RkKernels};
use crate::optim::arith::Arith;

fn drv(e: cudarc::driver::DriverError) -> crate::Error {
    KernelError::from(e).into()
}

fn opt(d: Option<&CudaSlice<f32>>) -> Option<In<'_>> {
    d.map(|d| d as In)
}

impl Arith<f32> for Arc<RkKernels> {
    type Buf = CudaSlice<f32>;
    type Owned = CudaSlice<f32>;

    fn alloc(&self, p: usize) -> Result<CudaSlice<f32>> {
        self.stream().alloc_zeros::<f32>(p).map_err(drv)
    }
    fn len(&self, b: &CudaSlice<f32>) -> usize {
        b.len()
    }
    fn copy(&self, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>) -> Result<()> {
        if dst.len() != src.len() {
            return Err(
                KernelError::Args(format!("copy of {} entries into a buffer of {}", src.len(), dst.len())).into()
            );
        }
        self.stream().memcpy_dtod(src, dst).map_err(drv)
    }
    fn zero(&self, b: &mut CudaSlice<f32>) -> Result<()> {
        self.stream().memset_zeros(b).map_err(drv)
    }
    fn stage_point(
        &self,
        x: &mut CudaSlice<f32>,
        theta: &CudaSlice<f32>,
        d: Option<&CudaSlice<f32>>,
        stages: &[(&CudaSlice<f32>, f32)],
        h: f32,
    ) -> Result<()> {
        let stages: Vec<(In, f32)> = stages.iter().map(|(k, a)| (*k as In, *a)).collect();
        Ok(RkKernels::stage_point(self, x, theta, opt(d), &stages, h)?)
    }
    fn accumulate(
        &self,
        acc: &mut CudaSlice<f32>,
        err: Option<&mut CudaSlice<f32>>,
        k: &CudaSlice<f32>,
        b: f32,
        e: f32,
    ) -> Result<()> {
        let err = err.map(|e| e as &mut dyn cudarc::driver::DevicePtrMut<f32>);
        Ok(RkKernels::accumulate(self, acc, err, k, b, e)?)
    }
    fn final_update(
        &self,
        x: &mut CudaSlice<f32>,
        theta: &CudaSlice<f32>,
        acc: &mut CudaSlice<f32>,
        m: Option<&CudaSlice<f32>>,
        d: Option<&CudaSlice<f32>>,
        beta: f32,
        h: f32,
    ) -> Result<()> {
        Ok(RkKernels::final_update(self, x, theta, acc, opt(m), opt(d), beta, h)?)
    }
    fn adagrad_d(&self, d: &mut CudaSlice<f32>, g: &CudaSlice<f32>, k1: &CudaSlice<f32>, eps: f32) -> Result<()> {
        Ok(RkKernels::adagrad_d(self, d, g, k1, eps)?)
    }
    fn adagrad_commit(&self, g: &mut CudaSlice<f32>, k1: &CudaSlice<f32>) -> Result<()> {
        Ok(RkKernels::adagrad_commit(self, g, k1)?)
    }
    fn dnorm2(&self, v: &CudaSlice<f32>, d: Option<&CudaSlice<f32>>) -> Result<f64> {
        Ok(RkKernels::dnorm2(self, v, opt(d))?)
    }
    fn ddiff2(&self, a: &CudaSlice<f32>, b: &CudaSlice<f32>, d: Option<&CudaSlice<f32>>) -> Result<f64> {
        Ok(RkKernels::ddiff2(self, a, b, opt(d))?)
    }
    fn error_sum(
        &self,
        theta: &CudaSlice<f32>,
        err: &CudaSlice<f32>,
        d: Option<&CudaSlice<f32>>,
        h: f64,
        atol: f64,
        rtol: f64,
    ) -> Result<f64> {
        Ok(RkKernels::error_sum(self, theta, err, opt(d), h, atol, rtol)?)
    }
    fn nonfinite_count(&self, v: &CudaSlice<f32>) -> Result<u64> {
        Ok(RkKernels::nonfinite_count(self, v)?)
    }
    fn download(&self, b: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.stream().clone_dtoh(b).map_err(drv)
    }
    fn upload(&self, v: &[f32]) -> Result<CudaSlice<f32>> {
        self.stream().clone_htod(v).map_err(drv)
    }
}
