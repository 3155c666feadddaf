//! The data-parallel gradient field (SPEC §5) and the small agreements ranks make with each other.
//!
//! `ShardedField` wraps a rank's `ModelField`: the trainer hands it the *global* batch of the step
//! (a function of (seed, step) only, identical on every rank), the rank keeps its contiguous slice,
//! sums per-sample losses and gradients over that slice divided by the global batch size, and the
//! sums are all-reduced — one flat buffer, one call — before `eval` returns. So every stage
//! gradient k_i is the mean over the whole global batch and is all-reduced before the solver forms
//! θ_{i+1}; the solver never learns how many ranks exist. A global batch that does not divide
//! evenly gives slices of different sizes and still the exact mean (no sample is dropped).

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::field::VectorField;
use crate::model::ModelField;
use kutta_collectives::Communicator;

/// Rank `rank`'s contiguous share [lo, hi) of `n` items split over `size` ranks; the first
/// `n % size` ranks get one more.
pub fn shard_range(n: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let base = n / size;
    let extra = n % size;
    let lo = rank * base + rank.min(extra);
    let hi = lo + base + usize::from(rank < extra);
    lo..hi
}

pub struct ShardedField<'a> {
    inner: ModelField<'a>,
    comm: &'a dyn Communicator,
}

impl<'a> ShardedField<'a> {
    pub fn new(inner: ModelField<'a>, comm: &'a dyn Communicator) -> Self {
        Self { inner, comm }
    }

    /// Use this rank's slice of `global` for every following evaluation.
    pub fn set_global_batch(&mut self, global: &[usize]) {
        let r = shard_range(global.len(), self.comm.rank(), self.comm.world_size());
        self.inner.set_batch(&global[r], global.len());
    }
}

impl VectorField<f32> for ShardedField<'_> {
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    fn eval(&mut self, theta: &[f32], grad: &mut [f32]) -> Result<f64> {
        let local = self.inner.eval(theta, grad)?;
        self.comm.all_reduce_sum(grad).map_err(comm_err)?;
        self.comm.all_reduce_sum_f64(local).map_err(comm_err)
    }
}

pub fn comm_err(e: kutta_collectives::CommError) -> Error {
    Error::Other(format!("collective failed: {e}"))
}

/// Every rank passes its own outcome; all ranks return Ok only if every rank succeeded. A rank
/// that failed returns its own error; the others learn that some rank failed. This keeps a
/// failure on one rank (a bad file, an existing run folder) from leaving the others waiting in
/// the next collective.
pub fn agree<T>(comm: &dyn Communicator, what: &str, outcome: Result<T>) -> Result<T> {
    let failed = comm.all_reduce_sum_f64(if outcome.is_err() { 1.0 } else { 0.0 }).map_err(comm_err)?;
    match outcome {
        Err(e) => Err(e),
        Ok(_) if failed > 0.0 => Err(Error::Other(format!("{what} failed on {failed} other rank(s); see their messages"))),
        Ok(v) => Ok(v),
    }
}

/// This rank's share of an evaluation set (copied once; the test set is small).
pub fn shard_dataset(data: &Dataset, rank: usize, size: usize) -> Dataset {
    let r = shard_range(data.len(), rank, size);
    let d = data.sample_dim();
    Dataset {
        images: data.images[r.start * d..r.end * d].to_vec(),
        labels: data.labels[r.clone()].to_vec(),
        image_shape: data.image_shape,
        num_classes: data.num_classes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_everything_once() {
        for (n, size) in [(10, 3), (3, 5), (16, 2), (25, 2), (0, 4)] {
            let mut next = 0;
            for rank in 0..size {
                let r = shard_range(n, rank, size);
                assert_eq!(r.start, next);
                assert!(r.len() == n / size || r.len() == n / size + 1);
                next = r.end;
            }
            assert_eq!(next, n);
        }
    }
}
