//! Rendezvous: how a process learns which world it belongs to, kept apart from the collectives
//! (as c10d keeps its stores apart from its process groups). Launchers announce a process's
//! place in the job through environment variables; we read those of Open MPI's `mpirun`,
//! PMI (MPICH's Hydra, Intel MPI), PMIx and Slurm's `srun`, then `connect` picks the back end.
//!
//! The parsing is pure (`detect` takes a lookup closure) so it is tested without touching the
//! process environment. A launcher whose variables are malformed (not numbers, rank ≥ size)
//! counts as absent and the next one is tried.
//!
//! Slurm: only an `srun` job step counts. A batch script itself also carries `SLURM_PROCID=0`
//! and `SLURM_NTASKS=n`, but it is one process, not rank 0 of n; so the world size is taken
//! from `SLURM_STEP_NUM_TASKS` (set by `srun` for each task), or from `SLURM_NTASKS` only
//! when `SLURM_STEP_ID` says we are inside a step.

use crate::{CommError, Communicator, Result, SingleProcess};
use std::time::Duration;

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
            let step_size = num("SLURM_STEP_NUM_TASKS").or_else(|| get("SLURM_STEP_ID").and_then(|_| num("SLURM_NTASKS")));
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
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"].iter().find_map(|name| get(name).and_then(|v| v.trim().parse().ok()))
}

/// The communicator for this process: MPI when a launcher started it (and the `mpi` feature is
/// on), `SingleProcess` otherwise. A plain `kutta` run on a laptop never initializes MPI, even
/// when built with the feature. `timeout` arms the MPI collective watchdog (see `mpi.rs`).
pub fn connect(timeout: Option<Duration>) -> Result<Box<dyn Communicator>> {
    connect_from(detect(&env), timeout)
}

pub(crate) fn connect_from(launch: Option<Launch>, timeout: Option<Duration>) -> Result<Box<dyn Communicator>> {
    match launch {
        None => Ok(Box::new(SingleProcess)),
        Some(launch) => connect_launched(launch, timeout),
    }
}

#[cfg(not(feature = "mpi"))]
fn connect_launched(launch: Launch, _timeout: Option<Duration>) -> Result<Box<dyn Communicator>> {
    match launch.size {
        Some(1) => Ok(Box::new(SingleProcess)),
        // A bare PMIx rank 0 of unknown size is taken for a single process; its peers, if any,
        // have rank > 0 and fail here, and the launcher ends the job.
        None if launch.rank == 0 => Ok(Box::new(SingleProcess)),
        size => {
            let n = size.map_or_else(|| "an unknown number".to_string(), |n| n.to_string());
            Err(CommError::Failed {
                rank: launch.rank,
                msg: format!(
                    "launched as rank {} of {n}, but this kutta was built without the `mpi` feature: \
                     cargo build --release --features mpi",
                    launch.rank
                ),
            })
        }
    }
}

