//! The host fast path: models that compute their own loss gradient on the flat buffers, without
//! candle tensors or an autograd graph (`Model::native`, today the MLP).
//!
//! candle's path (`ModelField::eval`'s general case) copies θ into one `Var` per tensor, records
//! a graph of small tensor ops (each allocating its output), walks it backwards (allocating every
//! gradient) and copies the gradients back into the flat buffer. For the MLP at batch 16 that
//! bookkeeping cost several times the arithmetic. Here a model reads its weights as views of θ,
//! runs its GEMMs on the `gemm` crate (the one candle's CPU back end uses, AVX-512 or AVX2/FMA
//! micro-kernels picked at run time) and writes each weight gradient straight into its range of
//! the flat gradient (accumulating across micro-batches inside the GEMM), with bias, ReLU and
//! the loss fused into single passes over buffers that live in a `Workspace` reused from one
//! evaluation to the next (no allocation once the batch size is steady).
//!
//! The arithmetic is the same as candle's (the same GEMM kernels on the same operands), but the
//! summation order differs in places (the bias gradient is a column sum here, a reduction in
//! candle), so the two paths agree to float32 rounding, not bit for bit; each path is
//! deterministic for a fixed thread count. One difference by convention: at a pre-activation of
//! exactly 0, ReLU's derivative is 0 here (PyTorch's convention) and 1 in candle. Tests check
//! both paths against each other and against finite differences.

use crate::error::{Error, Result};

/// A model's own loss and gradient on host buffers. Only for models without state outside θ
/// (batch norm's running statistics are not recorded on this path).
pub trait NativeGrad: Send + Sync {
    /// For one micro-batch of `m` samples — `x` [m, features] and `target` [m, classes] (one-hot
    /// or label-smoothed rows), row-major — returns Σ_b ℓ_b, the summed per-sample
    /// cross-entropies −Σ_k target_bk · log softmax(z_b)_k, and writes `scale` · ∇_θ Σ_b ℓ_b into
    /// `grad` (adds it to what `grad` holds when `accumulate`). `theta` and `grad` have the
    /// model's layout.
    #[allow(clippy::too_many_arguments)]
    fn loss_and_grad(
        &self,
        theta: &[f32],
        x: &[f32],
        target: &[f32],
        m: usize,
        scale: f32,
        grad: &mut [f32],
        accumulate: bool,
        ws: &mut Workspace,
    ) -> Result<f64>;
}

/// Buffers a native evaluation reuses from call to call: the forward pass's saved outputs and
/// the backward pass's two ping-pong gradient buffers.
#[derive(Default)]
pub struct Workspace {
    /// One buffer per layer: its output (after the activation), the last one the logits.
    pub(crate) outputs: Vec<Vec<f32>>,
    /// The gradient with respect to the current layer's pre-activation, and the previous one's.
    pub(crate) delta: [Vec<f32>; 2],
    /// A layer's product before its epilogue, when it is formed transposed (`bias_relu_from_t`).
    pub(crate) scratch: Vec<f32>,
}

/// The element types of the host kernels (here and in `cpu_layers`): f32, and f64 for the
/// tests' references.
pub(crate) trait Elem: candle_core::WithDType {}
impl Elem for f32 {}
impl Elem for f64 {}

