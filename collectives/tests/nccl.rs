//! `NcclComm` on one GPU: a world of one rank over `SingleProcess`. Every collective of a world
//! of one still goes through NCCL (and the length agreement, the scratch buffers, the completion
//! polling), so these tests check the plumbing and the values; `examples/nccl_smoke.rs` checks
//! several ranks under `mpirun`.
//!
//! Without the `cuda` feature, or on a machine without a usable GPU, driver or NCCL, each test
//! prints `SKIPPED: NCCL tests need --features cuda and a GPU (<reason>)` and passes. (A cuda
//! build links libcuda and libnccl dynamically, so the test binary itself needs them to start;
//! the stub libcuda of `scripts/cuda-toolchain` lets it start and answers "no GPU".)

#[cfg(not(feature = "cuda"))]
#[test]
fn nccl_tests_need_the_cuda_feature() {
    eprintln!("SKIPPED: NCCL tests need --features cuda and a GPU (built without the `cuda` feature)");
}

#[cfg(feature = "cuda")]
mod gpu {
    use cudarc::driver::{CudaContext, CudaStream};
    use kutta_collectives::nccl::{device_count, nccl_version, NcclComm};
    use kutta_collectives::{Communicator, SingleProcess};
    use std::sync::Arc;
    use std::time::Duration;

    /// Why there is no GPU to test on, if there is none. Checks the driver and NCCL before
    /// anything that would panic (a panic while probing counts as "no GPU" too).
    fn no_gpu() -> Option<String> {
        let probe = std::panic::catch_unwind(|| -> Option<String> {
            match device_count() {
                Err(e) => Some(e),
                Ok(0) => Some("no CUDA device is visible".into()),
                Ok(_) => match nccl_version() {
                    None => Some("ncclGetVersion failed".into()),
                    Some(_) => None,
                },
            }
        });
        probe.unwrap_or_else(|_| Some("probing the CUDA driver panicked".into()))
    }

    /// A world-1 communicator on GPU 0, or `None` after printing why the test is skipped.
    fn comm() -> Option<NcclComm> {
        if let Some(reason) = no_gpu() {
            eprintln!("SKIPPED: NCCL tests need --features cuda and a GPU ({reason})");
            return None;
        }
        Some(
            NcclComm::new(Box::new(SingleProcess), 0, Some(Duration::from_secs(60)))
                .expect("NcclComm over SingleProcess"),
        )
    }

    fn stream(c: &NcclComm) -> &Arc<CudaStream> {
        c.stream()
    }

    #[test]
    fn world_of_one_identity() {
        let Some(c) = comm() else { return };
        assert_eq!((c.rank(), c.world_size(), c.name()), (0, 1, "nccl"));
        assert_eq!(c.device_ordinal(), 0);
        assert!(c.is_writer());
        assert_eq!(c.all_reduce_sum_f64(2.5).unwrap(), 2.5);
        c.barrier().unwrap();
        let ctx: &Arc<CudaContext> = c.context();
        assert_eq!(ctx.ordinal(), 0);
    }

    #[test]
    fn device_collectives_give_the_expected_values() {
        let Some(c) = comm() else { return };
        let s = stream(&c);
        let host: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();

        // All-reduce over one rank: the identity, in place.
        let mut buf = s.clone_htod(&host).unwrap();
        c.all_reduce_sum_device(&mut buf).unwrap();
        assert_eq!(s.clone_dtoh(&buf).unwrap(), host);
        // On a view of part of a buffer, too.
        let mut view = buf.slice_mut(10..20);
        c.all_reduce_sum_device(&mut view).unwrap();
        assert_eq!(s.clone_dtoh(&buf).unwrap(), host);

        // Reduce-scatter: one block, the whole buffer.
        let send = s.clone_htod(&host).unwrap();
        let mut recv = s.alloc_zeros::<f32>(host.len()).unwrap();
        c.reduce_scatter_sum_device(&send, &mut recv).unwrap();
        assert_eq!(s.clone_dtoh(&recv).unwrap(), host);

        // All-gather: rank 0's block is all of it.
        let mut gathered = s.alloc_zeros::<f32>(host.len()).unwrap();
        c.all_gather_device(&send, &mut gathered).unwrap();
        assert_eq!(s.clone_dtoh(&gathered).unwrap(), host);

        // Broadcast from rank 0 leaves the data; from rank 1 is an error.
        let mut b = s.clone_htod(&host).unwrap();
        c.broadcast_device(&mut b, 0).unwrap();
        assert_eq!(s.clone_dtoh(&b).unwrap(), host);
        assert!(c.broadcast_device(&mut b, 1).is_err());

        // Empty buffers are fine.
        let mut empty = s.alloc_zeros::<f32>(0).unwrap();
        c.all_reduce_sum_device(&mut empty).unwrap();

        // A large buffer (64 MiB) goes through whole.
        let big: Vec<f32> = (0..16 << 20).map(|i| (i % 4096) as f32).collect();
        let mut dev = s.clone_htod(&big).unwrap();
        c.all_reduce_sum_device(&mut dev).unwrap();
        assert!(s.clone_dtoh(&dev).unwrap() == big);
    }

