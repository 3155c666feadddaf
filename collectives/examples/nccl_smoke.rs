//! NCCL smoke check and bandwidth probe for `NcclComm`, on any number of ranks (one GPU each).
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

use cudarc::driver::{CudaSlice, CudaStream};
use kutta_collectives::nccl::{nccl_version, pick_device, NcclComm};
use kutta_collectives::{rendezvous, Communicator};
use std::sync::Arc;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: nccl_smoke [--mib N (default 256)] [--iters K (default 20)] [--timeout SECONDS] [--check-watchdog]";

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

/// Uniform values in [-1, 1), the same sequence for the same `seed` on every rank.
fn random(seed: u64, len: usize) -> Vec<f32> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (seed + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

fn upload(s: &Arc<CudaStream>, host: &[f32]) -> Result<CudaSlice<f32>, String> {
    s.clone_htod(host).map_err(|e| format!("copy to the GPU: {e}"))
}

fn download(s: &Arc<CudaStream>, dev: &CudaSlice<f32>) -> Result<Vec<f32>, String> {
    s.clone_dtoh(dev).map_err(|e| format!("copy from the GPU: {e}"))
}

/// The first element where `got` differs from `want(i)`, as a message.
fn mismatch(what: &str, got: &[f32], want: impl Fn(usize) -> f32) -> Result<(), String> {
    match (0..got.len()).find(|&i| got[i] != want(i)) {
        Some(i) => Err(format!("{what}: element {i} is {}, want {}", got[i], want(i))),
        None => Ok(()),
    }
}

/// All correctness checks, in an order identical on every rank (each one is a collective).
pub fn run_checks(comm: &NcclComm) -> Result<(), String> {
    let (rank, n) = (comm.rank(), comm.world_size());
    let s = comm.stream().clone();
    let e = |e: kutta_collectives::CommError| e.to_string();
    if comm.name() != "nccl" {
        return Err("name() is not \"nccl\"".into());
    }
    let ranks_sum = (n * (n + 1) / 2) as f32;

    // Exact sums: small integers times 0.5, on the device.
    let len = 10_007;
    let mut buf = upload(&s, &(0..len).map(|i| (rank + 1) as f32 * (i % 1000) as f32 * 0.5).collect::<Vec<_>>())?;
    comm.all_reduce_sum_device(&mut buf).map_err(e)?;
    mismatch("all_reduce_sum_device", &download(&s, &buf)?, |i| ranks_sum * (i % 1000) as f32 * 0.5)?;

    // Random data: every rank's data is reproducible anywhere, so each rank recomputes the sum
    // (in its own order, hence a tolerance) and checks that all ranks hold the same bits.
    let mut noisy = upload(&s, &random(rank as u64, len))?;
    comm.all_reduce_sum_device(&mut noisy).map_err(e)?;
    let sums = download(&s, &noisy)?;
    let mut want = vec![0.0f64; len];
    for r in 0..n {
        for (w, x) in want.iter_mut().zip(random(r as u64, len)) {
            *w += x as f64;
        }
    }
    if let Some(i) = (0..len).find(|&i| (sums[i] as f64 - want[i]).abs() > 1e-5 * n as f64) {
        return Err(format!("all_reduce_sum_device of random data: element {i} is {}, want {}", sums[i], want[i]));
    }
    let mut rank0 = upload(&s, &sums)?;
    comm.broadcast_device(&mut rank0, 0).map_err(e)?;
    if download(&s, &rank0)?.iter().zip(&sums).any(|(a, b)| a.to_bits() != b.to_bits()) {
        return Err("all_reduce_sum_device of random data: sums differ from rank 0's in some bits".into());
    }

    // Reduce-scatter and all-gather on the device, with a block that is not a round number.
    let b = 1001;
    let send = upload(&s, &(0..n * b).map(|i| (rank + 1) as f32 * i as f32 * 0.5).collect::<Vec<_>>())?;
    let mut recv = s.alloc_zeros::<f32>(b).map_err(|e| e.to_string())?;
    comm.reduce_scatter_sum_device(&send, &mut recv).map_err(e)?;
    mismatch("reduce_scatter_sum_device", &download(&s, &recv)?, |i| ranks_sum * (rank * b + i) as f32 * 0.5)?;
    let mine = upload(&s, &(0..b).map(|i| (rank * 10_000 + i) as f32).collect::<Vec<_>>())?;
    let mut all = s.alloc_zeros::<f32>(n * b).map_err(|e| e.to_string())?;
    comm.all_gather_device(&mine, &mut all).map_err(e)?;
    mismatch("all_gather_device", &download(&s, &all)?, |i| ((i / b) * 10_000 + i % b) as f32)?;

    // The host-slice path.
    let mut host: Vec<f32> = (0..len).map(|i| (rank + 1) as f32 * (i % 1000) as f32 * 0.5).collect();
    comm.all_reduce_sum(&mut host).map_err(e)?;
    mismatch("all_reduce_sum (host)", &host, |i| ranks_sum * (i % 1000) as f32 * 0.5)?;
    let send_host: Vec<f32> = (0..n * b).map(|i| (rank + 1) as f32 * i as f32 * 0.5).collect();
    let mut recv_host = vec![0.0f32; b];
    comm.reduce_scatter_sum(&send_host, &mut recv_host).map_err(e)?;
    mismatch("reduce_scatter_sum (host)", &recv_host, |i| ranks_sum * (rank * b + i) as f32 * 0.5)?;
    let mut all_host = vec![0.0f32; n * b];
    comm.all_gather(&(0..b).map(|i| (rank * 10_000 + i) as f32).collect::<Vec<_>>(), &mut all_host).map_err(e)?;
    mismatch("all_gather (host)", &all_host, |i| ((i / b) * 10_000 + i % b) as f32)?;
    let root = n - 1;
    let mut bc: Vec<f32> = if rank == root { (0..len).map(|i| i as f32 - 3.25).collect() } else { vec![f32::NAN; len] };
    comm.broadcast(&mut bc, root).map_err(e)?;
    mismatch("broadcast (host)", &bc, |i| i as f32 - 3.25)?;

    // The scalar path (the bootstrap).
    let x = comm.all_reduce_sum_f64(rank as f64 + 0.25).map_err(e)?;
    let want_x = (n * (n - 1) / 2) as f64 + 0.25 * n as f64;
    if x != want_x {
        return Err(format!("all_reduce_sum_f64 is {x}, want {want_x}"));
    }

    // Disagreements are errors on every rank, and the communicator stays usable after them.
    if n > 1 {
        let mut uneven = s.alloc_zeros::<f32>(if rank == 0 { 3 } else { 4 }).map_err(|e| e.to_string())?;
        if comm.all_reduce_sum_device(&mut uneven).is_ok() {
            return Err("all_reduce_sum_device with lengths differing across ranks succeeded".into());
        }
        let mut bad_recv = s.alloc_zeros::<f32>(if rank == 0 { b + 1 } else { b }).map_err(|e| e.to_string())?;
        if comm.reduce_scatter_sum_device(&send, &mut bad_recv).is_ok() {
            return Err("reduce_scatter_sum_device with a bad block on rank 0 succeeded".into());
        }
    }
    if comm.broadcast(&mut [0.0f32; 2], n).is_ok() {
        return Err("broadcast from a rank outside the world succeeded".into());
    }
    comm.barrier().map_err(e)?;
    if comm.all_reduce_sum_f64(1.0).map_err(e)? != n as f64 {
        return Err("all_reduce_sum_f64 after the error paths is wrong".into());
    }
    let mut again = upload(&s, &[1.0, 2.0])?;
    comm.all_reduce_sum_device(&mut again).map_err(e)?;
    mismatch("all_reduce_sum_device after the error paths", &download(&s, &again)?, |i| (i + 1) as f32 * n as f32)?;
    Ok(())
}

/// Times `iters` in-place all-reduces of `mib` MiB (after 3 warm-up calls), then checks one
/// all-reduce of that size exactly. Returns this rank's seconds per all-reduce.
fn bandwidth(comm: &NcclComm, mib: usize, iters: usize) -> Result<f64, String> {
    let (rank, n) = (comm.rank(), comm.world_size());
    let s = comm.stream().clone();
    let len = mib << 18; // f32 per MiB
    let e = |e: kutta_collectives::CommError| e.to_string();
    let mut buf = s.alloc_zeros::<f32>(len).map_err(|e| format!("cannot allocate {mib} MiB on the GPU: {e}"))?;
    for _ in 0..3 {
        comm.all_reduce_sum_device(&mut buf).map_err(e)?;
    }
    comm.barrier().map_err(e)?;
    let start = Instant::now();
    for _ in 0..iters {
        comm.all_reduce_sum_device(&mut buf).map_err(e)?;
    }
    let per_call = start.elapsed().as_secs_f64() / iters as f64;
    // Exact check of the large buffer: (rank + 1) · (i mod 1024) sums to n(n+1)/2 · (i mod 1024).
    let pattern: Vec<f32> = (0..len).map(|i| (rank + 1) as f32 * (i % 1024) as f32).collect();
    s.memcpy_htod(&pattern, &mut buf).map_err(|e| format!("copy to the GPU: {e}"))?;
    comm.all_reduce_sum_device(&mut buf).map_err(e)?;
    let ranks_sum = (n * (n + 1) / 2) as f32;
    mismatch(&format!("all_reduce_sum_device of {mib} MiB"), &download(&s, &buf)?, |i| ranks_sum * (i % 1024) as f32)?;
    Ok(per_call)
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
    let result = run_checks(&comm).and_then(|()| bandwidth(&comm, args.mib, args.iters));
    let per_call = match result {
        Ok(t) => t,
        Err(e) => {
            eprintln!("rank {rank}: {e}");
            comm.abort(1)
        }
    };
    println!("rank {rank} of {n} (GPU {ordinal}, {gpu}): all NCCL checks passed");
    // The slowest rank's time is the collective's time.
    let times = {
        let mut v = vec![0.0f32; n];
        v[rank] = per_call as f32;
        comm.all_reduce_sum(&mut v).map(|()| v)
    };
    let slowest = match times {
        Ok(v) => v.into_iter().fold(0.0f32, f32::max) as f64,
        Err(e) => {
            eprintln!("rank {rank}: {e}");
            comm.abort(1)
        }
    };
    if comm.is_writer() {
        let bytes = (args.mib << 20) as f64;
        let algbw = bytes / slowest / 1e9;
        let busbw = algbw * 2.0 * (n as f64 - 1.0) / n as f64;
        let version = nccl_version().map_or_else(|| "?".into(), |(a, b, c)| format!("{a}.{b}.{c}"));
        println!(
            "all_reduce_sum_device {} MiB × {} on {n} rank(s): {:.3} ms per call, algbw {algbw:.2} GB/s, busbw {busbw:.2} GB/s (NCCL {version})",
            args.mib,
            args.iters,
            slowest * 1e3
        );
    }
}
