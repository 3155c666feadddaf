//! The layers of a transformer, each with a gradient that is exact to rounding: LayerNorm over
//! the last dimension, the exact-erf GELU, the softmax over the last dimension, multi-head
//! self-attention and token-wise linear layers.
//!
//! candle's fused `candle_nn::ops::layer_norm` and `softmax_last_dim` have no backward pass (the
//! gradient stops at them), and the backward pass of its `gelu_erf` uses 1/√(2π) rounded to six
//! digits. On the CPU (f32, f64) LayerNorm, GELU and softmax are therefore custom ops with their
//! own backward passes (row-parallel, with statistics accumulated in f64; the parameter
//! gradients of LayerNorm are summed over fixed blocks of rows in a fixed order, so they do not
//! depend on the number of threads); elsewhere (CUDA, and half precision, which is first
//! widened to f32 as PyTorch's autocast does for these ops) they are compositions of candle ops
//! that all have backward passes. The CPU ops are tested against those compositions and against
//! finite differences.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType, D};
use rayon::prelude::*;

use super::layers::{cpu_native, for_dtype, matmul as graph_matmul, slice};
use super::native::{matmul, matmul_on, Elem, Mat};
use crate::error::{Error, Result};

/// ε of LayerNorm in timm's Vision Transformer (`partial(nn.LayerNorm, eps=1e-6)`).
pub(crate) const LN_EPS: f64 = 1e-6;

/// Rows per block of LayerNorm's parameter-gradient sums: fixed, so that the summation order
/// does not depend on the thread count.
const ROW_BLOCK: usize = 64;
/// Elements per parallel task of the element-wise GELU.
const ELEM_BLOCK: usize = 1 << 14;

