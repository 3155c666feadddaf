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
use crate::optim::OptimizerState;
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

/// The sharded optimizer's split of the parameter vector (SPEC §6; ZeRO's optimizer-state and
/// gradient partitioning): with P parameters over N ranks every rank owns one contiguous block of
/// B = ⌈P/N⌉ entries, rank r the range [r·B, min((r+1)·B, P)) (the last blocks may be short or
/// empty). Collectives move whole blocks, so the full vectors they fill are N·B long with zero
/// padding past P.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSharding {
    pub params: usize,
    pub block: usize,
    pub rank: usize,
    pub world: usize,
}

impl ParamSharding {
    pub fn new(params: usize, rank: usize, world: usize) -> Self {
        let world = world.max(1);
        Self { params, block: params.div_ceil(world), rank, world }
    }

    /// This rank's range of the parameter vector.
    pub fn own(&self) -> std::ops::Range<usize> {
        let lo = (self.rank * self.block).min(self.params);
        lo..((self.rank + 1) * self.block).min(self.params)
    }

    /// N·B: the length of a padded full vector.
    pub fn padded(&self) -> usize {
        self.block * self.world
    }

    /// Every rank's block of a sharded vector, concatenated into `full` (length P). Collective.
    pub fn gather(&self, comm: &dyn Communicator, mine: &[f32], full: &mut [f32]) -> Result<()> {
        let mut padded = vec![0.0f32; self.padded()];
        self.gather_padded(comm, mine, &mut Vec::new(), &mut padded)?;
        full.copy_from_slice(&padded[..self.params]);
        Ok(())
    }

    /// `gather` into a padded vector (length N·B); `send` is scratch for the padded block.
    fn gather_padded(
        &self,
        comm: &dyn Communicator,
        mine: &[f32],
        send: &mut Vec<f32>,
        padded: &mut [f32],
    ) -> Result<()> {
        let own = self.own();
        if mine.len() != own.len() || padded.len() != self.padded() {
            return Err(Error::internal(format!(
                "sharded optimizer: rank {} holds {} entries of its block {own:?} (padded whole {} of {})",
                self.rank,
                mine.len(),
                padded.len(),
                self.padded()
            )));
        }
        send.clear();
        send.extend_from_slice(mine);
        send.resize(self.block, 0.0);
        Ok(comm.all_gather(send, padded)?)
    }

    /// The optimizer's state with every sharded buffer made whole (for the checkpoint, which
    /// holds whole buffers whatever the sharding). Collective.
    pub fn gather_state(&self, comm: &dyn Communicator, st: OptimizerState<f32>) -> Result<OptimizerState<f32>> {
        let mut out = OptimizerState { buffers: Vec::new(), scalars: st.scalars };
        for (name, mine) in st.buffers {
            let mut full = vec![0.0f32; self.params];
            self.gather(comm, &mine, &mut full)?;
            out.buffers.push((name, full));
        }
        Ok(out)
    }

    /// This rank's block of every buffer of a whole state (from a checkpoint).
    pub fn slice_state(&self, st: &OptimizerState<f32>) -> Result<OptimizerState<f32>> {
        let own = self.own();
        let mut out = OptimizerState { buffers: Vec::new(), scalars: st.scalars.clone() };
        for (name, full) in &st.buffers {
            if full.len() != self.params {
                return Err(Error::optimizer(format!(
                    "state `{name}` has {} entries, the model {}",
                    full.len(),
                    self.params
                )));
            }
            out.buffers.push((name.clone(), full[own.clone()].to_vec()));
        }
        Ok(out)
    }
}

/// The model's full parameter vector and local gradient when the optimizer is sharded.
struct FullBuffers {
    sharding: ParamSharding,
    /// θ_i, all-gathered (N·B; the model reads the first P).
    theta: Vec<f32>,
    /// This rank's gradient over its batch slice, before the reduce-scatter (N·B, zero past P).
    grad: Vec<f32>,
    /// This rank's block, padded to B: the all-gather's send buffer, then the reduce-scatter's
    /// result.
    block: Vec<f32>,
}

