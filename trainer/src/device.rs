//! Which device a rank's model runs on (config `train.device`, issue 5).
//!
//! `cpu` always works. `cuda` needs a binary built with `--features cuda` and a GPU; each rank
//! takes GPU `local_rank mod device_count` (the launcher's local rank: `OMPI_COMM_WORLD_LOCAL_RANK`,
//! `SLURM_LOCALID`, …, see `kutta_collectives::rendezvous::local_rank`) unless `--gpu N` names one.
//! `auto` takes that GPU when the binary has CUDA and a GPU answers, and the CPU otherwise, saying
//! which in the log.

use candle_core::Device;

use crate::error::{Error, Result};

pub use crate::config::DeviceKind;

/// Whether this binary was built with the `cuda` feature.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// The GPUs this process can see (0 without the `cuda` feature or without a driver).
pub fn cuda_device_count() -> usize {
    crate::kernels::cuda::device_count()
}

/// The GPU ordinal for a rank: `explicit` (`--gpu N`) if given, else the local rank modulo the
/// number of GPUs.
pub fn gpu_ordinal(explicit: Option<usize>, local_rank: usize, count: usize) -> usize {
    explicit.unwrap_or(if count == 0 { 0 } else { local_rank % count })
}

/// Resolve `kind` for this rank. `local_rank` comes from the launcher (0 when run alone).
pub fn select(kind: DeviceKind, explicit_gpu: Option<usize>, local_rank: usize) -> Result<Device> {
    let key = "train.device";
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda | DeviceKind::Auto if !CUDA_BUILT => {
            if kind == DeviceKind::Cuda {
                return Err(Error::config(
                    key,
                    "\"cuda\", but this kutta was built without the `cuda` feature: rebuild with `cargo build --release --features cuda` (see README, GPU path), or set train.device = \"cpu\"",
                ));
            }
            Ok(Device::Cpu)
        }
        DeviceKind::Cuda | DeviceKind::Auto => {
            let count = cuda_device_count();
            let ordinal = gpu_ordinal(explicit_gpu, local_rank, count);
            if count == 0 || ordinal >= count {
                let why = if count == 0 {
                    "no CUDA device answers".to_string()
                } else {
                    format!("GPU {ordinal} asked for, {count} present")
                };
                if kind == DeviceKind::Auto && explicit_gpu.is_none() {
                    tracing::info!("train.device = auto: {why}; running on the CPU");
                    return Ok(Device::Cpu);
                }
                return Err(Error::config(key, format!("\"cuda\": {why}")));
            }
            Device::new_cuda(ordinal).map_err(|e| Error::config(key, format!("cannot open GPU {ordinal}: {e}")))
        }
    }
}

/// The device a config asks for, on this process (its local rank from the launcher).
pub fn for_config(cfg: &crate::config::Config) -> Result<Device> {
    let local_rank = kutta_collectives::rendezvous::local_rank().unwrap_or(0);
    select(cfg.train.device, cfg.train.gpu, local_rank)
}

/// "cpu" or "cuda:N", for logs and the summary.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinal_from_local_rank_or_flag() {
        assert_eq!(gpu_ordinal(None, 5, 4), 1);
        assert_eq!(gpu_ordinal(None, 3, 8), 3);
        assert_eq!(gpu_ordinal(Some(2), 5, 4), 2);
        assert_eq!(gpu_ordinal(None, 1, 0), 0);
    }

    #[test]
    fn cpu_always_and_cuda_needs_the_feature() {
        assert!(select(DeviceKind::Cpu, None, 0).unwrap().is_cpu());
        if !CUDA_BUILT {
            assert!(select(DeviceKind::Auto, None, 3).unwrap().is_cpu());
            let e = select(DeviceKind::Cuda, None, 0).unwrap_err().to_string();
            assert!(e.contains("train.device") && e.contains("--features cuda"), "{e}");
        } else {
            eprintln!("built with cuda: select(cuda) is exercised by scripts/gpu-check on a GPU machine");
        }
        assert_eq!(describe(&Device::Cpu), "cpu");
    }
}