/// Half-precision tensors are widened to f32 for the normalisations (PyTorch's autocast runs
/// LayerNorm and softmax in f32); the result is narrowed back.
fn widened(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    match x.dtype() {
        DType::BF16 | DType::F16 => Ok(f(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?),
        _ => f(x),
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

/// LayerNorm over the last dimension D of x [..., D]: (x − mean) / √(var + ε) · γ + β with the
/// biased variance, γ and β [D] (PyTorch's `nn.LayerNorm(D, eps)`).
pub(crate) fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if gamma.dims() != [d] || beta.dims() != [d] {
        return Err(Error::model(format!(
            "layer norm over {d} features with γ {:?} and β {:?}",
            gamma.dims(),
            beta.dims()
        )));
    }
    widened(x, |x| {
        let (gamma, beta) = (gamma.to_dtype(x.dtype())?, beta.to_dtype(x.dtype())?);
        if !cpu_native(&[x, &gamma, &beta]) {
            return layer_norm_ops(x, &gamma, &beta, eps);
        }
        let (x, gamma, beta) = (x.contiguous()?, gamma.contiguous()?, beta.contiguous()?);
        let op = LayerNormOp { eps };
        Ok(if x.track_op() || gamma.track_op() || beta.track_op() {
            x.apply_op3(&gamma, &beta, op)?
        } else {
            x.apply_op3_no_bwd(&gamma, &beta, &op)?
        })
    })
}

/// `layer_norm` from candle ops with backward passes (CUDA; the CPU op's reference).
pub(crate) fn layer_norm_ops(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xhat = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(xhat.broadcast_mul(gamma)?.broadcast_add(beta)?)
}

/// The mean and 1/√(var + ε) of one row, in f64.
fn row_stats<T: WithDType>(row: &[T], eps: f64) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = row.iter().map(|v| v.to_f64()).sum::<f64>() / n;
    let var = row.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

struct LayerNormOp {
    eps: f64,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let eps = self.eps;
        for_dtype!(s1, T => {
            let (x, g, b) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?, slice::<T>(s3, l3)?);
            let d = g.len();
            let mut y = vec![T::from_f64(0.0); x.len()];
            y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
                let (mean, rstd) = row_stats(x, eps);
                for (((y, x), g), b) in y.iter_mut().zip(x).zip(g).zip(b) {
                    *y = T::from_f64((x.to_f64() - mean) * rstd * g.to_f64() + b.to_f64());
                }
            });
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }
    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let grads = x.apply_op3_no_bwd(gamma, &g, &LayerNormGrad { eps: self.eps })?;
        // grads is [rows + 2, D]: dx's rows, then dγ, then dβ.
        let d = gamma.dim(0)?;
        let rows = x.elem_count() / d.max(1);
        let dx = grads.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dgamma = grads.get(rows)?;
        let dbeta = grads.get(rows + 1)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// (x, γ, g) → [dx rows; dγ; dβ] of `LayerNormOp`: with x̂ the normalised row and r = 1/σ,
/// dx = r·(gγ − mean(gγ) − x̂·mean(gγ·x̂)), dγ = Σ_rows g·x̂, dβ = Σ_rows g.
struct LayerNormGrad {
    eps: f64,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer-norm-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let eps = self.eps;
        for_dtype!(s1, T => {
            let (x, gamma, g) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?, slice::<T>(s3, l3)?);
            let d = gamma.len();
            let rows = x.len() / d.max(1);
            let mut out = vec![T::from_f64(0.0); (rows + 2) * d];
            let (dx, _) = out.split_at_mut(rows * d);
            // Per block of rows: dx, and the block's partial dγ, dβ (f64).
            let partials: Vec<Vec<f64>> = dx
                .par_chunks_mut(ROW_BLOCK * d)
                .zip(x.par_chunks(ROW_BLOCK * d))
                .zip(g.par_chunks(ROW_BLOCK * d))
                .map(|((dx, x), g)| {
                    let mut part = vec![0.0f64; 2 * d];
                    let mut gg = vec![0.0f64; d];
                    for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                        let (mean, rstd) = row_stats(x, eps);
                        let (mut a, mut b) = (0.0f64, 0.0f64);
                        for i in 0..d {
                            let xhat = (x[i].to_f64() - mean) * rstd;
                            let gi = g[i].to_f64();
                            gg[i] = gi * gamma[i].to_f64();
                            a += gg[i];
                            b += gg[i] * xhat;
                            part[i] += gi * xhat;
                            part[d + i] += gi;
                        }
                        let (a, b) = (a / d as f64, b / d as f64);
                        for i in 0..d {
                            let xhat = (x[i].to_f64() - mean) * rstd;
                            dx[i] = T::from_f64(rstd * (gg[i] - a - xhat * b));
                        }
                    }
                    part
                })
                .collect();
            let mut sums = vec![0.0f64; 2 * d];
            for part in &partials {
                for (s, p) in sums.iter_mut().zip(part) {
                    *s += p;
                }
            }
            for (o, s) in out[rows * d..].iter_mut().zip(&sums) {
                *o = T::from_f64(*s);
            }
            Ok((T::to_cpu_storage_owned(out), Shape::from((rows + 2, d))))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// GELU

/// The exact GELU, x·Φ(x) = x/2·(1 + erf(x/√2)) (PyTorch's `nn.GELU()`, timm's default).
pub(crate) fn gelu(x: &Tensor) -> Result<Tensor> {
    if !cpu_native(&[x]) {
        return gelu_ops(x);
    }
    let x = x.contiguous()?;
    Ok(if x.track_op() { x.apply_op1(Gelu)? } else { x.apply_op1_no_bwd(&Gelu)? })
}

/// `gelu` from candle ops with backward passes (erf's derivative is computed in f64 by candle).
pub(crate) fn gelu_ops(x: &Tensor) -> Result<Tensor> {
    let phi = ((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)?;
    Ok(((x * 0.5)? * phi)?)
}

/// x·Φ(x) and its derivative Φ(x) + x·φ(x), in the element type (erf from libm: `erff` for
/// f32, as PyTorch's f32 kernel evaluates erf in f32).
fn gelu_and_slope<T: Real>(x: T) -> (T, T) {
    let half = T::from_f64(0.5);
    let cdf = half * (T::one() + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf());
    let pdf =
        (-half * x * x).exp() * T::from_f64(0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
    (x * cdf, cdf + x * pdf)
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        for_dtype!(s, T => {
            let x = slice::<T>(s, l)?;
            let mut y = vec![T::from_f64(0.0); x.len()];
            y.par_chunks_mut(ELEM_BLOCK).zip(x.par_chunks(ELEM_BLOCK)).for_each(|(y, x)| {
                for (y, x) in y.iter_mut().zip(x) {
                    *y = gelu_and_slope(*x).0;
                }
            });
            Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
        })
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluGrad)?))
    }
}

