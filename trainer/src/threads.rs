//! How many compute threads this process runs the CPU kernels on: decided once, at start, from
//! the command line, the environment and the cores (`decide`, a pure function), then applied
//! (`init`) before any candle or rayon work.
//!
//! candle-core 0.11 sizes everything from one number: its gemm parallelism, its own thread pool
//! and rayon's global pool all follow `RAYON_NUM_THREADS` (`candle_core::utils::get_num_threads`),
//! and kutta's own kernels ask candle for it too. So `init` writes the decision into
//! `RAYON_NUM_THREADS` and builds rayon's global pool with it; afterwards `current()` is the
//! count every kernel uses.
//!
//! The default is one rank per core: several ranks on one node (an `mpirun` or `srun` job) each
//! take `cores / ranks on this node`, since candle's own default (every physical core of the node
//! in every rank) oversubscribes the node N-fold. The ranks on this node come from the launcher's
//! environment (`LOCAL_RANKS_VARS`). An explicit count always wins: `--threads N`, then
//! `RAYON_NUM_THREADS`, then Slurm's `--cpus-per-task` (`SLURM_CPUS_PER_TASK`).

use serde::Serialize;

/// The variables that say how many ranks of the job run on this node, in the order they are
/// read: Open MPI, MPICH (Hydra), PMI, Slurm (`--ntasks-per-node`).
pub const LOCAL_RANKS_VARS: [&str; 4] =
    ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"];

/// The cores a decision divides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cores {
    /// The node's cores as candle counts them by default (its physical cores).
    pub node: usize,
    /// The CPUs this process may run on (its affinity mask and cgroup quota): fewer than `node`
    /// when a launcher bound the rank to some cores (Open MPI binds each of ≤ 2 ranks to one).
    pub allowed: usize,
}

impl Cores {
    /// This machine's: candle's default count (read before `RAYON_NUM_THREADS` is set by `init`;
    /// a valid `RAYON_NUM_THREADS` makes the decision without the cores) and
    /// `std::thread::available_parallelism`.
    pub fn detect() -> Cores {
        let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
        let node = if positive(std::env::var("RAYON_NUM_THREADS").ok().as_deref()).is_some() {
            allowed
        } else {
            candle_core::utils::get_num_threads()
        };
        Cores { node: node.max(1), allowed: allowed.max(1) }
    }
}

/// The decision and why, as logged at start and written to `summary.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Choice {
    pub threads: usize,
    /// e.g. "2 cores / 2 ranks on this node; --threads to override".
    pub reason: String,
    /// Set by the user (`--threads`, `RAYON_NUM_THREADS`), not derived from the cores.
    pub explicit: bool,
}

fn positive(v: Option<&str>) -> Option<usize> {
    v.and_then(|s| s.trim().parse::<usize>().ok()).filter(|&n| n > 0)
}

fn plural(n: usize, one: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {one}s")
    }
}

/// The compute threads of this process: `flag` (`--threads`), else `RAYON_NUM_THREADS`, else
/// `SLURM_CPUS_PER_TASK`, else max(1, min(allowed CPUs, node cores / ranks on this node)) with
/// the ranks from the first of `LOCAL_RANKS_VARS` that is set (1 when none is). `env` looks a
/// variable up (`std::env::var` in `init`, a table in tests); a value that is not a positive
/// integer counts as unset, as rayon and candle treat it.
pub fn decide(flag: Option<usize>, env: impl Fn(&str) -> Option<String>, cores: Cores) -> Choice {
    let var = |name: &str| positive(env(name).as_deref()).map(|n| (name.to_string(), n));
    if let Some(n) = flag.filter(|&n| n > 0) {
        return Choice { threads: n, reason: format!("--threads {n}"), explicit: true };
    }
    if let Some((_, n)) = var("RAYON_NUM_THREADS") {
        return Choice { threads: n, reason: format!("RAYON_NUM_THREADS={n}"), explicit: true };
    }
    if let Some((_, n)) = var("SLURM_CPUS_PER_TASK") {
        let reason = format!("SLURM_CPUS_PER_TASK={n}: Slurm's --cpus-per-task; --threads to override");
        return Choice { threads: n, reason, explicit: false };
    }
    let cores_text = plural(cores.node, "core");
    let Some((name, ranks)) = LOCAL_RANKS_VARS.iter().find_map(|v| var(v)).filter(|(_, r)| *r > 1) else {
        let threads = cores.node.min(cores.allowed).max(1);
        let reason = if cores.allowed < cores.node {
            format!("{} this process may run on, of {cores_text}; --threads to override", plural(cores.allowed, "CPU"))
        } else {
            format!("{cores_text}; --threads to override")
        };
        return Choice { threads, reason, explicit: false };
    };
    let share = (cores.node / ranks).max(1);
    let threads = share.min(cores.allowed).max(1);
    let bound = if cores.allowed < share {
        format!("the {} this rank is bound to; ", plural(cores.allowed, "CPU"))
    } else {
        String::new()
    };
    let reason = format!("{bound}{cores_text} / {ranks} ranks on this node ({name}); --threads to override");
    Choice { threads, reason, explicit: false }
}

/// Decide (`decide` on this process's environment and `Cores::detect`), then apply the choice:
/// `RAYON_NUM_THREADS` set to it (candle reads it on every kernel call) and rayon's global pool
/// built with it. Call at the very start of `main`, before any thread exists (setting an
/// environment variable while other threads read the environment is a data race) and before
/// any candle or rayon work (rayon's global pool can be built only once).
pub fn init(flag: Option<usize>) -> Choice {
    let choice = decide(flag, |name| std::env::var(name).ok(), Cores::detect());
    std::env::set_var("RAYON_NUM_THREADS", choice.threads.to_string());
    candle_core::utils::init_global_threadpool();
    choice
}

