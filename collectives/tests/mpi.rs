//! `MpiComm` under a real `mpirun`. Each test runs twice: cargo runs it as the parent, which
//! re-executes this test binary under `mpirun -np 2` with `--exact <its own name>` and checks the
//! job's exit status, time and stderr; under mpirun (`KUTTA_MPI_TEST_CHILD` set) the same test
//! is one rank. Needs `mpirun` on PATH (Debian: openmpi-bin), or its path in `MPIRUN`.
//!
//! A failing rank calls `abort`, never panics: a panic would unwind into `MPI_Finalize` and
//! leave the other rank waiting (see `src/mpi.rs`).
#![cfg(feature = "mpi")]

#[path = "../examples/mpi_smoke.rs"]
#[allow(dead_code)] // `main` is the example's; the tests use `run_checks`
mod smoke;

use kutta_collectives::{Communicator, MpiComm};
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const CHILD: &str = "KUTTA_MPI_TEST_CHILD";

fn in_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

struct Job {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Runs test `name` of this binary as an `np`-rank MPI job; kills it after `limit`.
fn mpirun(name: &str, np: usize, limit: Duration) -> Job {
    // One job at a time: each rank busy-polls, and the timings below should not depend on
    // how many other tests' jobs share the cores.
    static ONE_JOB: Mutex<()> = Mutex::new(());
    let _one = ONE_JOB.lock().unwrap_or_else(|p| p.into_inner());
    let mpirun = std::env::var("MPIRUN").unwrap_or_else(|_| "mpirun".into());
    let exe = std::env::current_exe().expect("test binary path");
    let start = Instant::now();
    let mut child = Command::new(&mpirun)
        .args(["-np", &np.to_string(), "--oversubscribe", "--bind-to", "none", "-x", CHILD])
        .arg(&exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{mpirun}` ({e}): install openmpi-bin or set MPIRUN"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for mpirun") {
            break Some(status);
        }
        if start.elapsed() > limit {
            // SIGTERM lets mpirun take its ranks down with it; SIGKILL if it does not.
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            std::thread::sleep(Duration::from_secs(5));
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    let job =
        Job { code: status.and_then(|s| s.code()), stdout: out.join().unwrap(), stderr: err.join().unwrap(), elapsed };
    eprintln!("`mpirun -np {np} … {name}`: exit {:?} after {:.2} s", job.code, job.elapsed.as_secs_f64());
    if status.is_none() {
        panic!(
            "{name}: the MPI job still ran after {limit:?}; killed.\nstdout:\n{}\nstderr:\n{}",
            job.stdout, job.stderr
        );
    }
    job
}

#[test]
fn collectives_agree_on_two_ranks() {
    if in_child() {
        let mut comm = MpiComm::init(Some(Duration::from_secs(60))).expect("MPI init");
        if let Err(e) = smoke::run_checks(&mut comm) {
            eprintln!("{e}");
            comm.abort(1);
        }
        return;
    }
    let job = mpirun("collectives_agree_on_two_ranks", 2, Duration::from_secs(120));
    assert_eq!(job.code, Some(0), "stdout:\n{}\nstderr:\n{}", job.stdout, job.stderr);
}

#[test]
fn abort_on_one_rank_ends_the_job_while_the_other_waits_in_a_barrier() {
    if in_child() {
        let comm = MpiComm::init(None).expect("MPI init");
        if comm.rank() == 1 {
            std::thread::sleep(Duration::from_millis(500)); // let rank 0 settle in the barrier
            comm.abort(3);
        }
        let _ = comm.barrier();
        eprintln!("rank {}: the barrier returned, which it must not", comm.rank());
        return;
    }
    let job = mpirun("abort_on_one_rank_ends_the_job_while_the_other_waits_in_a_barrier", 2, Duration::from_secs(60));
    assert!(job.code.is_some_and(|c| c != 0), "exit {:?}; stderr:\n{}", job.code, job.stderr);
    assert!(job.elapsed < Duration::from_secs(30), "took {:?}", job.elapsed);
    assert!(!job.stderr.contains("the barrier returned"), "{}", job.stderr);
}

#[test]
fn watchdog_aborts_a_collective_that_a_rank_never_joins() {
    if in_child() {
        let comm = MpiComm::init(Some(Duration::from_secs(2))).expect("MPI init");
        if comm.rank() == 0 {
            let mut buf = vec![1.0f32; 16];
            let _ = comm.all_reduce_sum(&mut buf);
            eprintln!("rank 0: the all-reduce returned, which it must not");
        } else {
            std::thread::sleep(Duration::from_secs(60)); // never joins
        }
        return;
    }
    let job = mpirun("watchdog_aborts_a_collective_that_a_rank_never_joins", 2, Duration::from_secs(60));
    assert!(job.code.is_some_and(|c| c != 0), "exit {:?}; stderr:\n{}", job.code, job.stderr);
    assert!(job.elapsed < Duration::from_secs(30), "took {:?}", job.elapsed);
    assert!(job.elapsed >= Duration::from_secs(2), "aborted before the timeout: {:?}", job.elapsed);
    assert!(
        job.stderr.contains("rank 0: collective all_reduce_sum waited more than 2 s; aborting the job"),
        "stderr:\n{}",
        job.stderr
    );
    assert!(!job.stderr.contains("returned, which it must not"), "{}", job.stderr);
}