/// (x, g) → g·GELU′(x).
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "gelu-erf-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        for_dtype!(s1, T => {
            let (x, g) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?);
            let mut dx = vec![T::from_f64(0.0); x.len()];
            dx.par_chunks_mut(ELEM_BLOCK).zip(x.par_chunks(ELEM_BLOCK)).zip(g.par_chunks(ELEM_BLOCK)).for_each(
                |((dx, x), g)| {
                    for ((dx, x), g) in dx.iter_mut().zip(x).zip(g) {
                        *dx = *g * gelu_and_slope(*x).1;
                    }
                },
            );
            Ok((T::to_cpu_storage_owned(dx), l1.shape().clone()))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax

/// Softmax over the last dimension from candle ops with backward passes (the attention's path
/// off the CPU, where the CPU has it inside `Attention`); the maximum subtracted for stability
/// is detached (the value does not depend on it, so neither does the gradient).
pub(crate) fn softmax_ops(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

// ---------------------------------------------------------------------------------------------
// Token-wise layers and attention

/// y = x·wᵀ + b over the last dimension of x [..., in]: w [out, in], b [out] (`nn.Linear`).
///
/// On the CPU one op (`Linear`) on `native`'s GEMM: forward the bias is written first and the
/// product added onto it (no separate broadcast pass), backward dx = g·w, dw = gᵀ·x (as strided
/// views, no transposed copies) and db = the column sums of g, each only for an input that
/// takes a gradient (the images of the patch embedding do not). Elsewhere candle's matmul and
/// broadcast add.
pub(crate) fn token_linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (n_in, rows) = (dims[dims.len() - 1], x.elem_count() / dims[dims.len() - 1].max(1));
    let x2 = x.reshape((rows, n_in))?;
    let y = if cpu_native(&[&x2, w, b]) {
        let (x2, w, b) = (x2.contiguous()?, w.contiguous()?, b.contiguous()?);
        if x2.track_op() || w.track_op() || b.track_op() {
            x2.apply_op3(&w, &b, Linear)?
        } else {
            x2.apply_op3_no_bwd(&w, &b, &Linear)?
        }
    } else {
        graph_matmul(&x2, &w.t()?)?.broadcast_add(b)?
    };
    let mut out = dims;
    *out.last_mut().expect("a dimension") = w.dim(0)?;
    Ok(y.reshape(out)?)
}

/// `token_linear` from candle ops (the CPU op's reference).
#[cfg(test)]
fn token_linear_ops(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?.broadcast_add(b)?)
}

/// (x [r, i], w [o, i], b [o]) → x·wᵀ + b [r, o].
struct Linear;

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (r, i) = l1.shape().dims2()?;
        let (o, _) = l2.shape().dims2()?;
        for_dtype!(s1, T => {
            let (x, w, b) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?, slice::<T>(s3, l3)?);
            let mut y: Vec<T> = Vec::with_capacity(r * o);
            for _ in 0..r {
                y.extend_from_slice(b);
            }
            matmul(&mut y, Mat::row_major(x, r, i), Mat::row_major(w, o, i).t(), true).map_err(gemm_err)?;
            Ok((T::to_cpu_storage_owned(y), Shape::from((r, o))))
        })
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = if x.track_op() { Some(g.apply_op2_no_bwd(w, &Product { transpose_a: false })?) } else { None };
        let dw = if w.track_op() { Some(g.apply_op2_no_bwd(x, &Product { transpose_a: true })?) } else { None };
        let db = if b.track_op() { Some(g.apply_op1_no_bwd(&ColumnSums)?) } else { None };
        Ok((dx, dw, db))
    }
}

/// (a, c) → a·c, or aᵀ·c with `transpose_a` (both row-major, contiguous).
struct Product {
    transpose_a: bool,
}

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "linear-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((ar, ac), (cr, cc)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        for_dtype!(s1, T => {
            let (a, c) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?);
            let a = Mat::row_major(a, ar, ac);
            let a = if self.transpose_a { a.t() } else { a };
            let mut out = vec![T::from_f64(0.0); a.rows * cc];
            matmul(&mut out, a, Mat::row_major(c, cr, cc), false).map_err(gemm_err)?;
            Ok((T::to_cpu_storage_owned(out), Shape::from((a.rows, cc))))
        })
    }
}