#[cfg(feature = "mpi")]
fn connect_launched(launch: Launch, timeout: Option<Duration>) -> Result<Box<dyn Communicator>> {
    let comm = crate::MpiComm::init(timeout)?;
    let (rank, size) = (comm.rank(), comm.world_size());
    if rank != launch.rank || launch.size.is_some_and(|n| n != size) {
        let said = launch.size.map_or_else(|| format!("rank {}", launch.rank), |n| format!("rank {} of {n}", launch.rank));
        return Err(CommError::Failed {
            rank,
            msg: format!(
                "{} launched this process as {said}, but MPI sees rank {rank} of {size}: is this kutta \
                 linked against the MPI that launched it?",
                launch.launcher
            ),
        });
    }
    Ok(Box::new(comm))
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
        let v = vars(&[("OMPI_COMM_WORLD_RANK", "3"), ("OMPI_COMM_WORLD_SIZE", "4"), ("OMPI_COMM_WORLD_LOCAL_RANK", "1")]);
        assert_eq!(detect(&v), Some(Launch { launcher: "Open MPI", rank: 3, size: Some(4) }));
        assert_eq!(launched_world_from(&v), Some((3, 4)));
        assert_eq!(local_rank_from(&v), Some(1));
    }

    #[test]
    fn pmi_and_pmix() {
        assert_eq!(launched_world_from(&vars(&[("PMI_RANK", "1"), ("PMI_SIZE", "2"), ("MPI_LOCALRANKID", "1")])), Some((1, 2)));
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
        let step = vars(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "8"), ("SLURM_STEP_NUM_TASKS", "6"), ("SLURM_LOCALID", "1")]);
        assert_eq!(launched_world_from(&step), Some((5, 6)));
        assert_eq!(local_rank_from(&step), Some(1));
        let old_step = vars(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "8"), ("SLURM_STEP_ID", "0")]);
        assert_eq!(launched_world_from(&old_step), Some((5, 8)));
        let batch = vars(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8"), ("SLURM_JOB_ID", "42")]);
        assert_eq!(detect(&batch), None);
    }

    #[test]
    fn open_mpi_wins_over_slurm_and_malformed_values_fall_through() {
        let both =
            vars(&[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "2"), ("SLURM_PROCID", "0"), ("SLURM_STEP_NUM_TASKS", "1")]);
        assert_eq!(detect(&both).map(|l| l.launcher), Some("Open MPI"));
        let garbled = vars(&[("OMPI_COMM_WORLD_RANK", "x"), ("OMPI_COMM_WORLD_SIZE", "2"), ("PMI_RANK", " 0 "), ("PMI_SIZE", "2")]);
        assert_eq!(detect(&garbled), Some(Launch { launcher: "PMI", rank: 0, size: Some(2) }));
        assert_eq!(launched_world_from(&vars(&[("PMI_RANK", "2"), ("PMI_SIZE", "2")])), None);
        assert_eq!(local_rank_from(&vars(&[("OMPI_COMM_WORLD_LOCAL_RANK", "-1"), ("SLURM_LOCALID", "0")])), Some(0));
    }

    #[test]
    fn no_launcher_connects_a_single_process_without_mpi() {
        let c = connect_from(None, None).unwrap();
        assert_eq!((c.rank(), c.world_size(), c.name()), (0, 1, SingleProcess.name()));
    }

    #[cfg(not(feature = "mpi"))]
    #[test]
    fn multi_rank_launch_without_the_mpi_feature_says_how_to_build() {
        let launch = Launch { launcher: "Open MPI", rank: 1, size: Some(4) };
        let msg = connect_from(Some(launch), None).err().expect("must fail").to_string();
        assert_eq!(
            msg,
            "rank 1: launched as rank 1 of 4, but this kutta was built without the `mpi` feature: \
             cargo build --release --features mpi"
        );
        let one = connect_from(Some(Launch { launcher: "Slurm", rank: 0, size: Some(1) }), None).unwrap();
        assert_eq!(one.world_size(), 1);
    }
}

// ---------------------------------------------------------------------------------------------
// NCCL rendezvous: how the NCCL unique id travels, and `connect_nccl`. Kept apart from the
// launcher detection above; used by `nccl::NcclComm` (feature `cuda`).
// ---------------------------------------------------------------------------------------------

/// Bytes in an NCCL unique id (`ncclUniqueId::internal`).
pub const NCCL_ID_BYTES: usize = 128;
/// f32 words on the wire for one id: 32 words of id bits and one "rank 0 has an id" flag.
const NCCL_ID_WORDS: usize = NCCL_ID_BYTES / 4 + 1;