pub struct ShardedField<'a> {
    inner: ModelField<'a>,
    comm: &'a dyn Communicator,
    /// The L2 penalty (`optimizer.l2`): λ and the ranges of θ it applies to (weights of rank ≥ 2).
    l2: Option<(f64, Vec<std::ops::Range<usize>>)>,
    /// Set when the optimizer is sharded: `eval` then takes and returns this rank's block.
    full: Option<FullBuffers>,
    /// Set when the solver runs on the GPU: device evaluations and the NCCL all-reduce.
    gpu: Option<GpuParts>,
}

/// What the device evaluation needs: the kernels on the model's stream (θ in, gradient out) and,
/// with more than one rank, the NCCL communicator on that stream.
pub struct GpuParts {
    pub kernels: std::sync::Arc<crate::kernels::cuda::RkKernels>,
    pub nccl: Option<kutta_collectives::NcclComm>,
}

type DeviceBuf = crate::kernels::cuda::DeviceBuf;

impl<'a> ShardedField<'a> {
    pub fn new(inner: ModelField<'a>, comm: &'a dyn Communicator) -> Self {
        Self { inner, comm, l2: None, full: None, gpu: None }
    }

    /// Evaluate on device buffers from now on (`VectorField<f32, CudaSlice<f32>>`, the solver's
    /// GPU back end): the model reads θ from and writes the gradient to flat device buffers, and
    /// the gradient is summed over ranks by `parts.nccl` with no host round trip. Not together
    /// with a sharded optimizer (whose blocks live on the host).
    pub fn use_gpu(&mut self, parts: GpuParts) -> Result<()> {
        if self.full.is_some() {
            return Err(Error::config(
                "train.shard_optimizer",
                "the sharded optimizer keeps its blocks on the host; it cannot be combined with the GPU solver",
            ));
        }
        if self.comm.world_size() > 1 && parts.nccl.is_none() {
            return Err(Error::internal(format!(
                "{} ranks on the GPU need an NCCL communicator for the gradient all-reduce",
                self.comm.world_size()
            )));
        }
        if self.l2.is_some() {
            return Err(Error::config(
                "optimizer.l2",
                "the L2 penalty is not on the GPU solver yet; set train.gpu_solver = false to use it on the GPU",
            ));
        }
        self.inner.use_solver_kernels(&Some(parts.kernels.clone()));
        self.gpu = Some(parts);
        Ok(())
    }

    /// Shard the optimizer: from now on `eval` takes θ's block `sharding.own()` and writes the
    /// gradient's block, all-gathering θ_i before the model runs and reduce-scattering the
    /// gradient after it; `sum_shards` all-reduces. A world of one rank gets the same code path
    /// (its block is all of θ).
    pub fn shard_optimizer(&mut self, sharding: ParamSharding) {
        let n = sharding.padded();
        self.full =
            Some(FullBuffers { theta: vec![0.0; n], grad: vec![0.0; n], block: vec![0.0; sharding.block], sharding });
    }

    /// Add an L2 penalty ½·λ·Σ θ_i² over the tensors of rank ≥ 2 of `layout` to the loss, and λ·θ_i
    /// to their gradients (`optimizer.l2`, init2winit's `l2_decay_factor` with rank threshold 2).
    /// It is added once, after the gradient is summed over the ranks (to this rank's block when
    /// the optimizer is sharded), so every stage of an RK step sees it.
    pub fn set_l2(&mut self, lambda: f64, layout: &crate::layout::ParamLayout) -> Result<()> {
        if lambda <= 0.0 {
            self.l2 = None;
            return Ok(());
        }
        if self.gpu.is_some() {
            return Err(Error::config(
                "optimizer.l2",
                "the L2 penalty is not on the GPU solver yet; set train.gpu_solver = false to use it on the GPU",
            ));
        }
        let ranges = layout.params.iter().filter(|p| p.shape.len() >= 2).map(|p| p.range()).collect();
        self.l2 = Some((lambda, ranges));
        Ok(())
    }