/// g [r, o] → Σ_rows g [o]: in parallel over blocks of columns, each column summed over the
/// rows in order (the same sums for any thread count).
struct ColumnSums;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "column-sums"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, o) = l.shape().dims2()?;
        for_dtype!(s, T => {
            let g = slice::<T>(s, l)?;
            let mut out = vec![T::from_f64(0.0); o];
            out.par_chunks_mut(ROW_BLOCK).enumerate().for_each(|(k, cols)| {
                let start = k * ROW_BLOCK;
                for row in g.chunks_exact(o.max(1)) {
                    for (c, &v) in cols.iter_mut().zip(&row[start..]) {
                        *c += v;
                    }
                }
            });
            Ok((T::to_cpu_storage_owned(out), Shape::from(o)))
        })
    }
}

/// Multi-head self-attention of x [B, T, D] as timm's `Attention`: qkv = x·W_qkvᵀ + b_qkv split
/// into q, k, v with `heads` heads of D / heads features (the 3·D outputs ordered (q|k|v, head,
/// feature)), softmax(q·kᵀ / √head_dim)·v, heads concatenated, then the projection.
///
/// On the CPU the middle part (qkv → heads concatenated) is one op (`Attention`) with its own
/// backward pass, parallel over the samples: per sample and head two small GEMMs forward and four
/// backward, on views of qkv (no transposed copies), the probabilities recomputed in the
/// backward pass rather than kept. Elsewhere it is `attention_ops`.
pub(crate) fn self_attention(
    x: &Tensor,
    qkv_w: &Tensor,
    qkv_b: &Tensor,
    proj_w: &Tensor,
    proj_b: &Tensor,
    heads: usize,
) -> Result<Tensor> {
    let (_, _, d) = x.dims3()?;
    if heads == 0 || d % heads != 0 {
        return Err(Error::model(format!("attention over {d} features cannot have {heads} heads")));
    }
    let qkv = token_linear(x, qkv_w, qkv_b)?; // [B, T, 3D]
    let out = if cpu_native(&[&qkv]) {
        let qkv = qkv.contiguous()?;
        let op = Attention { heads };
        if qkv.track_op() {
            qkv.apply_op1(op)?
        } else {
            qkv.apply_op1_no_bwd(&op)?
        }
    } else {
        attention_ops(&qkv, heads)?
    };
    token_linear(&out, proj_w, proj_b)
}

/// qkv [B, T, 3D] → the heads' outputs concatenated [B, T, D], from candle ops (CUDA; the CPU
/// op's reference).
pub(crate) fn attention_ops(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, d3) = qkv.dims3()?;
    let d = d3 / 3;
    let hd = d / heads;
    let qkv = qkv.reshape((b, t, 3, heads, hd))?.permute((2, 0, 3, 1, 4))?; // [3, B, H, T, hd]
    let q = (qkv.get(0)? * (1.0 / (hd as f64).sqrt()))?.contiguous()?;
    let k = qkv.get(1)?.contiguous()?;
    let v = qkv.get(2)?.contiguous()?;
    let attn = widened(&graph_matmul(&q, &k.t()?)?, softmax_ops)?; // [B, H, T, T]
    Ok(graph_matmul(&attn, &v)?.transpose(1, 2)?.reshape((b, t, d))?)
}

/// The element types of the CPU ops: `native`'s GEMM element with exp and erf.
trait Real: Elem + num_traits::Float {
    fn erf(self) -> Self;
}
impl Real for f32 {
    fn erf(self) -> Self {
        libm::erff(self)
    }
}
impl Real for f64 {
    fn erf(self) -> Self {
        libm::erf(self)
    }
}

/// One head of one sample: views of q, k, v (T × hd, row stride 3D) inside a sample's qkv rows.
struct Head<'a, T> {
    q: Mat<'a, T>,
    k: Mat<'a, T>,
    v: Mat<'a, T>,
}

impl<'a, T: Real> Head<'a, T> {
    fn of(sample: &'a [T], t: usize, d: usize, h: usize, hd: usize) -> Self {
        let view = |part: usize| Mat { data: &sample[part * d + h * hd..], rows: t, cols: hd, rs: 3 * d, cs: 1 };
        Head { q: view(0), k: view(1), v: view(2) }
    }

