//! NCCL smoke check and bandwidth probe for `NcclComm`, on any number of ranks (one GPU each),
//! through `kutta_collectives::nccl::self_check` (which `kutta bench nccl` runs as well).
//! Each rank takes GPU `local_rank % device_count`, checks every collective against closed-form
//! or recomputed values (device buffers, the host-slice path, a length mismatch), checks that
//! all ranks hold bit-identical sums of random data, then times in-place all-reduces of a large
//! buffer and rank 0 prints the bus bandwidth (nccl-tests' definition: algbw · 2(n−1)/n).
//! Exits 0 when every check passes on every rank.
//!
//!     source ~/.cache/kutta/cuda-13.0/kutta-cuda-env.sh
//!     cargo build --release -p kutta-collectives --features cuda,mpi --example nccl_smoke
//!     export LD_LIBRARY_PATH=$KUTTA_CUDA_RUNTIME_LIBS:$LD_LIBRARY_PATH
//!     mpirun -np 8 target/release/examples/nccl_smoke [--mib 256] [--iters 20] [--timeout 60]
//!
//! `--check-watchdog` (needs ≥ 2 ranks) checks the watchdog instead: rank 1 never joins an
//! all-reduce, so the job must end with exit code 124 after `--timeout` (default 5 s there) and
//! rank 0 must print `rank 0: NCCL all_reduce_sum did not finish within 5 s; aborting the job`.

use kutta_collectives::nccl::{self, pick_device, NcclComm};
use kutta_collectives::{rendezvous, Communicator};
use std::time::Duration;

const USAGE: &str =
    "usage: nccl_smoke [--mib N (default 256)] [--iters K (default 20)] [--timeout SECONDS] [--check-watchdog]";

struct Args {
    mib: usize,
    iters: usize,
    timeout: Option<Duration>,
    check_watchdog: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { mib: 256, iters: 20, timeout: None, check_watchdog: false };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--mib" => args.mib = value("--mib")?.parse().map_err(|e| format!("--mib: {e}"))?,
            "--iters" => args.iters = value("--iters")?.parse().map_err(|e| format!("--iters: {e}"))?,
            "--timeout" => {
                let s: f64 = value("--timeout")?.parse().map_err(|e| format!("--timeout: {e}"))?;
                if !(s > 0.0 && s.is_finite()) {
                    return Err("--timeout must be a positive number of seconds".into());
                }
                args.timeout = Some(Duration::from_secs_f64(s));
            }
            "--check-watchdog" => args.check_watchdog = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.mib == 0 || args.iters == 0 {
        return Err("--mib and --iters must be positive".into());
    }
    Ok(args)
}

/// Rank 1 never joins; rank 0's all-reduce must end the job through the watchdog.
fn check_watchdog(comm: &NcclComm) -> Result<(), String> {
    let t = comm.timeout().expect("the watchdog check arms a timeout");
    if comm.world_size() < 2 {
        return Err("--check-watchdog needs at least 2 ranks".into());
    }
    comm.barrier().map_err(|e| e.to_string())?;
    if comm.rank() == 1 {
        std::thread::sleep(t * 10 + Duration::from_secs(10));
        return Err("rank 1 is still alive long after the timeout: the watchdog did not end the job".into());
    }
    if comm.rank() == 0 {
        let mut buf = comm.stream().alloc_zeros::<f32>(1 << 20).map_err(|e| e.to_string())?;
        let _ = comm.all_reduce_sum_device(&mut buf);
        return Err("the all-reduce that rank 1 never joined returned, which it must not".into());
    }
    std::thread::sleep(t * 10 + Duration::from_secs(10));
    Err("still alive long after the timeout: the watchdog did not end the job".into())
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("{e}\n{USAGE}");
        std::process::exit(2)
    });
    let timeout = args.timeout.or(Some(Duration::from_secs(if args.check_watchdog { 5 } else { 60 })));
    let bootstrap = kutta_collectives::connect(timeout).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1)
    });
    let rank = bootstrap.rank();
    let ordinal = match pick_device(rank, rendezvous::local_rank()) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            bootstrap.abort(1)
        }
    };
    // On error every rank gets one (the setup is agreed over the bootstrap), so exiting is safe.
    let comm = NcclComm::new(bootstrap, ordinal, timeout).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1)
    });
    let n = comm.world_size();
    let gpu = comm.context().name().unwrap_or_else(|_| "?".into());
    if args.check_watchdog {
        if let Err(e) = check_watchdog(&comm) {
            eprintln!("rank {rank}: {e}");
            comm.abort(1);
        }
        return;
    }
    // The checks and the timing are `nccl::self_check`, which `kutta bench nccl` runs too.
    let report = match nccl::self_check(&comm, args.mib, args.iters) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rank {rank}: {e}");
            comm.abort(1)
        }
    };
    println!("rank {rank} of {n} (GPU {ordinal}, {gpu}): all NCCL checks passed");
    if comm.is_writer() {
        println!("{}", report.describe());
    }
}