    /// The penalty on θ (the whole vector, or the block starting at `offset`): its loss, with λ·θ
    /// added to `grad`.
    fn add_l2(&self, theta: &[f32], grad: &mut [f32], offset: usize) -> f64 {
        let Some((lambda, ranges)) = &self.l2 else { return 0.0 };
        let lam = *lambda as f32;
        let mut sq = 0.0f64;
        let end = offset + theta.len();
        for r in ranges {
            let (lo, hi) = (r.start.max(offset), r.end.min(end));
            if lo >= hi {
                continue;
            }
            for (g, &t) in grad[lo - offset..hi - offset].iter_mut().zip(&theta[lo - offset..hi - offset]) {
                *g += lam * t;
                sq += t as f64 * t as f64;
            }
        }
        0.5 * lambda * sq
    }

    /// Use this rank's slice of `global`, the batch of optimizer step `step`, for every following
    /// evaluation. Collective (one scalar all-reduce): a batch that could not be gathered on any
    /// rank (an image file that does not decode) is an error on every rank, before the step's
    /// first gradient all-reduce, so no rank is left waiting in it.
    pub fn set_global_batch(&mut self, step: u64, global: &[usize]) -> Result<()> {
        self.inner.set_step(step);
        self.inner.set_batch(rank_slice(global, self.comm.rank(), self.comm.world_size()), global.len());
        agree(self.comm, "gathering the batch", self.inner.batch_problem())
    }

    /// Update the model state (batch norm's running statistics) with the batch statistics this
    /// step's first evaluation recorded, summed over every rank (one small all-reduce): the
    /// running statistics are the mean over all ghost batches of the global batch, as on one
    /// process. Collective; call once per accepted step. Nothing for a model without state.
    pub fn update_model_state(&mut self, state: &mut crate::model::ModelState, momentum: f64) -> Result<()> {
        if state.values.is_empty() {
            return Ok(());
        }
        let stats = self.inner.take_batch_stats();
        if self.comm.world_size() == 1 {
            return match stats {
                Some(s) => state.update(&s, momentum),
                None => Err(Error::internal("model state: no batch statistics were recorded in this step")),
            };
        }
        let n = state.values.len();
        // A rank whose slice is empty (or that recorded nothing) adds zeros.
        let mut buf: Vec<f32> = match &stats {
            Some(s) => s.sums.iter().map(|&v| v as f32).chain([s.groups as f32]).collect(),
            None => vec![0.0; n + 1],
        };
        self.comm.all_reduce_sum(&mut buf)?;
        let groups = buf[n].round() as u64;
        let sums = buf[..n].iter().map(|&v| v as f64).collect();
        state.update(&crate::model::BatchStats { sums, groups }, momentum)
    }

    /// How many evaluations recorded batch statistics (`ModelField::stat_captures`).
    pub fn stat_captures(&self) -> u64 {
        self.inner.stat_captures()
    }

    /// Free the model's native-path buffers (`ModelField::release_workspace`).
    pub fn release_workspace(&mut self) {
        self.inner.release_workspace();
    }

    /// The most GPU memory this rank's model was seen using (`ModelField::peak_device_bytes`).
    pub fn peak_device_bytes(&self) -> u64 {
        self.inner.peak_device_bytes()
    }

    /// The whole parameter vector for evaluation and checkpoints: `theta` itself, or, with a
    /// sharded optimizer (`theta` is this rank's block), every rank's block gathered. Collective
    /// when sharded: every rank must call it.
    pub fn full_params<'s>(&'s mut self, theta: &'s [f32]) -> Result<&'s [f32]> {
        match &mut self.full {
            None => Ok(theta),
            Some(f) => {
                f.sharding.gather_padded(self.comm, theta, &mut f.block, &mut f.theta)?;
                Ok(&f.theta[..f.sharding.params])
            }
        }
    }
}