    /// p = softmax(q·kᵀ·scale) row by row (T × T), into `p`.
    fn probabilities(&self, p: &mut [T], scale: f64) -> candle_core::Result<()> {
        let t = self.q.rows;
        matmul_on(p, self.q, self.k.t(), false, 1).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let scale = T::from_f64(scale);
        for row in p.chunks_mut(t) {
            let m = row.iter().fold(T::neg_infinity(), |m, &v| num_traits::Float::max(m, v * scale));
            let mut sum = 0.0f64;
            for v in row.iter_mut() {
                *v = (*v * scale - m).exp();
                sum += v.to_f64();
            }
            let inv = T::from_f64(1.0 / sum);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
        Ok(())
    }
}

/// Copy the rows of `src` (rows × cols, contiguous) into `dst` at `offset`, row stride `rs`.
fn scatter_rows<T: Copy>(src: &[T], cols: usize, dst: &mut [T], offset: usize, rs: usize) {
    for (i, row) in src.chunks(cols).enumerate() {
        dst[offset + i * rs..offset + i * rs + cols].copy_from_slice(row);
    }
}

fn gemm_err(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// qkv [B, T, 3D] → softmax(q·kᵀ/√hd)·v per head, concatenated [B, T, D].
struct Attention {
    heads: usize,
}

impl Attention {
    fn geometry(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (b, t, d3) = l.shape().dims3()?;
        let d = d3 / 3;
        if d3 % 3 != 0 || self.heads == 0 || d % self.heads != 0 {
            return Err(candle_core::Error::Msg(format!("attention: qkv of width {d3} for {} heads", self.heads)));
        }
        Ok((b, t, d, d / self.heads))
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "self-attention"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        // A transformer's activations are large (ViT-S/16 at batch 32: 9.7 MB per [B, T, D]
        // tensor, 39 MB per MLP hidden): reuse freed memory instead of page-faulting fresh
        // mappings in at every allocation (`threads::keep_freed_memory`).
        crate::threads::keep_freed_memory();
        let (b, t, d, hd) = self.geometry(l)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let heads = self.heads;
        for_dtype!(s, T => {
            let qkv = slice::<T>(s, l)?;
            let mut out = vec![T::from_f64(0.0); b * t * d];
            out.par_chunks_mut(t * d).zip(qkv.par_chunks(t * 3 * d)).try_for_each(|(out, sample)| {
                let (mut p, mut o) = (vec![T::from_f64(0.0); t * t], vec![T::from_f64(0.0); t * hd]);
                for h in 0..heads {
                    let head = Head::of(sample, t, d, h, hd);
                    head.probabilities(&mut p, scale)?;
                    matmul_on(&mut o, Mat::row_major(&p, t, t), head.v, false, 1).map_err(gemm_err)?;
                    scatter_rows(&o, hd, out, h * hd, d);
                }
                Ok::<(), candle_core::Error>(())
            })?;
            Ok((T::to_cpu_storage_owned(out), Shape::from((b, t, d))))
        })
    }
    fn bwd(&self, qkv: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(qkv.apply_op2_no_bwd(&g.contiguous()?, &AttentionGrad { heads: self.heads })?))
    }
}

/// (qkv, g [B, T, D]) → dqkv [B, T, 3D] of `Attention`. Per head, with P the probabilities
/// (recomputed), G the head's slice of g and s = 1/√hd: dV = Pᵀ·G, dP = G·Vᵀ,
/// dS = P ⊙ (dP − rowsum(dP ⊙ P))·s, dQ = dS·K, dK = dSᵀ·Q.
struct AttentionGrad {
    heads: usize,
}

impl CustomOp2 for AttentionGrad {
    fn name(&self) -> &'static str {
        "self-attention-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, t, d, hd) = Attention { heads: self.heads }.geometry(l1)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let heads = self.heads;
        for_dtype!(s1, T => {
            let (qkv, g) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?);
            let mut dqkv = vec![T::from_f64(0.0); b * t * 3 * d];
            dqkv.par_chunks_mut(t * 3 * d).zip(qkv.par_chunks(t * 3 * d)).zip(g.par_chunks(t * d)).try_for_each(
                |((dqkv, sample), g)| {
                    let zero = T::from_f64(0.0);
                    let (mut p, mut dp, mut o) = (vec![zero; t * t], vec![zero; t * t], vec![zero; t * hd]);
                    for h in 0..heads {
                        let head = Head::of(sample, t, d, h, hd);
                        let gh = Mat { data: &g[h * hd..], rows: t, cols: hd, rs: d, cs: 1 };
                        head.probabilities(&mut p, scale)?;
                        // dV = Pᵀ·G
                        matmul_on(&mut o, Mat::row_major(&p, t, t).t(), gh, false, 1).map_err(gemm_err)?;
                        scatter_rows(&o, hd, dqkv, 2 * d + h * hd, 3 * d);
                        // dP = G·Vᵀ, then dS in place.
                        matmul_on(&mut dp, gh, head.v.t(), false, 1).map_err(gemm_err)?;
                        for (dp, p) in dp.chunks_mut(t).zip(p.chunks(t)) {
                            let dot: f64 = dp.iter().zip(p).map(|(a, b)| a.to_f64() * b.to_f64()).sum();
                            let dot = T::from_f64(dot);
                            for (dp, &p) in dp.iter_mut().zip(p) {
                                *dp = p * (*dp - dot) * T::from_f64(scale);
                            }
                        }
                        let ds = Mat::row_major(&dp, t, t);
                        matmul_on(&mut o, ds, head.k, false, 1).map_err(gemm_err)?;
                        scatter_rows(&o, hd, dqkv, h * hd, 3 * d);
                        matmul_on(&mut o, ds.t(), head.q, false, 1).map_err(gemm_err)?;
                        scatter_rows(&o, hd, dqkv, d + h * hd, 3 * d);
                    }
                    Ok::<(), candle_core::Error>(())
                },
            )?;
            Ok((T::to_cpu_storage_owned(dqkv), Shape::from((b, t, 3 * d))))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rand_distr::StandardNormal.sample(&mut rng)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
        let b = b.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
        let scale = a.iter().chain(&b).fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
        a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale
    }

