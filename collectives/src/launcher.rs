//! Where a launcher put this process: the environment variables of Open MPI's `mpirun`, PMI
//! (MPICH's Hydra, Intel MPI), PMIx and Slurm's `srun`. The bottom layer of joining a world:
//! `mpi` reads it for messages before MPI is up, `rendezvous` to pick the back end (and
//! re-exports the public functions, so their path is `rendezvous::launched_world` etc.).
//!
//! The parsing is pure (`detect` takes a lookup closure) so it is tested without touching the
//! process environment. A launcher whose variables are malformed (not numbers, rank ≥ size)
//! counts as absent and the next one is tried.
//!
//! Slurm: only an `srun` job step counts. A batch script itself also carries `SLURM_PROCID=0`
//! and `SLURM_NTASKS=n`, but it is one process, not rank 0 of n; so the world size is taken
//! from `SLURM_STEP_NUM_TASKS` (set by `srun` for each task), or from `SLURM_NTASKS` only
//! when `SLURM_STEP_ID` says we are inside a step.

/// Where a launcher put this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Launch {
    /// Which launcher's variables said so, for messages.
    pub launcher: &'static str,
    pub rank: usize,
    /// `None` when the launcher names the rank but not the world size (bare PMIx); MPI then
    /// tells the size.
    pub size: Option<usize>,
}

/// Reads the launcher variables through `get` (the process environment in `launched_world`).
pub(crate) fn detect(get: &dyn Fn(&str) -> Option<String>) -> Option<Launch> {
    let num = |name: &str| get(name).and_then(|v| v.trim().parse::<usize>().ok());
    let world = |launcher, rank: Option<usize>, size: Option<usize>| match (rank, size) {
        (Some(rank), Some(size)) if rank < size => Some(Launch { launcher, rank, size: Some(size) }),
        _ => None,
    };
    world("Open MPI", num("OMPI_COMM_WORLD_RANK"), num("OMPI_COMM_WORLD_SIZE"))
        .or_else(|| world("PMI", num("PMI_RANK"), num("PMI_SIZE")))
        .or_else(|| {
            let rank = num("PMIX_RANK")?;
            let size = num("SLURM_STEP_NUM_TASKS");
            match size {
                Some(s) if rank >= s => None,
                _ => Some(Launch { launcher: "PMIx", rank, size }),
            }
        })
        .or_else(|| {
            let step_size =
                num("SLURM_STEP_NUM_TASKS").or_else(|| get("SLURM_STEP_ID").and_then(|_| num("SLURM_NTASKS")));
            world("Slurm", num("SLURM_PROCID"), step_size)
        })
}

/// `(rank, size)` as the launcher announced them, or `None` when no launcher started this
/// process (or it did not say the world size).
pub fn launched_world() -> Option<(usize, usize)> {
    launched_world_from(&env)
}

/// `launched_world` over any variable lookup.
pub fn launched_world_from(get: &dyn Fn(&str) -> Option<String>) -> Option<(usize, usize)> {
    detect(get).and_then(|l| Some((l.rank, l.size?)))
}

/// This process's rank among the ranks on its node (to pick a GPU), if a launcher said.
pub fn local_rank() -> Option<usize> {
    local_rank_from(&env)
}

/// `local_rank` over any variable lookup.
pub fn local_rank_from(get: &dyn Fn(&str) -> Option<String>) -> Option<usize> {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"]
        .iter()
        .find_map(|name| get(name).and_then(|v| v.trim().parse().ok()))
}

/// Where a launcher put this process, from the process environment.
pub(crate) fn launch() -> Option<Launch> {
    detect(&env)
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn no_launcher_means_no_world() {
        assert_eq!(detect(&vars(&[])), None);
        assert_eq!(launched_world_from(&vars(&[("HOME", "/root")])), None);
        assert_eq!(local_rank_from(&vars(&[])), None);
    }

    #[test]
    fn open_mpi() {
        let v =
            vars(&[("OMPI_COMM_WORLD_RANK", "3"), ("OMPI_COMM_WORLD_SIZE", "4"), ("OMPI_COMM_WORLD_LOCAL_RANK", "1")]);
        assert_eq!(detect(&v), Some(Launch { launcher: "Open MPI", rank: 3, size: Some(4) }));
        assert_eq!(launched_world_from(&v), Some((3, 4)));
        assert_eq!(local_rank_from(&v), Some(1));
    }

    #[test]
    fn pmi_and_pmix() {
        assert_eq!(
            launched_world_from(&vars(&[("PMI_RANK", "1"), ("PMI_SIZE", "2"), ("MPI_LOCALRANKID", "1")])),
            Some((1, 2))
        );
        assert_eq!(local_rank_from(&vars(&[("MPI_LOCALRANKID", "1")])), Some(1));
        // Bare PMIx names the rank only: detected, but the size is MPI's to tell.
        let bare = vars(&[("PMIX_RANK", "2")]);
        assert_eq!(detect(&bare), Some(Launch { launcher: "PMIx", rank: 2, size: None }));
        assert_eq!(launched_world_from(&bare), None);
        // srun --mpi=pmix gives the step size.
        let srun = vars(&[("PMIX_RANK", "2"), ("SLURM_STEP_NUM_TASKS", "8"), ("SLURM_PROCID", "2")]);
        assert_eq!(detect(&srun), Some(Launch { launcher: "PMIx", rank: 2, size: Some(8) }));
    }

    #[test]
    fn slurm_step_counts_but_a_batch_script_does_not() {
        let step = vars(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_STEP_NUM_TASKS", "6"),
            ("SLURM_LOCALID", "1"),
        ]);
        assert_eq!(launched_world_from(&step), Some((5, 6)));
        assert_eq!(local_rank_from(&step), Some(1));
        let old_step = vars(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "8"), ("SLURM_STEP_ID", "0")]);
        assert_eq!(launched_world_from(&old_step), Some((5, 8)));
        let batch = vars(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8"), ("SLURM_JOB_ID", "42")]);
        assert_eq!(detect(&batch), None);
    }

    #[test]
    fn open_mpi_wins_over_slurm_and_malformed_values_fall_through() {
        let both = vars(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("SLURM_PROCID", "0"),
            ("SLURM_STEP_NUM_TASKS", "1"),
        ]);
        assert_eq!(detect(&both).map(|l| l.launcher), Some("Open MPI"));
        let garbled = vars(&[
            ("OMPI_COMM_WORLD_RANK", "x"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("PMI_RANK", " 0 "),
            ("PMI_SIZE", "2"),
        ]);
        assert_eq!(detect(&garbled), Some(Launch { launcher: "PMI", rank: 0, size: Some(2) }));
        assert_eq!(launched_world_from(&vars(&[("PMI_RANK", "2"), ("PMI_SIZE", "2")])), None);
        assert_eq!(local_rank_from(&vars(&[("OMPI_COMM_WORLD_LOCAL_RANK", "-1"), ("SLURM_LOCALID", "0")])), Some(0));
    }
}