/// Sends rank 0's NCCL unique id to every rank over `bootstrap`'s `broadcast`, which moves f32
/// slices: each 4 id bytes travel as the bits of one f32 (`f32::from_bits`, little-endian byte
/// order), so the bootstrap must move values verbatim, as MPI (bytes) and the in-process back
/// ends (copies) do; no arithmetic ever touches them, so NaN bit patterns survive. One more word
/// says whether rank 0 has an id at all: rank 0 passes `None` when creating it failed, and then
/// every rank returns an error instead of waiting. Other ranks' `id` is ignored. Collective:
/// every rank of `bootstrap` must call it.
pub fn broadcast_nccl_id<C: Communicator + ?Sized>(
    bootstrap: &C,
    id: Option<&[u8; NCCL_ID_BYTES]>,
) -> Result<[u8; NCCL_ID_BYTES]> {
    let mut wire = [0.0f32; NCCL_ID_WORDS];
    if bootstrap.rank() == 0 {
        if let Some(id) = id {
            for (w, b) in wire.iter_mut().zip(id.chunks_exact(4)) {
                *w = f32::from_bits(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            }
            wire[NCCL_ID_WORDS - 1] = 1.0;
        }
    }
    bootstrap.broadcast(&mut wire, 0)?;
    if wire[NCCL_ID_WORDS - 1] != 1.0 {
        return Err(CommError::Failed {
            rank: bootstrap.rank(),
            msg: "rank 0 could not create the NCCL unique id, so no rank can join NCCL".into(),
        });
    }
    let mut out = [0u8; NCCL_ID_BYTES];
    for (b, w) in out.chunks_exact_mut(4).zip(&wire) {
        b.copy_from_slice(&w.to_bits().to_le_bytes());
    }
    Ok(out)
}

/// An NCCL communicator for this process, bootstrapped over `connect(timeout)` (MPI under a
/// launcher, `SingleProcess` otherwise), on GPU `local_rank % device_count` (rank 0 of a
/// single-process run takes GPU 0). `timeout` arms both the MPI watchdog and NCCL's (see
/// `nccl.rs`).
#[cfg(feature = "cuda")]
pub fn connect_nccl(timeout: Option<Duration>) -> Result<crate::nccl::NcclComm> {
    let bootstrap = connect(timeout)?;
    let ordinal = crate::nccl::pick_device(bootstrap.rank(), local_rank())?;
    crate::nccl::NcclComm::new(bootstrap, ordinal, timeout)
}

#[cfg(test)]
mod nccl_id_tests {
    use super::*;
    use crate::LocalGroup;

    /// Bytes whose f32 words include NaNs (quiet and signalling), infinities, subnormals, -0.
    fn awkward_id() -> [u8; NCCL_ID_BYTES] {
        let words: [u32; 8] = [0x7FC0_0001, 0x7F80_0001, 0xFFFF_FFFF, 0x7F80_0000, 0x0000_0001, 0x8000_0000, 0, 0x1234_5678];
        let mut id = [0u8; NCCL_ID_BYTES];
        for (i, b) in id.chunks_exact_mut(4).enumerate() {
            b.copy_from_slice(&(words[i % 8] ^ ((i as u32) << 24)).to_le_bytes());
        }
        id
    }

    #[test]
    fn nccl_id_survives_a_single_process_bootstrap() {
        let id = awkward_id();
        assert_eq!(broadcast_nccl_id(&SingleProcess, Some(&id)).unwrap(), id);
        let err = broadcast_nccl_id(&SingleProcess, None).expect_err("no id must fail").to_string();
        assert!(err.contains("could not create the NCCL unique id"), "{err}");
    }

    #[test]
    fn nccl_id_reaches_every_thread_rank_bit_for_bit() {
        let id = awkward_id();
        let got: Vec<_> = LocalGroup::new(3)
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    // Non-root ranks pass garbage (or nothing); only rank 0's id counts.
                    let mine = if c.rank() == 0 { Some(id) } else { Some([7u8; NCCL_ID_BYTES]) };
                    broadcast_nccl_id(&c, mine.as_ref()).map_err(|e| e.to_string())
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        assert!(got.iter().all(|r| r.as_ref().ok() == Some(&id)), "{got:?}");
        // Rank 0 without an id: every rank errors, none waits.
        let errs: Vec<_> = LocalGroup::new(2)
            .into_iter()
            .map(|c| std::thread::spawn(move || broadcast_nccl_id(&c, None).is_err()))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        assert_eq!(errs, vec![true, true]);
    }
}
