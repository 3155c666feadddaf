//! `kernels::cuda` in a build without the `cuda` feature: the same names as `cuda.rs`, so that
//! the trainer's code reads the same with and without the feature (candle's
//! `dummy_cuda_backend.rs` does this for its CUDA back end). Constructors fail with
//! [`KernelError::NotCompiled`]; the types have no values, so every path that would hold one is
//! statically unreachable and compiles away.

/// Without CUDA there are no kernels: no value of this type exists.
pub enum RkKernels {}

/// Without CUDA there are no device buffers: no value of this type exists.
pub enum DeviceBuf {}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("this kutta was built without the `cuda` feature (cargo build --features cuda)")]
    NotCompiled,
}

pub type KResult<T> = std::result::Result<T, KernelError>;

impl RkKernels {
    /// Always `NotCompiled`.
    pub fn for_candle(device: &candle_core::Device) -> KResult<Self> {
        let _ = device;
        Err(KernelError::NotCompiled)
    }
}

/// No CUDA devices in a build without CUDA.
pub fn device_count() -> usize {
    0
}

/// None: no GPU memory to count.
pub fn device_used_bytes(device: &candle_core::Device) -> Option<u64> {
    let _ = device;
    None
}

/// Without CUDA there are no streams: no value of this type exists.
pub enum CudaStream {}

impl RkKernels {
    /// Unreachable: no kernels exist without CUDA.
    pub fn stream(&self) -> &std::sync::Arc<CudaStream> {
        match *self {}
    }
}
