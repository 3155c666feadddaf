//! `kutta bench kernels` and `kutta bench nccl`: the GPU self-checks, in the `kutta` binary
//! itself so that one binary is all a GPU machine needs (`scripts/gpu-check run` carries only it
//! and the data set; the test binaries each link candle and are far larger).
//!
//! - `kernels`: the RK kernels against their CPU references (`optim::gpu::check::run`, the same
//!   function `trainer/tests/kernels.rs` calls), then each kernel's bandwidth against a
//!   device-to-device copy (`RkKernels::bandwidth`, goal ≥ 80 % of the copy's).
//!   Exit status 1 when a check fails; kernels below the bandwidth goal are listed, not an error.
//! - `nccl`: an `NcclComm` over the launched world (one process: a world of one over
//!   `SingleProcess`; under mpirun every rank, one GPU each) running `nccl::self_check` (the same
//!   function `collectives/examples/nccl_smoke.rs` calls): every collective checked, then the bus
//!   bandwidth of 256 MiB all-reduces.
//!
//! Both print a table and one summary line each (`kernel checks: …`, `kernel bandwidth: …`,
//! `nccl checks: …`, `nccl all-reduce: …`, which `scripts/gpu-check` reads), or JSON with
//! `--json`. Without the `cuda` feature both are errors that say so.

/// `kutta bench kernels [--json]`, and `kutta bench nccl [--json]` on this rank (which returns the
/// exit status): the GPU code below, or without the `cuda` feature a stub that says so.
pub use cuda::{bench_kernels, bench_nccl};

#[cfg(not(feature = "cuda"))]
mod cuda {
    use anyhow::Result;

    const NEEDS_CUDA: &str = "needs a kutta built with --features cuda (and a GPU): source the env file of \
                              scripts/cuda-toolchain, then cargo build --release --features cuda,mpi (README, GPU)";

    pub fn bench_kernels(json: bool) -> Result<()> {
        let _ = json;
        anyhow::bail!("kutta bench kernels {NEEDS_CUDA}")
    }