    /// The CPU op and the candle-op composition give the same value and the same gradients for
    /// every input (a random weighting g of the outputs makes the loss).
    fn against_ops(
        inputs: &[&[usize]],
        op: impl Fn(&[Tensor]) -> Result<Tensor>,
        ops: impl Fn(&[Tensor]) -> Result<Tensor>,
        tol: f64,
    ) {
        for dtype in [DType::F32, DType::F64] {
            let vars: Vec<Var> = inputs
                .iter()
                .enumerate()
                .map(|(i, s)| Var::from_tensor(&randn(s, 10 + i as u64, dtype)).unwrap())
                .collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let (y1, y2) = (op(&ts).unwrap(), ops(&ts).unwrap());
            assert!(max_rel(&y1, &y2) < tol, "{dtype:?} value: {}", max_rel(&y1, &y2));
            let g = randn(y1.dims(), 99, dtype);
            let (g1, g2) = ((y1 * &g).unwrap().sum_all().unwrap(), (y2 * &g).unwrap().sum_all().unwrap());
            let (g1, g2) = (g1.backward().unwrap(), g2.backward().unwrap());
            for (i, v) in vars.iter().enumerate() {
                let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                assert!(max_rel(a, b) < tol, "{dtype:?} grad {i}: {}", max_rel(a, b));
            }
        }
    }

    #[test]
    fn cpu_ops_match_their_candle_compositions() {
        against_ops(
            &[&[3, 5, 7], &[7], &[7]],
            |t| layer_norm(&t[0], &t[1], &t[2], LN_EPS),
            |t| layer_norm_ops(&t[0], &t[1], &t[2], LN_EPS),
            1e-5,
        );
        // More rows than one block: the parameter gradients are summed over several.
        against_ops(
            &[&[150, 4], &[4], &[4]],
            |t| layer_norm(&t[0], &t[1], &t[2], LN_EPS),
            |t| layer_norm_ops(&t[0], &t[1], &t[2], LN_EPS),
            1e-5,
        );
        against_ops(&[&[4, 33]], |t| gelu(&t[0]), |t| gelu_ops(&t[0]), 1e-5);
        // More output columns than one block of the bias gradient's sums.
        against_ops(
            &[&[7, 5], &[70, 5], &[70]],
            |t| token_linear(&t[0], &t[1], &t[2]),
            |t| token_linear_ops(&t[0], &t[1], &t[2]),
            1e-5,
        );
        // qkv of B 3, T 5, 2 heads of 4 features.
        against_ops(&[&[3, 5, 24]], |t| attention(&t[0], 2), |t| attention_ops(&t[0], 2), 1e-5);
    }

    /// The CPU attention op alone (without the projections around it).
    fn attention(qkv: &Tensor, heads: usize) -> Result<Tensor> {
        Ok(qkv.contiguous()?.apply_op1(Attention { heads })?)
    }