impl VectorField<f32> for ShardedField<'_> {
    fn dim(&self) -> usize {
        match &self.full {
            None => VectorField::<f32>::dim(&self.inner),
            Some(f) => f.sharding.own().len(),
        }
    }

    fn eval(&mut self, theta: &[f32], grad: &mut [f32]) -> Result<f64> {
        let (local, penalty) = match &mut self.full {
            None => {
                let local = self.inner.eval(theta, grad)?;
                self.comm.all_reduce_sum(grad)?;
                // The same on every rank: added after the sum, once.
                (local, self.add_l2(theta, grad, 0))
            }
            Some(f) => {
                let p = f.sharding.params;
                if grad.len() != theta.len() {
                    return Err(Error::internal(format!(
                        "sharded field: θ block of {} but gradient block of {}",
                        theta.len(),
                        grad.len()
                    )));
                }
                f.sharding.gather_padded(self.comm, theta, &mut f.block, &mut f.theta)?;
                let local = self.inner.eval(&f.theta[..p], &mut f.grad[..p])?;
                self.comm.reduce_scatter_sum(&f.grad, &mut f.block)?;
                grad.copy_from_slice(&f.block[..grad.len()]);
                let offset = f.sharding.own().start;
                // This block's part of the penalty: summed over the ranks with the loss.
                let block_penalty = self.add_l2(theta, grad, offset);
                (local + block_penalty, 0.0)
            }
        };
        Ok(self.comm.all_reduce_sum_f64(local)? + penalty)
    }

    fn sum_shards(&mut self, x: f64) -> Result<f64> {
        match self.full {
            None => Ok(x),
            Some(_) => Ok(self.comm.all_reduce_sum_f64(x)?),
        }
    }

    fn on_device(&mut self) -> Option<&mut dyn VectorField<f32, DeviceBuf>> {
        if self.gpu.is_some() {
            Some(self)
        } else {
            None
        }
    }
}

/// The same field on device buffers (see `use_gpu`): each stage gradient is computed on this
/// rank's slice of the batch into a device buffer and all-reduced there by NCCL before the
/// solver forms the next stage point (SPEC §5), exactly as the host path does with host buffers.
impl VectorField<f32, DeviceBuf> for ShardedField<'_> {
    fn dim(&self) -> usize {
        VectorField::<f32>::dim(&self.inner)
    }

    fn eval(&mut self, theta: &DeviceBuf, grad: &mut DeviceBuf) -> Result<f64> {
        let gpu =
            self.gpu.as_ref().ok_or_else(|| Error::internal("ShardedField: a device evaluation before use_gpu"))?;
        let local = self.inner.eval_device(&gpu.kernels, theta, grad)?;
        if let Some(nccl) = &gpu.nccl {
            nccl.all_reduce_sum_device(grad)?;
        }
        Ok(self.comm.all_reduce_sum_f64(local)?)
    }
}

/// Every rank passes its own outcome; all ranks return Ok only if every rank succeeded. A rank
/// that failed returns its own error; the others learn that some rank failed. This keeps a
/// failure on one rank (a bad file, an existing run folder) from leaving the others waiting in
/// the next collective.
pub fn agree<T>(comm: &dyn Communicator, what: &str, outcome: Result<T>) -> Result<T> {
    let failed = comm.all_reduce_sum_f64(if outcome.is_err() { 1.0 } else { 0.0 })?;
    match outcome {
        Err(e) => Err(e),
        Ok(_) if failed > 0.0 => Err(Error::PeerFailed { what: what.to_string(), ranks: failed.round() as usize }),
        Ok(v) => Ok(v),
    }
}

/// The part of a global batch that `rank` of `size` gathers (what `ShardedField` evaluates; the
/// image-folder prefetcher plans with it too).
pub fn rank_slice(global: &[usize], rank: usize, size: usize) -> &[usize] {
    &global[shard_range(global.len(), rank, size)]
}

/// This rank's share of an evaluation set (copied once; the test set is small).
pub fn shard_dataset(data: &Dataset, rank: usize, size: usize) -> Dataset {
    data.slice(shard_range(data.len(), rank, size))
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