    pub fn bench_nccl(json: bool) -> i32 {
        let _ = json;
        eprintln!("error: kutta bench nccl {NEEDS_CUDA}");
        1
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use anyhow::Result;
    use kutta_collectives::{nccl, rendezvous, Communicator};
    use kutta_trainer::optim::gpu::check;

    /// Each kernel should reach this fraction of the device's copy bandwidth.
    pub const BANDWIDTH_GOAL: f64 = 0.8;
    /// Floats per buffer in the bandwidth measurement (about 12 × 4 bytes × this of device memory:
    /// 3 GiB), unless `KUTTA_BW_FLOATS` says otherwise.
    pub const BANDWIDTH_FLOATS: usize = 64 << 20;
    /// Timed runs per kernel (median).
    pub const BANDWIDTH_REPS: usize = 20;
    /// The timed all-reduce of `nccl`: MiB and calls.
    pub const NCCL_MIB: usize = 256;
    pub const NCCL_ITERS: usize = 20;
    /// `nccl`: a collective waiting longer than this aborts the job.
    pub const NCCL_TIMEOUT_S: u64 = 60;

    pub fn bench_kernels(json: bool) -> Result<()> {
        let count = kutta_trainer::device::cuda_device_count();
        anyhow::ensure!(
            count > 0,
            "kutta bench kernels: no CUDA device answers (is the NVIDIA driver loaded? CUDA_VISIBLE_DEVICES?)"
        );
        let ordinal = kutta_trainer::device::gpu_ordinal(None, rendezvous::local_rank().unwrap_or(0), count);
        let k =
            check::open(ordinal).map_err(|e| anyhow::anyhow!("kutta bench kernels: cannot open GPU {ordinal}: {e}"))?;
        if !json {
            eprintln!("checking the RK kernels against their CPU references on GPU {ordinal} ...");
        }
        let report = check::run(&k)?;
        let failures: Vec<String> =
            report.failures().iter().map(|r| format!("{} ({})", r.check, r.worst_case)).collect();
        let checks_line = format!(
            "kernel checks: {}, {} of {} checks passed, {} kernel calls, max relative error {:.2e} (tolerances {:.0e} elementwise, {:.0e} reductions; counts and argument checks exact) on {}",
            if report.passed() { "PASS" } else { "FAIL" },
            report.rows.len() - failures.len(),
            report.rows.len(),
            report.kernel_calls,
            report.max_rel_error(),
            check::ELEM_TOL,
            check::SUM_TOL,
            report.device
        );
        if !json {
            println!("{}", report.table());
            println!("{checks_line}");
            if !failures.is_empty() {
                println!("failed: {}", failures.join("; "));
            }
            println!();
        }

        let n: usize = std::env::var("KUTTA_BW_FLOATS").ok().and_then(|v| v.parse().ok()).unwrap_or(BANDWIDTH_FLOATS);
        if !json {
            eprintln!("timing each kernel on {n} floats per buffer against a device-to-device copy ...");
        }
        let bandwidth = k.bandwidth(n, BANDWIDTH_REPS);
        let (bw_line, bw_json) = match &bandwidth {
            Ok(bw) => {
                let below = bw.below(BANDWIDTH_GOAL);
                let kernels = bw.rows.len().saturating_sub(1); // the memcpy row is the reference
                let names: Vec<String> =
                    below.iter().map(|r| format!("{} ({:.0} %)", r.kernel, 100.0 * r.fraction_of_copy)).collect();
                let lowest = bw.rows.iter().skip(1).min_by(|a, b| a.fraction_of_copy.total_cmp(&b.fraction_of_copy));
                let line = format!(
                    "kernel bandwidth: {} of {kernels} kernels at >= {:.0} % of copy bandwidth ({:.1} GB/s); lowest {}; below: {}",
                    kernels - below.len(),
                    100.0 * BANDWIDTH_GOAL,
                    bw.copy_gb_per_s,
                    lowest.map_or("-".into(), |r| format!("{:.0} % ({})", 100.0 * r.fraction_of_copy, r.kernel)),
                    if names.is_empty() { "none".into() } else { names.join(", ") }
                );
                let names: Vec<&str> = below.iter().map(|r| r.kernel.as_str()).collect();
                (line, serde_json::json!({ "report": bw, "goal": BANDWIDTH_GOAL, "below_goal": names }))
            }
            Err(e) => (format!("kernel bandwidth: ERROR {e}"), serde_json::json!({ "error": e.to_string() })),
        };
        if json {
            let out = serde_json::json!({ "passed": report.passed(), "checks": report, "bandwidth": bw_json });
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            if let Ok(bw) = &bandwidth {
                println!("{}", bw.table());
            }
            println!("{bw_line}");
        }
        if !report.passed() {
            anyhow::bail!("{} of {} kernel checks failed: {}", failures.len(), report.rows.len(), failures.join("; "));
        }
        bandwidth.map_err(|e| anyhow::anyhow!("the bandwidth measurement failed: {e}"))?;
        Ok(())
    }

    pub fn bench_nccl(json: bool) -> i32 {
        let timeout = Some(std::time::Duration::from_secs(NCCL_TIMEOUT_S));
        let comm = match rendezvous::connect_nccl(timeout) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: kutta bench nccl: {e}");
                return 1;
            }
        };
        let (rank, size) = (comm.rank(), comm.world_size());
        if !json && comm.is_writer() {
            eprintln!(
                "checking NcclComm on {size} rank(s), then timing {NCCL_ITERS} all-reduces of {NCCL_MIB} MiB ..."
            );
        }
        match nccl::self_check(&comm, NCCL_MIB, NCCL_ITERS) {
            Ok(r) => {
                if comm.is_writer() {
                    if json {
                        let version = r.nccl_version.map(|(a, b, c)| format!("{a}.{b}.{c}"));
                        let out = serde_json::json!({
                            "passed": true,
                            "world_size": r.world_size,
                            "device": r.device,
                            "device_ordinal": r.device_ordinal,
                            "nccl_version": version,
                            "mib": r.mib,
                            "iters": r.iters,
                            "seconds_per_call": r.seconds_per_call,
                            "algbw_gb_per_s": r.algbw_gb_per_s,
                            "busbw_gb_per_s": r.busbw_gb_per_s,
                        });
                        println!("{}", serde_json::to_string_pretty(&out).expect("JSON"));
                    } else {
                        println!(
                            "nccl checks: PASS on {size} rank(s) (rank 0: GPU {}, {})",
                            r.device_ordinal, r.device
                        );
                        println!("nccl all-reduce: {}", r.describe());
                    }
                }
                0
            }
            Err(e) if size > 1 => {
                eprintln!("rank {rank}: error: nccl checks failed: {e}");
                comm.abort(1)
            }
            Err(e) => {
                if !json {
                    println!("nccl checks: FAIL {e}");
                }
                eprintln!("error: nccl checks failed: {e}");
                1
            }
        }
    }
}
