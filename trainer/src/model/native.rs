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

use std::ops::Range;

use crate::error::{Error, Result};
use crate::team::{part, Shared};

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
    /// Each sample's loss (summed in sample order at the end, whatever the team's size).
    pub(crate) losses: Vec<f32>,
}

/// The element types of the host kernels (here and in `cpu_layers`): f32, and f64 for the
/// tests' references.
pub(crate) trait Elem: candle_core::WithDType {
    /// This thread's spare scratch buffers of this type (`cpu_layers::scratch`): kept from one
    /// kernel call to the next, so that scratch is not allocated and zero-filled on every call.
    fn spares() -> &'static std::thread::LocalKey<std::cell::RefCell<Vec<Vec<Self>>>>;
}

thread_local! {
    static SPARE_F32: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
    static SPARE_F64: std::cell::RefCell<Vec<Vec<f64>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Elem for f32 {
    fn spares() -> &'static std::thread::LocalKey<std::cell::RefCell<Vec<Vec<f32>>>> {
        &SPARE_F32
    }
}

impl Elem for f64 {
    fn spares() -> &'static std::thread::LocalKey<std::cell::RefCell<Vec<Vec<f64>>>> {
        &SPARE_F64
    }
}

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

/// The shape of dst = a · b, [m, k] · [k, n], after checking that dst holds m·n values and both
/// views lie inside their buffers.
fn product_shape<T>(dst_len: usize, a: Mat<T>, b: Mat<T>) -> Result<(usize, usize, usize)> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || dst_len != m * n || !a.in_bounds() || !b.in_bounds() {
        return Err(Error::internal(format!(
            "matmul: [{m}, {k}] · [{}, {n}] into {dst_len} values (or a view out of its buffer)",
            b.rows
        )));
    }
    Ok((m, k, n))
}

/// How a product dst [m, n] is cut into blocks, one per thread: along the larger side, rows of
/// dst (`Rows`) or columns (`Cols`), in runs of 16 (`team::part`). Each thread then packs only its
/// share of the larger operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Split {
    Rows,
    Cols,
}

impl Split {
    fn of(m: usize, n: usize) -> (Split, usize) {
        if m >= n {
            (Split::Rows, m)
        } else {
            (Split::Cols, n)
        }
    }
}

/// Rows (or columns) per block start at multiples of this.
const BLOCK_ALIGN: usize = 16;

/// Block `range` of dst = a · b (rows of dst, or columns, per `split`), or dst + a · b when
/// `accumulate`, as one single-threaded GEMM.
///
/// # Safety
/// dst points to m·n values, of which no other thread touches the block; `a`, `b` passed
/// `product_shape` and do not overlap dst.
unsafe fn gemm_block<T: Elem>(dst: *mut T, a: Mat<T>, b: Mat<T>, accumulate: bool, split: Split, r: Range<usize>) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if r.is_empty() {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    if match split {
                        Split::Rows => r.contains(&i),
                        Split::Cols => r.contains(&j),
                    } {
                        *dst.add(i * n + j) = T::zero();
                    }
                }
            }
        }
        return;
    }
    let (dst, rows, cols, a_ptr, b_ptr) = match split {
        Split::Rows => (dst.add(r.start * n), r.len(), n, a.data.as_ptr().add(r.start * a.rs), b.data.as_ptr()),
        Split::Cols => (dst.add(r.start), m, r.len(), a.data.as_ptr(), b.data.as_ptr().add(r.start * b.cs)),
    };
    gemm::gemm(
        rows,
        cols,
        k,
        dst,
        1,
        n as isize,
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

/// dst [a.rows, b.cols] (row-major) = a · b, or dst + a · b when `accumulate`.
///
/// On several threads the product is cut along the larger side of dst into one block per
/// thread (`Split`), each a single-threaded GEMM. On this path's shapes that beats the GEMM's own
/// parallelism, which at batch 16 ran slower on two threads than on one (1.2 ms → 2.3 ms per MLP
/// evaluation). Every output element is one thread's dot product in the kernel's order.
pub(crate) fn matmul<T: Elem>(dst: &mut [T], a: Mat<T>, b: Mat<T>, accumulate: bool) -> Result<()> {
    matmul_on(dst, a, b, accumulate, rayon::current_num_threads())
}

/// `matmul` on at most `threads` threads (1: this thread alone, for a caller that is already
/// one of several parallel tasks).
pub(crate) fn matmul_on<T: Elem>(dst: &mut [T], a: Mat<T>, b: Mat<T>, accumulate: bool, threads: usize) -> Result<()> {
    let (m, k, n) = product_shape(dst.len(), a, b)?;
    // Blocks of at least ~8 M multiply-adds: below that waking a second thread costs more than
    // it saves (an MLP sgd step at batch 16: 2.7 ms on two threads at ~1 M, 1.8 ms at ~8 M).
    let threads = threads.min((m * n * k) >> 23).max(1);
    let (split, side) = Split::of(m, n);
    let dst = Shared::new(dst);
    // SAFETY: block i writes only its rows (or columns) of dst, disjoint from every other
    // block's; the views passed `product_shape`; dst is a `&mut` borrow, so overlaps neither.
    let block =
        |i: usize| unsafe { gemm_block(dst.ptr(), a, b, accumulate, split, part(side, BLOCK_ALIGN, i, threads)) };
    if threads == 1 {
        block(0);
    } else {
        use rayon::prelude::*;
        (0..threads).into_par_iter().for_each(block);
    }
    Ok(())
}

/// A product dst = a · b checked and cut into blocks for a team (`Product::blocks` of them; any
/// member may compute any block: members claim them one at a time, so one that started late or
/// runs slower takes fewer). Blocks follow `Split`, in runs of 16; their number depends on the
/// shapes and the team's size only, so results are deterministic for a thread count.
#[derive(Clone, Copy)]
pub(crate) struct Product<'a, T> {
    dst: Shared<'a, T>,
    a: Mat<'a, T>,
    b: Mat<'a, T>,
    accumulate: bool,
    split: Split,
    side: usize,
    pub blocks: usize,
}

