//! MPI smoke check: every collective of `MpiComm`, checked against closed-form sums, on any
//! number of ranks. Exits 0 when all checks pass on every rank.
//!
//!     cargo build --release -p kutta-collectives --features mpi --example mpi_smoke
//!     mpirun -np 4 --oversubscribe target/release/examples/mpi_smoke
//!
//! `tests/mpi.rs` runs the same `run_checks` under `mpirun -np 2`.

use kutta_collectives::{Communicator, MpiComm};
use std::time::Duration;

/// All checks, in an order identical on every rank (each one is a collective). Restores the
/// communicator's chunk length before returning.
pub fn run_checks(comm: &mut MpiComm) -> Result<(), String> {
    let (rank, n) = (comm.rank(), comm.world_size());
    let fail = |what: &str| Err(format!("rank {rank}: {what}"));
    if comm.name() != "mpi" {
        return fail("name() is not \"mpi\"");
    }
    if let Some((r, s)) = kutta_collectives::rendezvous::launched_world() {
        if (r, s) != (rank, n) {
            return fail(&format!("launcher says rank {r} of {s}, MPI says {rank} of {n}"));
        }
    }

    // Sums of small integers times 0.5 are exact in f32, so the expected values are exact. Run
    // once whole (one chunk) and once cut into chunks of 7 (a remainder chunk, and the path a
    // > 2^31-element buffer takes with the default chunk length).
    let default_chunk = comm.chunk_len();
    for chunk in [default_chunk, 7] {
        comm.set_chunk_len(chunk);
        let len = 1000;
        let mut buf: Vec<f32> = (0..len).map(|i| (rank + 1) as f32 * i as f32 * 0.5).collect();
        comm.all_reduce_sum(&mut buf).map_err(|e| e.to_string())?;
        let ranks_sum = (n * (n + 1) / 2) as f32;
        if let Some(i) = (0..len).find(|&i| buf[i] != ranks_sum * i as f32 * 0.5) {
            return fail(&format!(
                "all_reduce_sum (chunk {chunk}) element {i} is {}, want {}",
                buf[i],
                ranks_sum * i as f32 * 0.5
            ));
        }
        let mut empty: Vec<f32> = Vec::new();
        comm.all_reduce_sum(&mut empty).map_err(|e| e.to_string())?;

        // Broadcast from the last rank.
        let root = n - 1;
        let mut b: Vec<f32> =
            if rank == root { (0..len).map(|i| i as f32 - 3.25).collect() } else { vec![f32::NAN; len] };
        comm.broadcast(&mut b, root).map_err(|e| e.to_string())?;
        if let Some(i) = (0..len).find(|&i| b[i] != i as f32 - 3.25) {
            return fail(&format!("broadcast (chunk {chunk}) element {i} is {}", b[i]));
        }

        // The crate invariant: on inexact data, every rank ends with bit-identical sums. Rank
        // 0's result is broadcast and compared bit for bit.
        let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (rank as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
        let mut noisy: Vec<f32> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect();
        let noisy_in = noisy.clone();
        comm.all_reduce_sum(&mut noisy).map_err(|e| e.to_string())?;

        // Reduce-scatter of the same data gives this rank's block of the all-reduce (up to
        // summation order), and all-gather puts the blocks back together exactly.
        let block = len / n;
        let mut mine = vec![0.0f32; block];
        comm.reduce_scatter_sum(&noisy_in[..block * n], &mut mine).map_err(|e| e.to_string())?;
        if let Some(i) = (0..block).find(|&i| (mine[i] - noisy[rank * block + i]).abs() > 1e-5) {
            return fail(&format!(
                "reduce_scatter_sum (chunk {chunk}) element {i} is {}, all-reduce gave {}",
                mine[i],
                noisy[rank * block + i]
            ));
        }
        let own: Vec<f32> = (0..block).map(|i| (rank * block + i) as f32 * 0.25).collect();
        let mut gathered = vec![f32::NAN; block * n];
        comm.all_gather(&own, &mut gathered).map_err(|e| e.to_string())?;
        if let Some(i) = (0..block * n).find(|&i| gathered[i] != i as f32 * 0.25) {
            return fail(&format!("all_gather (chunk {chunk}) element {i} is {}", gathered[i]));
        }
        if n > 1 && comm.all_gather(&own[..block - usize::from(rank == 0)], &mut gathered[..(block - 1) * n]).is_ok() {
            return fail("all_gather with block lengths differing across ranks succeeded");
        }
        let mut rank0 = noisy.clone();
        comm.broadcast(&mut rank0, 0).map_err(|e| e.to_string())?;
        if noisy.iter().zip(&rank0).any(|(a, b)| a.to_bits() != b.to_bits()) {
            return fail(&format!("all_reduce_sum (chunk {chunk}) results differ from rank 0's in some bits"));
        }
    }
    comm.set_chunk_len(default_chunk);

    let x = comm.all_reduce_sum_f64(rank as f64 + 0.25).map_err(|e| e.to_string())?;
    let want = (n * (n - 1) / 2) as f64 + 0.25 * n as f64;
    if x != want {
        return fail(&format!("all_reduce_sum_f64 is {x}, want {want}"));
    }

    // Disagreements are errors on every rank, and the communicator stays usable after them.
    let mut uneven = vec![1.0f32; if rank == 0 { 3 } else { 4 }];
    if n > 1 && comm.all_reduce_sum(&mut uneven).is_ok() {
        return fail("all_reduce_sum with lengths differing across ranks succeeded");
    }
    if comm.broadcast(&mut [0.0f32; 2], n).is_ok() {
        return fail("broadcast from a rank outside the world succeeded");
    }
    comm.barrier().map_err(|e| e.to_string())?;
    if comm.all_reduce_sum_f64(1.0).map_err(|e| e.to_string())? != n as f64 {
        return fail("all_reduce_sum_f64 after the error paths is wrong");
    }
    Ok(())
}

fn main() {
    let mut comm = match MpiComm::init(Some(Duration::from_secs(60))) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    match run_checks(&mut comm) {
        Ok(()) => println!(
            "rank {} of {}: all MPI checks passed (MPI_THREAD_MULTIPLE: {})",
            comm.rank(),
            comm.world_size(),
            comm.thread_multiple()
        ),
        Err(e) => {
            eprintln!("{e}");
            comm.abort(1);
        }
    }
}
