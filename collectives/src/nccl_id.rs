//! How the NCCL unique id travels: rank 0 creates the id, and before NCCL is up the only way to
//! send it is a communicator the ranks already share (the *bootstrap*: `MpiComm` under a
//! launcher, `SingleProcess` for one process). This needs nothing of CUDA, so it is built and
//! tested without the `cuda` feature. Used by `nccl`; re-exported as `rendezvous::broadcast_nccl_id`.

use crate::{CommError, Communicator, Result};

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
        return Err(CommError::NoNcclId { rank: bootstrap.rank() });
    }
    let mut out = [0u8; NCCL_ID_BYTES];
    for (b, w) in out.chunks_exact_mut(4).zip(&wire) {
        b.copy_from_slice(&w.to_bits().to_le_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LocalGroup, SingleProcess};

    /// Bytes whose f32 words include NaNs (quiet and signalling), infinities, subnormals, -0.
    fn awkward_id() -> [u8; NCCL_ID_BYTES] {
        let words: [u32; 8] =
            [0x7FC0_0001, 0x7F80_0001, 0xFFFF_FFFF, 0x7F80_0000, 0x0000_0001, 0x8000_0000, 0, 0x1234_5678];
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