/// Keep freed memory in the process (glibc only; once, from the first call of the CPU conv
/// kernels or of the transformer's attention).
/// Activations of more than 32 MB (ResNet-18's first stage at batch 128) are otherwise `mmap`ed
/// fresh at every allocation and `munmap`ed at every free, so each gradient evaluation
/// page-faults ~1 GB of zeroed pages in (12% of its time in the kernel). With mmap off, the heap
/// never trimmed and one arena for the threads that allocate from then on (a buffer freed by a
/// rayon worker is reused by the next allocation on any thread, rather than sitting in a
/// per-thread arena that is unmapped when it empties: 4-7% of a ResNet-18 evaluation went to page
/// faults), the next evaluation reuses the same memory; the peak resident size is unchanged.
/// Not for every model: with the settings made at start, the MLP's evaluation at batch 16 (small
/// allocations on two threads, one arena's lock) took 1.1× as long.
pub fn keep_freed_memory() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only sets allocator parameters; it is thread-safe in glibc.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    });
}

/// The threads candle's CPU kernels run on now (`RAYON_NUM_THREADS`, else candle's default).
pub fn current() -> usize {
    candle_core::utils::get_num_threads()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    const TWO: Cores = Cores { node: 2, allowed: 2 };

    #[test]
    fn one_process_takes_every_core() {
        let c = decide(None, env(&[]), TWO);
        assert_eq!((c.threads, c.explicit), (2, false));
        assert_eq!(c.reason, "2 cores; --threads to override");
        let c = decide(None, env(&[]), Cores { node: 8, allowed: 3 });
        assert_eq!(c.threads, 3, "{}", c.reason);
        assert!(c.reason.starts_with("3 CPUs this process may run on, of 8 cores"), "{}", c.reason);
    }

    #[test]
    fn ranks_on_a_node_share_its_cores() {
        let c = decide(None, env(&[("OMPI_COMM_WORLD_LOCAL_SIZE", "2")]), TWO);
        assert_eq!((c.threads, c.explicit), (1, false));
        assert_eq!(c.reason, "2 cores / 2 ranks on this node (OMPI_COMM_WORLD_LOCAL_SIZE); --threads to override");
        // Open MPI binds each of two ranks to one core: the same answer, and it says why.
        let c = decide(None, env(&[("OMPI_COMM_WORLD_LOCAL_SIZE", "2")]), Cores { node: 2, allowed: 1 });
        assert_eq!(c.threads, 1);
        // More ranks than cores: one thread each, never zero.
        assert_eq!(decide(None, env(&[("OMPI_COMM_WORLD_LOCAL_SIZE", "5")]), TWO).threads, 1);
        // Each launcher's variable, in order; a single rank on the node is the one-process case.
        let big = Cores { node: 64, allowed: 64 };
        assert_eq!(decide(None, env(&[("MPI_LOCALNRANKS", "4")]), big).threads, 16);
        assert_eq!(decide(None, env(&[("PMI_LOCAL_SIZE", "8")]), big).threads, 8);
        assert_eq!(decide(None, env(&[("SLURM_NTASKS_PER_NODE", "16")]), big).threads, 4);
        assert_eq!(decide(None, env(&[("OMPI_COMM_WORLD_LOCAL_SIZE", "1")]), big).threads, 64);
        let both = [("OMPI_COMM_WORLD_LOCAL_SIZE", "2"), ("SLURM_NTASKS_PER_NODE", "16")];
        assert_eq!(decide(None, env(&both), big).threads, 32);
        // Ranks bound to 4 cores each (--map-by slot:PE=4) on a 64-core node with 4 ranks: 4.
        let c = decide(None, env(&[("OMPI_COMM_WORLD_LOCAL_SIZE", "4")]), Cores { node: 64, allowed: 4 });
        assert_eq!(c.threads, 4);
        assert!(c.reason.starts_with("the 4 CPUs this rank is bound to; 64 cores / 4 ranks"), "{}", c.reason);
    }

    #[test]
    fn an_explicit_count_wins() {
        let mpi = [("OMPI_COMM_WORLD_LOCAL_SIZE", "2"), ("RAYON_NUM_THREADS", "3"), ("SLURM_CPUS_PER_TASK", "5")];
        assert_eq!(
            decide(Some(7), env(&mpi), TWO),
            Choice { threads: 7, reason: "--threads 7".into(), explicit: true }
        );
        let c = decide(None, env(&mpi), TWO);
        assert_eq!((c.threads, c.reason.as_str(), c.explicit), (3, "RAYON_NUM_THREADS=3", true));
        let c = decide(None, env(&mpi[..1].iter().chain(&mpi[2..]).copied().collect::<Vec<_>>()), TWO);
        assert_eq!((c.threads, c.explicit), (5, false));
        assert!(c.reason.starts_with("SLURM_CPUS_PER_TASK=5"), "{}", c.reason);
    }

    #[test]
    fn values_that_are_not_positive_integers_count_as_unset() {
        for bad in ["0", "", "two", "-1"] {
            let vars = [("RAYON_NUM_THREADS", bad), ("OMPI_COMM_WORLD_LOCAL_SIZE", "2")];
            let c = decide(None, env(&vars), TWO);
            assert_eq!((c.threads, c.explicit), (1, false), "RAYON_NUM_THREADS={bad:?}: {}", c.reason);
        }
        assert_eq!(decide(Some(0), env(&[]), TWO).threads, 2);
        assert_eq!(decide(None, env(&[("OMPI_COMM_WORLD_LOCAL_SIZE", "x")]), TWO).threads, 2);
    }
}
