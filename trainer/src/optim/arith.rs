//! Where the RK solver's buffer arithmetic runs: `Arith` is the solver's back end.
//!
//! `optim::rk::RkSolver` holds its flat buffers (k_1, the stage point, the accumulators, the stage
//! gradients, G, m, D) as `Arith::Owned` values and does every operation on them through this
//! trait, so the same solver code — step-size control, retries, error control, DALR, streaming —
//! runs on the host (`Host`: `Vec<F>`, the functions of `kernels::reference`) and on a GPU
//! (`kernels::cuda::RkKernels`: `CudaSlice<f32>`, the fused kernels of `rk.cu`, feature `cuda`).
//! Each method is one kernel; the host versions are the CPU references the kernel tests compare
//! the kernels against, so the CPU solver *is* the reference.
//!
//! Reductions return this rank's partial sum; the solver combines shards with
//! `VectorField::sum_shards`, so the back end never talks to other ranks.

use crate::error::Result;
use crate::kernels::reference as r;
use crate::scalar::Scalar;
use std::borrow::BorrowMut;

/// The flat-buffer operations of one RK step (see `kernels::reference` for what each computes).
pub trait Arith<F: Scalar> {
    /// A borrowed flat buffer: `[F]` on the host, `CudaSlice<f32>` on a GPU.
    type Buf: ?Sized;
    /// An owned flat buffer (`Vec<F>`, `CudaSlice<f32>`).
    type Owned: BorrowMut<Self::Buf>;

    /// A zeroed buffer of `p` entries.
    fn alloc(&self, p: usize) -> Result<Self::Owned>;
    fn len(&self, b: &Self::Buf) -> usize;
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf) -> Result<()>;
    fn zero(&self, b: &mut Self::Buf) -> Result<()>;
    /// x = θ − (h·D)⊙Σ_j a_j k_j (left to right), x = θ with no stage.
    fn stage_point(
        &self,
        x: &mut Self::Buf,
        theta: &Self::Buf,
        d: Option<&Self::Buf>,
        stages: &[(&Self::Buf, F)],
        h: F,
    ) -> Result<()>;
    /// acc += b·k (b ≠ 0), err += e·k (e ≠ 0).
    fn accumulate(&self, acc: &mut Self::Buf, err: Option<&mut Self::Buf>, k: &Self::Buf, b: F, e: F) -> Result<()>;
    /// acc = β·m + acc (with m), then x = θ − (h·D)⊙acc.
    #[allow(clippy::too_many_arguments)]
    fn final_update(
        &self,
        x: &mut Self::Buf,
        theta: &Self::Buf,
        acc: &mut Self::Buf,
        m: Option<&Self::Buf>,
        d: Option<&Self::Buf>,
        beta: F,
        h: F,
    ) -> Result<()>;
    /// D = 1/sqrt(ε + (G + k1²)).
    fn adagrad_d(&self, d: &mut Self::Buf, g: &Self::Buf, k1: &Self::Buf, eps: F) -> Result<()>;
    /// G = G + k1².
    fn adagrad_commit(&self, g: &mut Self::Buf, k1: &Self::Buf) -> Result<()>;
    /// Σ (D v)² in f64 (this shard).
    fn dnorm2(&self, v: &Self::Buf, d: Option<&Self::Buf>) -> Result<f64>;
    /// Σ (D (a − b))² in f64 (this shard).
    fn ddiff2(&self, a: &Self::Buf, b: &Self::Buf, d: Option<&Self::Buf>) -> Result<f64>;
    /// Σ ((h·d·err) / (atol + rtol·|θ|))² in f64 (this shard).
    #[allow(clippy::too_many_arguments)]
    fn error_sum(
        &self,
        theta: &Self::Buf,
        err: &Self::Buf,
        d: Option<&Self::Buf>,
        h: f64,
        atol: f64,
        rtol: f64,
    ) -> Result<f64>;
    /// Entries that are NaN or ±Inf (this shard).
    fn nonfinite_count(&self, v: &Self::Buf) -> Result<u64>;
    /// A copy on the host (checkpoints, `Optimizer::state`).
    fn download(&self, b: &Self::Buf) -> Result<Vec<F>>;
    /// A buffer holding `v` (resuming from a checkpoint).
    fn upload(&self, v: &[F]) -> Result<Self::Owned>;
}

/// The host back end: plain slices and the reference functions (which the compiler vectorizes).
#[derive(Clone, Copy, Debug, Default)]
pub struct Host;

impl<F: Scalar> Arith<F> for Host {
    type Buf = [F];
    type Owned = Vec<F>;

    fn alloc(&self, p: usize) -> Result<Vec<F>> {
        Ok(vec![F::zero(); p])
    }
    fn len(&self, b: &[F]) -> usize {
        b.len()
    }
    fn copy(&self, dst: &mut [F], src: &[F]) -> Result<()> {
        dst.copy_from_slice(src);
        Ok(())
    }
    fn zero(&self, b: &mut [F]) -> Result<()> {
        b.fill(F::zero());
        Ok(())
    }
    fn stage_point(&self, x: &mut [F], theta: &[F], d: Option<&[F]>, stages: &[(&[F], F)], h: F) -> Result<()> {
        r::stage_point(x, theta, d, stages, h);
        Ok(())
    }
    fn accumulate(&self, acc: &mut [F], err: Option<&mut [F]>, k: &[F], b: F, e: F) -> Result<()> {
        r::accumulate(acc, err, k, b, e);
        Ok(())
    }
    fn final_update(
        &self,
        x: &mut [F],
        theta: &[F],
        acc: &mut [F],
        m: Option<&[F]>,
        d: Option<&[F]>,
        beta: F,
        h: F,
    ) -> Result<()> {
        r::final_update(x, theta, acc, m, d, beta, h);
        Ok(())
    }
    fn adagrad_d(&self, d: &mut [F], g: &[F], k1: &[F], eps: F) -> Result<()> {
        r::adagrad_d(d, g, k1, eps);
        Ok(())
    }
    fn adagrad_commit(&self, g: &mut [F], k1: &[F]) -> Result<()> {
        r::adagrad_commit(g, k1);
        Ok(())
    }
    fn dnorm2(&self, v: &[F], d: Option<&[F]>) -> Result<f64> {
        Ok(r::dnorm2(v, d))
    }
    fn ddiff2(&self, a: &[F], b: &[F], d: Option<&[F]>) -> Result<f64> {
        Ok(r::ddiff2(a, b, d))
    }
    fn error_sum(&self, theta: &[F], err: &[F], d: Option<&[F]>, h: f64, atol: f64, rtol: f64) -> Result<f64> {
        Ok(r::error_sum(theta, err, d, h, atol, rtol))
    }
    fn nonfinite_count(&self, v: &[F]) -> Result<u64> {
        Ok(r::nonfinite_count(v))
    }
    fn download(&self, b: &[F]) -> Result<Vec<F>> {
        Ok(b.to_vec())
    }
    fn upload(&self, v: &[F]) -> Result<Vec<F>> {
        Ok(v.to_vec())
    }
}