    #[test]
    fn host_slice_path_matches() {
        let Some(c) = comm() else { return };
        let host: Vec<f32> = (0..777).map(|i| (i as f32).sin()).collect();
        let mut buf = host.clone();
        c.all_reduce_sum(&mut buf).unwrap();
        assert_eq!(buf, host);
        // Again with a shorter and then a longer buffer: the scratch is reused, then grown.
        let mut short = host[..5].to_vec();
        c.all_reduce_sum(&mut short).unwrap();
        assert_eq!(short, &host[..5]);
        let mut long: Vec<f32> = host.iter().chain(&host).copied().collect();
        c.all_reduce_sum(&mut long).unwrap();
        assert_eq!(&long[777..], &host[..]);

        let mut recv = vec![0.0f32; host.len()];
        c.reduce_scatter_sum(&host, &mut recv).unwrap();
        assert_eq!(recv, host);
        let mut gathered = vec![0.0f32; host.len()];
        c.all_gather(&host, &mut gathered).unwrap();
        assert_eq!(gathered, host);
        let mut b = host.clone();
        c.broadcast(&mut b, 0).unwrap();
        assert_eq!(b, host);
        assert!(c.broadcast(&mut b, 3).is_err());
        let mut empty: Vec<f32> = Vec::new();
        c.all_reduce_sum(&mut empty).unwrap();
        c.reduce_scatter_sum(&[], &mut []).unwrap();
    }

    #[test]
    fn length_mismatch_is_an_error_and_the_communicator_stays_usable() {
        let Some(c) = comm() else { return };
        let s = stream(&c);
        let send = s.alloc_zeros::<f32>(5).unwrap();
        let mut recv = s.alloc_zeros::<f32>(4).unwrap();
        let err = c.reduce_scatter_sum_device(&send, &mut recv).expect_err("5 against 4 must fail").to_string();
        assert!(err.contains("1 × 4 elements, got 5"), "{err}");
        let err = c
            .all_gather_device(&recv, &mut s.alloc_zeros::<f32>(3).unwrap())
            .expect_err("4 into 3 must fail")
            .to_string();
        assert!(err.contains("1 × 4 elements, got 3"), "{err}");
        // Host path alike.
        assert!(c.reduce_scatter_sum(&[1.0; 5], &mut [0.0; 4]).is_err());
        assert!(c.all_gather(&[1.0; 4], &mut [0.0; 5]).is_err());
        // Still usable.
        let mut ok = s.clone_htod(&[1.0f32, 2.0, 3.0]).unwrap();
        c.all_reduce_sum_device(&mut ok).unwrap();
        assert_eq!(s.clone_dtoh(&ok).unwrap(), vec![1.0, 2.0, 3.0]);
        let mut host = [4.0f32; 4];
        c.reduce_scatter_sum(&[4.0; 4], &mut host).unwrap();
        assert_eq!(host, [4.0; 4]);
    }

    #[test]
    fn zero_timeout_is_rejected() {
        if let Some(reason) = no_gpu() {
            eprintln!("SKIPPED: NCCL tests need --features cuda and a GPU ({reason})");
            return;
        }
        assert!(NcclComm::new(Box::new(SingleProcess), 0, Some(Duration::ZERO)).is_err());
    }
}