/// Blocks per team member. Each block re-packs the operand all blocks share (b when cutting
/// rows, a when cutting columns) and pays the GEMM's fixed cost: at batch 16 eight blocks per
/// member made an MLP evaluation 1.29× slower than one, two 2 % faster (a member woken late
/// takes one block fewer).
const BLOCKS_PER_MEMBER: usize = 2;

impl<'a, T: Elem> Product<'a, T> {
    /// Every member gets the same error for wrong shapes (before any block is claimed).
    pub fn new(dst: Shared<'a, T>, a: Mat<'a, T>, b: Mat<'a, T>, accumulate: bool, team: usize) -> Result<Self> {
        let (m, _, n) = product_shape(dst.len(), a, b)?;
        let (split, side) = Split::of(m, n);
        let blocks = if team <= 1 { 1 } else { (team * BLOCKS_PER_MEMBER).min(side.div_ceil(BLOCK_ALIGN)).max(1) };
        Ok(Self { dst, a, b, accumulate, split, side, blocks })
    }

    /// Computes block `i` (< `blocks`); returns which rows or columns of dst it wrote (an
    /// epilogue then runs over the same block).
    ///
    /// # Safety
    /// No one else touches block `i` of dst meanwhile, and dst overlaps neither operand.
    pub unsafe fn block(&self, i: usize) -> (Split, Range<usize>) {
        let r = part(self.side, BLOCK_ALIGN, i, self.blocks);
        gemm_block(self.dst.ptr(), self.a, self.b, self.accumulate, self.split, r.clone());
        (self.split, r)
    }
}

/// `buf` resized to exactly `len` values (contents unspecified: every caller overwrites them).
pub(crate) fn sized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buf.resize(len, 0.0);
    &mut buf[..len]
}

/// Cross-entropy of each row of `logits` [m, k] against `target` [m, k]: writes ℓ_b =
/// logsumexp(z_b − max z_b) − Σ_k t_bk (z_bk − max z_b) (in f32, as candle's path computes it)
/// into `losses` [m] and `scale` · ∂ℓ_b/∂z_b, scale · (softmax(z_b) · Σ_k t_bk − t_b), into
/// `delta`.
pub(crate) fn cross_entropy_grad(
    logits: &[f32],
    target: &[f32],
    k: usize,
    scale: f32,
    delta: &mut [f32],
    losses: &mut [f32],
) {
    let rows = logits.chunks_exact(k).zip(target.chunks_exact(k)).zip(delta.chunks_exact_mut(k));
    for (((z, t), d), loss) in rows.zip(losses) {
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
        *loss = sum.ln() - picked;
        let inv = 1.0 / sum;
        for (dj, &tj) in d.iter_mut().zip(t) {
            *dj = scale * (*dj * inv * mass - tj);
        }
    }
}

/// The elements of an [m, n] row-major matrix in block `r` of `split` (its rows or columns):
/// calls `f(offset, len)` for each contiguous run.
fn block_runs(m: usize, n: usize, split: Split, r: &Range<usize>, mut f: impl FnMut(usize, usize)) {
    match split {
        Split::Rows => f(r.start * n, r.len() * n),
        Split::Cols => (0..m).for_each(|i| f(i * n + r.start, r.len())),
    }
}