/// A read-only matrix view: element (i, j) is `data[i·rs + j·cs]`. Transposing swaps the strides.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mat<'a, T = f32> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// `data` as a row-major rows × cols matrix.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols, rs: cols, cs: 1 }
    }

    /// The transpose (a view: no copy).
    pub fn t(self) -> Self {
        Self { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    /// Every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// dst [a.rows, b.cols] (row-major) = a · b, or dst + a · b when `accumulate`.
///
/// On several threads the product is cut along the larger side of dst into one block per
/// thread (rows of a, or columns of b), each a single-threaded GEMM: each thread then packs only
/// its share of the larger operand. On this path's shapes that beats the GEMM's own
/// parallelism, which at batch 16 ran slower on two threads than on one (1.2 ms → 2.3 ms per MLP
/// evaluation). Every output element is one thread's dot product in the kernel's order.
pub(crate) fn matmul<T: Elem>(dst: &mut [T], a: Mat<T>, b: Mat<T>, accumulate: bool) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || dst.len() != m * n || !a.in_bounds() || !b.in_bounds() {
        return Err(Error::internal(format!(
            "matmul: [{m}, {k}] · [{}, {n}] into {} values (or a view out of its buffer)",
            b.rows,
            dst.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(T::zero());
        }
        return Ok(());
    }
    // Blocks of at least ~8 M multiply-adds: below that waking a second thread costs more than
    // it saves (an MLP sgd step at batch 16: 2.7 ms on two threads at ~1 M, 1.8 ms at ~8 M).
    let threads = rayon::current_num_threads().min((m * n * k) >> 23).max(1);
    let out = Out(dst.as_mut_ptr());
    let (split_rows, side) = if m >= n { (true, m) } else { (false, n) };
    let chunk = side.div_ceil(threads).next_multiple_of(16);
    let block = |i: usize| {
        let (lo, hi) = (i * chunk, ((i + 1) * chunk).min(side));
        if lo >= hi {
            return;
        }
        // SAFETY: block i writes only dst rows (or columns) lo..hi, disjoint from every other
        // block's; its reads of a and b stay in bounds (`in_bounds` with non-negative strides:
        // a row or column range of a view lies inside the view); dst overlaps neither input.
        unsafe {
            if split_rows {
                let a_ptr = a.data.as_ptr().add(lo * a.rs);
                gemm_serial(out.at(lo * n), n, hi - lo, n, k, (a_ptr, a), (b.data.as_ptr(), b), accumulate)
            } else {
                let b_ptr = b.data.as_ptr().add(lo * b.cs);
                gemm_serial(out.at(lo), n, m, hi - lo, k, (a.data.as_ptr(), a), (b_ptr, b), accumulate)
            }
        }
    };
    if threads == 1 {
        block(0);
    } else {
        use rayon::prelude::*;
        (0..threads).into_par_iter().for_each(block);
    }
    Ok(())
}

/// The destination pointer, shared by the blocks of one `matmul` (each writes its own part).
struct Out<T>(*mut T);
impl<T> Clone for Out<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Out<T> {}
// SAFETY: `matmul`'s blocks write disjoint parts of the destination.
unsafe impl<T> Send for Out<T> {}
unsafe impl<T> Sync for Out<T> {}

impl<T> Out<T> {
    /// The pointer `offset` values further.
    ///
    /// # Safety
    /// `offset` is inside the destination.
    unsafe fn at(self, offset: usize) -> *mut T {
        self.0.add(offset)
    }
}

/// One single-threaded GEMM: dst [m, n] at row stride `dst_rs` (+)= a · b, each operand given
/// as its first element's pointer and the view whose strides it has.
///
/// # Safety
/// Every element addressed must lie inside its buffer; dst must not overlap a or b.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_serial<T: Elem>(
    dst: *mut T,
    dst_rs: usize,
    m: usize,
    n: usize,
    k: usize,
    (a_ptr, a): (*const T, Mat<T>),
    (b_ptr, b): (*const T, Mat<T>),
    accumulate: bool,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a_ptr,
        a.cs as isize,
        a.rs as isize,
        b_ptr,
        b.cs as isize,
        b.rs as isize,
        T::one(),
        T::one(),
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// `buf` resized to exactly `len` values (contents unspecified: every caller overwrites them).
pub(crate) fn sized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buf.resize(len, 0.0);
    &mut buf[..len]
}

/// Cross-entropy of each row of `logits` [m, k] against `target` [m, k]: returns Σ_b ℓ_b (each
/// ℓ_b = logsumexp(z_b − max z_b) − Σ_k t_bk (z_bk − max z_b), in f32 as candle's path computes
/// it, summed in f64) and writes `scale` · ∂/∂z of the sum, scale · (softmax(z_b) · Σ_k t_bk −
/// t_b), into `delta`.
pub(crate) fn cross_entropy_grad(logits: &[f32], target: &[f32], k: usize, scale: f32, delta: &mut [f32]) -> f64 {
    let mut total = 0.0f64;
    for ((z, t), d) in logits.chunks_exact(k).zip(target.chunks_exact(k)).zip(delta.chunks_exact_mut(k)) {
        let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for (dj, &zj) in d.iter_mut().zip(z) {
            *dj = (zj - max).exp();
            sum += *dj;
        }
        let (mut picked, mut mass) = (0.0f32, 0.0f32);
        for (&zj, &tj) in z.iter().zip(t) {
            picked += tj * (zj - max);
            mass += tj;
        }
        total += (sum.ln() - picked) as f64;
        let inv = 1.0 / sum;
        for (dj, &tj) in d.iter_mut().zip(t) {
            *dj = scale * (*dj * inv * mass - tj);
        }
    }
    total
}

/// Elementwise passes run on one thread below this many values, else in blocks of rows over
/// rayon's pool (each value's result is the same either way).
const PAR_MIN: usize = 1 << 16;

/// Rows per block (`row_len` values each) of about `PAR_MIN` values, for elementwise passes.
fn block_rows(row_len: usize) -> usize {
    (PAR_MIN / row_len.max(1)).max(1)
}

/// Each row of `out` [m, n] plus `bias` [n], then ReLU when `relu`: the layer's epilogue, one
/// pass.
pub(crate) fn bias_relu(out: &mut [f32], bias: &[f32], relu: bool) {
    let n = bias.len();
    let f = |rows: &mut [f32]| {
        for row in rows.chunks_exact_mut(n) {
            for (v, &b) in row.iter_mut().zip(bias) {
                let z = *v + b;
                *v = if relu { z.max(0.0) } else { z };
            }
        }
    };
    if out.len() < PAR_MIN {
        f(out);
    } else {
        use rayon::prelude::*;
        out.par_chunks_mut(block_rows(n) * n).for_each(f);
    }
}

/// `bias_relu` from the transposed product: out[b, i] = t[i, b] + bias[i] (then ReLU), with t
/// [n, m] row-major. For small batches the MLP forms its products transposed — W · xᵀ rather
/// than x · Wᵀ — because the GEMM then packs the small x instead of the large W (layer 0 at
/// batch 16: 148 µs instead of 217 µs on one thread); this pass turns the result back.
pub(crate) fn bias_relu_from_t(out: &mut [f32], t: &[f32], bias: &[f32], relu: bool) {
    let (n, m) = (bias.len(), out.len() / bias.len().max(1));
    for (b, row) in out.chunks_exact_mut(n).enumerate() {
        for (i, (v, &bi)) in row.iter_mut().zip(bias).enumerate() {
            let z = t[i * m + b] + bi;
            *v = if relu { z.max(0.0) } else { z };
        }
    }
}

/// delta ⊙ [h > 0]: ReLU's backward, from the layer's output h (PyTorch's convention: no
/// gradient where the output is 0).
pub(crate) fn relu_backward(delta: &mut [f32], h: &[f32]) {
    let f = |(d, h): (&mut [f32], &[f32])| {
        for (g, &v) in d.iter_mut().zip(h) {
            if v <= 0.0 {
                *g = 0.0;
            }
        }
    };
    if delta.len() < PAR_MIN {
        f((delta, h));
    } else {
        use rayon::prelude::*;
        delta.par_chunks_mut(PAR_MIN).zip(h.par_chunks(PAR_MIN)).for_each(f);
    }
}

/// out[i] (+)= Σ_b delta[b, i]: the bias gradient, a column sum of delta [m, n], each column
/// summed over the rows in order (blocks of columns in parallel when large).
pub(crate) fn column_sums(delta: &[f32], n: usize, out: &mut [f32], accumulate: bool) {
    let f = |(c, out): (usize, &mut [f32])| {
        if !accumulate {
            out.fill(0.0);
        }
        let lo = c * COLUMN_BLOCK;
        for row in delta.chunks_exact(n) {
            for (o, &d) in out.iter_mut().zip(&row[lo..]) {
                *o += d;
            }
        }
    };
    if delta.len() < PAR_MIN {
        out.chunks_mut(COLUMN_BLOCK).enumerate().for_each(f);
    } else {
        use rayon::prelude::*;
        out.par_chunks_mut(COLUMN_BLOCK).enumerate().for_each(f);
    }
}

/// Columns per block of `column_sums`.
const COLUMN_BLOCK: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    /// The GEMM wrapper against the triple loop, with transposed views and accumulation.
    #[test]
    fn matmul_matches_the_definition() {
        let a: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin()).collect(); // 3×4
        let b: Vec<f32> = (0..20).map(|i| (i as f32 * 0.11).cos()).collect(); // 4×5
        let mut dst = vec![1.0f32; 15];
        matmul(&mut dst, Mat::row_major(&a, 3, 4), Mat::row_major(&b, 4, 5), true).unwrap();
        for i in 0..3 {
            for j in 0..5 {
                let want: f32 = 1.0 + (0..4).map(|k| a[i * 4 + k] * b[k * 5 + j]).sum::<f32>();
                assert!((dst[i * 5 + j] - want).abs() < 1e-5, "({i}, {j}): {} vs {want}", dst[i * 5 + j]);
            }
        }
        // (bᵀ)(aᵀ) = (ab)ᵀ: [5, 4]·[4, 3].
        let mut t = vec![0.0f32; 15];
        matmul(&mut t, Mat::row_major(&b, 4, 5).t(), Mat::row_major(&a, 3, 4).t(), false).unwrap();
        for i in 0..3 {
            for j in 0..5 {
                assert!((t[j * 3 + i] - (dst[i * 5 + j] - 1.0)).abs() < 1e-5);
            }
        }
        // Shape mismatches and views past their buffer are errors, not out-of-bounds reads.
        assert!(matmul(&mut t, Mat::row_major(&a, 3, 4), Mat::row_major(&b, 5, 4), false).is_err());
        let short = Mat { data: &a[..11], rows: 3, cols: 4, rs: 4, cs: 1 };
        assert!(matmul(&mut dst, short, Mat::row_major(&b, 4, 5), false).is_err());
    }

    /// The loss and its logit gradient against a hand computation and finite differences.
    #[test]
    fn cross_entropy_by_hand_and_by_differences() {
        let z = [1.0f32, 2.0, 0.5, -1.0, 0.0, 3.0];
        let t = [0.0f32, 1.0, 0.0, 0.1, 0.1, 0.8]; // one-hot, smoothed
        let mut d = [0.0f32; 6];
        let loss = cross_entropy_grad(&z, &t, 3, 0.5, &mut d);
        let lse = |r: &[f32]| r.iter().map(|v| (*v as f64).exp()).sum::<f64>().ln();
        let want = (lse(&z[..3]) - 2.0) + (lse(&z[3..]) - (-0.1 + 0.8 * 3.0));
        assert!((loss - want).abs() < 1e-5, "{loss} vs {want}");
        let f = |z: &[f32]| {
            let mut scratch = [0.0f32; 6];
            cross_entropy_grad(z, &t, 3, 0.5, &mut scratch) * 0.5
        };
        for i in 0..6 {
            let (mut up, mut down) = (z, z);
            up[i] += 1e-2;
            down[i] -= 1e-2;
            let fd = (f(&up) - f(&down)) / 2e-2;
            assert!((fd - d[i] as f64).abs() < 1e-3, "logit {i}: {fd} vs {}", d[i]);
        }
    }
}