    /// Central differences in f64 of Σ g·f(inputs) against the backward pass, at every input
    /// coordinate.
    fn finite_differences(inputs: &[&[usize]], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
        let vars: Vec<Var> = inputs
            .iter()
            .enumerate()
            .map(|(i, s)| Var::from_tensor(&randn(s, 20 + i as u64, DType::F64)).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts).unwrap();
        let g = randn(y.dims(), 7, DType::F64);
        let loss = |ts: &[Tensor]| (f(ts).unwrap() * &g).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let h = 1e-6;
        for (i, v) in vars.iter().enumerate() {
            let analytic = grads.get(v).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let base = ts[i].flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for j in 0..base.len() {
                let at = |delta: f64| {
                    let mut p = base.clone();
                    p[j] += delta;
                    let mut moved: Vec<Tensor> = ts.iter().map(|t| t.detach()).collect();
                    moved[i] = Tensor::from_vec(p, ts[i].shape(), &Device::Cpu).unwrap();
                    loss(&moved)
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                let err = (fd - analytic[j]).abs();
                assert!(err <= 1e-6 * (1.0 + fd.abs()), "input {i} coord {j}: fd {fd} backward {}", analytic[j]);
            }
        }
    }

    #[test]
    fn layer_norm_gelu_softmax_gradients_match_finite_differences() {
        finite_differences(&[&[3, 6], &[6], &[6]], |t| layer_norm(&t[0], &t[1], &t[2], LN_EPS));
        finite_differences(&[&[2, 9]], |t| gelu(&t[0]));
        finite_differences(&[&[3, 5]], |t| softmax_ops(&t[0]));
    }

    #[test]
    fn attention_gradient_matches_finite_differences() {
        // B 2, T 3, D 4, 2 heads: every input of the layer, the tokens included.
        finite_differences(&[&[2, 3, 4], &[12, 4], &[12], &[4, 4], &[4]], |t| {
            self_attention(&t[0], &t[1], &t[2], &t[3], &t[4], 2)
        });
    }

    #[test]
    fn attention_is_the_definition() {
        // One head, qkv = identity stacks: q = k = v = x; out = softmax(x·xᵀ/√d)·x, proj = identity.
        let d = 3;
        let x = randn(&[1, 4, d], 3, DType::F64);
        let eye = Tensor::eye(d, DType::F64, &Device::Cpu).unwrap();
        let qkv_w = Tensor::cat(&[&eye, &eye, &eye], 0).unwrap();
        let zeros = |n: usize| Tensor::zeros(n, DType::F64, &Device::Cpu).unwrap();
        let y = self_attention(&x, &qkv_w, &zeros(3 * d), &eye, &zeros(d), 1).unwrap();
        let xv = x.squeeze(0).unwrap().to_vec2::<f64>().unwrap();
        let yv = y.squeeze(0).unwrap().to_vec2::<f64>().unwrap();
        for i in 0..4 {
            let s: Vec<f64> =
                (0..4).map(|j| (0..d).map(|c| xv[i][c] * xv[j][c]).sum::<f64>() / (d as f64).sqrt()).collect();
            let z: f64 = s.iter().map(|v| v.exp()).sum();
            for c in 0..d {
                let want: f64 = (0..4).map(|j| s[j].exp() / z * xv[j][c]).sum();
                assert!((yv[i][c] - want).abs() < 1e-12, "{i} {c}: {} vs {want}", yv[i][c]);
            }
        }
    }

    #[test]
    fn layer_norm_parameter_gradients_do_not_depend_on_threads() {
        let x = Var::from_tensor(&randn(&[300, 8], 1, DType::F32)).unwrap();
        let (gm, bt) =
            (Var::from_tensor(&randn(&[8], 2, DType::F32)).unwrap(), Var::zeros(8, DType::F32, &Device::Cpu).unwrap());
        let grad = || {
            let y = layer_norm(x.as_tensor(), gm.as_tensor(), bt.as_tensor(), LN_EPS).unwrap();
            let gs = (y.sqr().unwrap()).sum_all().unwrap().backward().unwrap();
            gs.get(&gm).unwrap().to_vec1::<f32>().unwrap()
        };
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(grad);
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap().install(grad);
        assert_eq!(one, three);
    }
}