/// Block `r` (of `split`) of out [m, n]: + bias, then ReLU when `relu` (the layer's epilogue,
/// one pass over the block the GEMM just wrote).
///
/// # Safety
/// No other thread touches block `r` of `out` meanwhile.
pub(crate) unsafe fn bias_relu(out: Shared<f32>, bias: &[f32], relu: bool, split: Split, r: &Range<usize>) {
    let n = bias.len();
    block_runs(out.len() / n.max(1), n, split, r, |at, len| {
        // A run is whole rows (col 0) or part of one row.
        let col = at % n;
        for row in out.range(at..at + len).get_mut().chunks_mut(n) {
            for (v, &b) in row.iter_mut().zip(&bias[col..]) {
                let z = *v + b;
                *v = if relu { z.max(0.0) } else { z };
            }
        }
    });
}

/// `bias_relu` from the transposed product: out[b, i] = t[i, b] + bias[i] (then ReLU), with t
/// [n, m] row-major, for block `r` (of `split`) of t. For small batches the MLP forms its
/// products transposed — W · xᵀ rather than x · Wᵀ — because the GEMM then packs the small x
/// instead of the large W (layer 0 at batch 16: 148 µs instead of 217 µs on one thread); this
/// pass turns the result back.
///
/// # Safety
/// t's block `r` is complete and nobody writes it; no other thread touches the same block,
/// transposed, of `out`.
pub(crate) unsafe fn bias_relu_from_t(
    out: Shared<f32>,
    t: Shared<f32>,
    bias: &[f32],
    relu: bool,
    split: Split,
    r: &Range<usize>,
) {
    let (n, m) = (bias.len(), out.len() / bias.len().max(1));
    let (is, bs) = match split {
        Split::Rows => (r.clone(), 0..m),
        Split::Cols => (0..n, r.clone()),
    };
    let t = t.ptr();
    for b in bs {
        let row = out.range(b * n + is.start..b * n + is.end).get_mut();
        for (v, i) in row.iter_mut().zip(is.clone()) {
            let z = *t.add(i * m + b) + bias[i];
            *v = if relu { z.max(0.0) } else { z };
        }
    }
}

/// delta ⊙ [h > 0] over block `r` (of `split`) of delta [m, n]: ReLU's backward, from the
/// layer's output h (PyTorch's convention: no gradient where the output is 0).
///
/// # Safety
/// No other thread touches block `r` of `delta` meanwhile.
pub(crate) unsafe fn relu_backward(delta: Shared<f32>, h: &[f32], n: usize, split: Split, r: &Range<usize>) {
    block_runs(delta.len() / n.max(1), n, split, r, |at, len| {
        // A select, not a conditional store: it vectorises (the branch cost 12 % of an
        // evaluation at batch 1024).
        for (g, &v) in delta.range(at..at + len).get_mut().iter_mut().zip(&h[at..at + len]) {
            *g = if v <= 0.0 { 0.0 } else { *g };
        }
    });
}

/// out[i − cols.start] (+)= Σ_b delta[b, i] for the columns i in `cols`: the bias gradient, a
/// column sum of delta [m, n], each column summed over the rows in order.
pub(crate) fn column_sums(delta: &[f32], n: usize, cols: Range<usize>, out: &mut [f32], accumulate: bool) {
    if !accumulate {
        out.fill(0.0);
    }
    for row in delta.chunks_exact(n) {
        for (o, &d) in out.iter_mut().zip(&row[cols.clone()]) {
            *o += d;
        }
    }
}

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
        let total = |losses: [f32; 2]| losses.iter().map(|&l| l as f64).sum::<f64>();
        let mut losses = [0.0f32; 2];
        cross_entropy_grad(&z, &t, 3, 0.5, &mut d, &mut losses);
        let loss = total(losses);
        let lse = |r: &[f32]| r.iter().map(|v| (*v as f64).exp()).sum::<f64>().ln();
        let want = (lse(&z[..3]) - 2.0) + (lse(&z[3..]) - (-0.1 + 0.8 * 3.0));
        assert!((loss - want).abs() < 1e-5, "{loss} vs {want}");
        let f = |z: &[f32]| {
            let (mut scratch, mut losses) = ([0.0f32; 6], [0.0f32; 2]);
            cross_entropy_grad(z, &t, 3, 0.5, &mut scratch, &mut losses);
            total(losses) * 0.5
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
