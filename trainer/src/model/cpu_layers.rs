//! The CPU kernels behind the vision layers (`layers::conv2d`, `layers::batch_norm_train`,
//! `layers::add_relu`): plain functions on contiguous slices of f32 or f64, which the candle
//! custom ops in `layers` call from their `cpu_fwd`.
//!
//! Why: candle's CPU conv2d copies its input into an im2col buffer for the whole batch and then
//! runs one matmul per sample, and a batch norm built from a dozen candle ops (each a full pass
//! over the activation, each a fresh allocation, and as many again in the backward pass) cost as
//! much as the convolutions; a CIFAR ResNet-18 gradient took ~6× PyTorch's time on 2 cores.
//!
//! - **Convolution** (any k, stride, padding < k, NCHW, no bias) is im2col + one GEMM per chunk of
//!   samples: `ConvGeom::chunk` samples at a time so that the GEMM has at least `GEMM_COLUMNS`
//!   columns (one sample of a 4×4 map gives 16, too few to run the micro-kernels at speed), and the
//!   im2col buffer stays a few MB. Forward: y_chunk [O, n·HW'] = w [O, C·k·k] · col [C·k·k, n·HW'],
//!   then scattered into NCHW. Weight gradient: dwᵀ += col · g_chunkᵀ (see `conv_weight_grad`
//!   for why transposed), with the im2col matrix recomputed from x (storing it would cost k²
//!   activations per conv). Input gradient:
//!   dcol = wᵀ · g_chunk, then col2im (each input pixel gathers its k² taps in a fixed order). A
//!   1×1 stride-1 unpadded conv of one sample uses x itself as the im2col matrix.
//! - **Training-mode batch norm** over ghost batches (+ optional fused ReLU): statistics in two
//!   passes (mean, then the mean squared deviation) with f64 sums per (sample, channel) plane,
//!   reduced over a group's planes in a fixed order; y = (x − mean)·γ/σ + β in one pass; the
//!   backward pass is the closed form dx = γ/σ·(g − mean(g) − x̂·mean(g·x̂)) per group, with g
//!   masked by y > 0 when the ReLU is fused: two passes, no intermediate tensors.
//! - **Residual add + ReLU** in one pass, and its backward (the mask of y > 0) in one.
//!
//! Parallelism: the forward convolution and the input gradient run their chunks of samples as
//! parallel tasks, each chunk's im2col, GEMM and scatter (or gather, GEMM, col2im) on one thread
//! with its own scratch (one rayon task per chunk instead of three fork-joins and a shared-operand
//! repack per chunk: a ResNet-18 gradient at batch 128 took 0.92× the time); with fewer samples
//! than threads, and for the weight gradient (a sum over chunks), the threads work inside each
//! chunk: rayon over rows of the im2col matrix and (sample, channel) planes, and the products
//! through `native::matmul` (the one GEMM entry of the host kernels, which splits the output over
//! the threads). Batch norm is rayon over planes. Rayon's pool (`RAYON_NUM_THREADS`,
//! `kutta --threads`). Every reduction is over a fixed partition in a fixed order (no atomics), so
//! results are bit-identical run to run for a given thread count — and, GEMM aside, for any thread count.

use rayon::prelude::*;

use super::native::{matmul, matmul_on, Mat};
use crate::error::Result;
use crate::team::part;

/// The element types the kernels run on (f32 in training, f64 in the gradient tests).
pub(crate) use super::native::Elem;

/// The fewest GEMM columns (samples × output pixels) per im2col chunk.
const GEMM_COLUMNS: usize = 2048;

/// The shape of one convolution: x [b, c, h, w] ⊛ weight [o, c, k, k] → y [b, o, oh, ow].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConvGeom {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub k: usize,
    pub pad: usize,
    pub stride: usize,
    pub oh: usize,
    pub ow: usize,
}

impl ConvGeom {
    /// The geometry of x [b, c, h, w] ⊛ weight [o, c, k, k]; None when the shapes do not fit
    /// (channels differ, the kernel is larger than the padded input, stride 0, padding ≥ k).
    pub fn new(
        x: (usize, usize, usize, usize),
        weight: (usize, usize, usize, usize),
        pad: usize,
        stride: usize,
    ) -> Option<Self> {
        let (b, c, h, w) = x;
        let (o, c2, k, k2) = weight;
        if c != c2 || k != k2 || k == 0 || stride == 0 || pad >= k || h + 2 * pad < k || w + 2 * pad < k {
            return None;
        }
        let (oh, ow) = ((h + 2 * pad - k) / stride + 1, (w + 2 * pad - k) / stride + 1);
        Some(Self { b, c, h, w, o, k, pad, stride, oh, ow })
    }
    /// Rows of the im2col matrix: C·k·k.
    fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }
    /// Output pixels per channel.
    fn hw_out(&self) -> usize {
        self.oh * self.ow
    }
    fn hw_in(&self) -> usize {
        self.h * self.w
    }
    /// Samples per GEMM: enough for `GEMM_COLUMNS` columns, at most the batch.
    fn chunk(&self) -> usize {
        GEMM_COLUMNS.div_ceil(self.hw_out()).clamp(1, self.b.max(1))
    }
    /// A 1×1, stride-1, unpadded conv: a sample's im2col matrix is the sample itself.
    fn pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }
}

/// The output positions [lo, hi) (rows or columns, `out` of them) whose input position
/// o·stride + t − pad under kernel tap `t` lies inside [0, size); outside it the tap reads padding.
fn tap_range(t: usize, g: &ConvGeom, size: usize, out: usize) -> (usize, usize) {
    let lo = g.pad.saturating_sub(t).div_ceil(g.stride).min(out);
    // The last valid o: o·stride ≤ size − 1 + pad − t.
    let hi = (size + g.pad).checked_sub(t + 1).map_or(0, |last| last / g.stride + 1).clamp(lo, out);
    (lo, hi)
}

/// The valid output rows and columns of tap (i, j): ((row lo, row hi), (column lo, column hi)).
fn tap_window(i: usize, j: usize, g: &ConvGeom) -> ((usize, usize), (usize, usize)) {
    (tap_range(i, g, g.h, g.oh), tap_range(j, g, g.w, g.ow))
}

/// Runs `f(i, piece)` over the pieces of `len` elements of `buf`: on rayon's threads when
/// `parallel`, else on this thread (inside a task that already has its own thread).
fn each_piece<T: Send>(buf: &mut [T], len: usize, parallel: bool, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    each_piece_with(buf, len, parallel, || (), |_, i, piece| f(i, piece));
}

/// `each_piece` with per-task state: `f(state, i, piece)`, `state` made by `init` once per task.
fn each_piece_with<T: Send, S>(
    buf: &mut [T],
    len: usize,
    parallel: bool,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize, &mut [T]) + Sync + Send,
) {
    if parallel {
        buf.par_chunks_mut(len)
            .enumerate()
            .with_min_len(min_items(len))
            .for_each_init(&init, |state, (i, piece)| f(state, i, piece));
    } else {
        let mut state = init();
        buf.chunks_mut(len).enumerate().for_each(|(i, piece)| f(&mut state, i, piece));
    }
}

/// col [C·k·k, n·oh·ow] (row (c, i, j), column (sample, y, z)) = x[sample, c, y·s + i − p,
/// z·s + j − p], zero in the padding; x holds the chunk's n samples. The valid window of each tap
/// is computed once per row; a tap that reads whole input rows (stride 1, no column padding)
/// copies its rows as one block.
fn im2col<T: Elem>(x: &[T], g: &ConvGeom, n: usize, col: &mut [T], parallel: bool) {
    let (k, s, hw, hwo) = (g.k, g.stride, g.hw_in(), g.hw_out());
    let cn = n * hwo;
    each_piece(&mut col[..g.ckk() * cn], cn, parallel, |r, row| {
        let (c, i, j) = (r / (k * k), (r / k) % k, r % k);
        let ((ylo, yhi), (xlo, xhi)) = tap_window(i, j, g);
        let whole_rows = s == 1 && g.ow == g.w && xlo == 0 && xhi == g.ow && j == g.pad;
        for (smp, out) in row.chunks_exact_mut(hwo).enumerate() {
            let plane = &x[(smp * g.c + c) * hw..][..hw];
            out[..ylo * g.ow].fill(T::zero());
            out[yhi * g.ow..].fill(T::zero());
            if whole_rows {
                let first = ylo + i - g.pad;
                out[ylo * g.ow..yhi * g.ow].copy_from_slice(&plane[first * g.w..(first + yhi - ylo) * g.w]);
                continue;
            }
            for (oy, orow) in out.chunks_exact_mut(g.ow).enumerate().take(yhi).skip(ylo) {
                let xrow = &plane[(oy * s + i - g.pad) * g.w..][..g.w];
                orow[..xlo].fill(T::zero());
                orow[xhi..].fill(T::zero());
                let valid = &mut orow[xlo..xhi];
                if s == 1 {
                    valid.copy_from_slice(&xrow[xlo + j - g.pad..][..xhi - xlo]);
                } else {
                    let src = xrow[xlo * s + j - g.pad..].iter().step_by(s);
                    for (v, &e) in valid.iter_mut().zip(src) {
                        *v = e;
                    }
                }
            }
        }
    });
}

/// dst += src, in blocks of four (one SSE add each: rows of 4-32 values left the vectorised loop's
/// scalar remainder doing most of the work).
fn add_into<T: Elem>(dst: &mut [T], src: &[T]) {
    let (mut d, mut s) = (dst.chunks_exact_mut(4), src.chunks_exact(4));
    for (dc, sc) in (&mut d).zip(&mut s) {
        for l in 0..4 {
            dc[l] += sc[l];
        }
    }
    for (x, &v) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *x += v;
    }
}

/// The adjoint of `im2col`: dx [n, C, h, w] = Σ over the taps that read each pixel of dcol, per
/// (sample, channel) plane in tap order (deterministic, no write conflicts). Each plane is summed
/// in a zero-padded copy (h + 2p) × (w + 2p) held by the task, where every tap's rows land
/// whole (no window to clip, the padding's share falls outside the interior), then its interior
/// is copied out.
fn col2im<T: Elem>(dcol: &[T], g: &ConvGeom, n: usize, dx: &mut [T], parallel: bool) {
    let (k, s, hw, hwo) = (g.k, g.stride, g.hw_in(), g.hw_out());
    let (cn, pw) = (n * hwo, g.w + 2 * g.pad);
    let padded_len = (g.h + 2 * g.pad) * pw;
    let plane_of = |pad: &mut Vec<T>, q: usize, plane: &mut [T]| {
        let (smp, c) = (q / g.c, q % g.c);
        pad.clear();
        pad.resize(padded_len, T::zero());
        for i in 0..k {
            for j in 0..k {
                let row = &dcol[((c * k + i) * k + j) * cn + smp * hwo..][..hwo];
                for (oy, grow) in row.chunks_exact(g.ow).enumerate() {
                    let prow = &mut pad[(oy * s + i) * pw + j..];
                    if s == 1 {
                        add_into(&mut prow[..g.ow], grow);
                    } else {
                        for (d, &v) in prow.iter_mut().step_by(s).zip(grow) {
                            *d += v;
                        }
                    }
                }
            }
        }
        for (y, out) in plane.chunks_exact_mut(g.w).enumerate() {
            out.copy_from_slice(&pad[(y + g.pad) * pw + g.pad..][..g.w]);
        }
    };
    each_piece_with(&mut dx[..n * g.c * hw], hw, parallel, Vec::new, plane_of);
}

/// [n, rows, len] (NCHW, a chunk of samples) → [rows, n·len] (the GEMM's column layout).
fn gather<T: Elem>(src: &[T], n: usize, rows: usize, len: usize, dst: &mut [T], parallel: bool) {
    each_piece(&mut dst[..rows * n * len], n * len, parallel, |r, out| {
        for (s, o) in out.chunks_exact_mut(len).enumerate() {
            o.copy_from_slice(&src[(s * rows + r) * len..][..len]);
        }
    });
}

/// [n, rows, len] → [n·len, rows]: each sample's [rows, len] matrix transposed, in parallel over
/// the output rows (a task takes consecutive ones, which read the same source cache lines).
fn transpose_samples<T: Elem>(src: &[T], n: usize, rows: usize, len: usize, dst: &mut [T]) {
    each_piece(&mut dst[..n * len * rows], rows, true, |i, orow| {
        let (s, p) = (i / len, i % len);
        let m = &src[s * rows * len..][..rows * len];
        for (r, v) in orow.iter_mut().enumerate() {
            *v = m[r * len + p];
        }
    });
}

/// The inverse of `gather`: [rows, n·len] → [n, rows, len].
fn scatter<T: Elem>(src: &[T], n: usize, rows: usize, len: usize, dst: &mut [T], parallel: bool) {
    each_piece(&mut dst[..n * rows * len], len, parallel, |q, out| {
        let (s, r) = (q / rows, q % rows);
        out.copy_from_slice(&src[r * n * len + s * len..][..len]);
    });
}

/// A buffer of at least `len` values for scratch use, from this thread's spares when it has one
/// (`Elem::spares`; its contents are arbitrary: every value read is written first). `spare`
/// gives it back.
fn scratch<T: Elem>(len: usize) -> Vec<T> {
    let mut v = T::spares().with(|s| s.borrow_mut().pop()).unwrap_or_default();
    if v.len() < len {
        v.resize(len, T::zero());
    }
    v
}

/// Keeps `v` as one of this thread's spare scratch buffers (at most `SPARES` of them, the largest).
fn spare<T: Elem>(v: Vec<T>) {
    if v.capacity() == 0 {
        return;
    }
    T::spares().with(|s| {
        let mut s = s.borrow_mut();
        s.push(v);
        s.sort_by_key(|b| b.len());
        if s.len() > SPARES {
            s.remove(0);
        }
    });
}

/// Spare scratch buffers per thread and element type: a chunk task holds two.
const SPARES: usize = 2;

/// A buffer of `len` zeros for an output that the kernel then writes in full, filled on all
/// threads (`calloc` zero-filled on one, the others idle: 5% of a ResNet-18 evaluation).
fn zeroed<T: Elem>(len: usize) -> Vec<T> {
    if len < 1 << 16 {
        return vec![T::zero(); len];
    }
    let mut v = Vec::with_capacity(len);
    v.par_extend(rayon::iter::repeat_n(T::zero(), len));
    v
}

/// Scratch of one chunk task: the im2col matrix (or its gradient) and the GEMM's output in
/// column layout (or the gathered gradient).
struct Scratch<T: Elem> {
    col: Vec<T>,
    tmp: Vec<T>,
}

impl<T: Elem> Scratch<T> {
    fn new(g: &ConvGeom, samples: usize) -> Self {
        let cap = samples * g.hw_out();
        let col = if g.pointwise() && samples == 1 { Vec::new() } else { scratch::<T>(g.ckk() * cap) };
        let tmp = if samples == 1 { Vec::new() } else { scratch::<T>(g.o * cap) };
        Self { col, tmp }
    }
}

impl<T: Elem> Drop for Scratch<T> {
    fn drop(&mut self) {
        spare(std::mem::take(&mut self.col));
        spare(std::mem::take(&mut self.tmp));
    }
}

/// Runs `f(first sample, out, scratch, parallel)` over the chunks of samples, `out` being the
/// chunk's samples of `out_all` (`per_sample` elements each). With at least as many chunks as
/// threads, thread t takes a fixed contiguous run of chunks, each on its own with one scratch
/// (no synchronisation inside a chunk, the GEMM's shared operand packed once per chunk, the
/// scratch allocated once per thread); otherwise (fewer samples than threads) the chunks run one
/// after another with the threads inside each.
fn over_chunks<T: Elem>(
    out_all: &mut [T],
    per_sample: usize,
    g: &ConvGeom,
    f: impl Fn(usize, &mut [T], &mut Scratch<T>, bool) -> Result<()> + Sync,
) -> Result<()> {
    let threads = rayon::current_num_threads();
    let step = g.chunk().min(g.b.div_ceil(threads)).max(1);
    let chunks = g.b.div_ceil(step);
    if threads == 1 || chunks < threads {
        let mut scratch = Scratch::new(g, step);
        for (i, out) in out_all.chunks_mut(step * per_sample).enumerate() {
            f(i * step, out, &mut scratch, true)?;
        }
        return Ok(());
    }
    let mut runs = Vec::with_capacity(threads);
    let mut rest = out_all;
    for t in 0..threads {
        let r = part(chunks, 1, t, threads);
        let samples = (r.end * step).min(g.b) - r.start * step;
        let (run, tail) = rest.split_at_mut(samples * per_sample);
        runs.push((r.start * step, run));
        rest = tail;
    }
    runs.into_par_iter().try_for_each(|(first, run)| {
        let mut scratch = Scratch::new(g, step);
        for (i, out) in run.chunks_mut(step * per_sample).enumerate() {
            f(first + i * step, out, &mut scratch, false)?;
        }
        Ok(())
    })
}

/// The threads a chunk's GEMM runs on.
fn gemm_threads(parallel: bool) -> usize {
    if parallel {
        rayon::current_num_threads()
    } else {
        1
    }
}

/// y [b, o, oh, ow] = x [b, c, h, w] ⊛ weight [o, c, k, k].
pub(crate) fn conv_forward<T: Elem>(x: &[T], weight: &[T], g: &ConvGeom) -> Result<Vec<T>> {
    crate::threads::keep_freed_memory();
    let (chw, ohw, ckk) = (g.c * g.hw_in(), g.o * g.hw_out(), g.ckk());
    let mut y = zeroed::<T>(g.b * ohw);
    over_chunks(&mut y, ohw, g, |s0, ys, scratch, parallel| {
        let n = ys.len() / ohw;
        let xs = &x[s0 * chw..(s0 + n) * chw];
        let cn = n * g.hw_out();
        let cols: &[T] = if g.pointwise() && n == 1 {
            xs
        } else {
            im2col(xs, g, n, &mut scratch.col, parallel);
            &scratch.col
        };
        let (w, c) = (Mat::row_major(weight, g.o, ckk), Mat::row_major(cols, ckk, cn));
        if n == 1 {
            matmul_on(ys, w, c, false, gemm_threads(parallel))
        } else {
            matmul_on(&mut scratch.tmp[..g.o * cn], w, c, false, gemm_threads(parallel))?;
            scatter(&scratch.tmp, n, g.o, g.hw_out(), ys, parallel);
            Ok(())
        }
    })?;
    Ok(y)
}

/// dL/dweight [o, c, k, k] = Σ over samples of gy_s [o, oh·ow] · col_sᵀ, formed transposed:
/// dwᵀ [C·k·k, o] += col [C·k·k, n·oh·ow] · gyᵀ [n·oh·ow, o] chunk by chunk (`GEMM_COLUMNS`) in
/// sample order, then dw = (dwᵀ)ᵀ. With the sum's index contiguous in both operands (col · gyᵀ
/// as first written) the GEMM packs a transposed operand and ran at 50-100 GFLOP/s on one
/// AVX-512 core; with gy transposed (cheap: it is 1/k² of col) 120-150. Each product runs on all
/// threads: every element of the sum is one thread's, in a fixed order, whatever the thread
/// count. (Chunks on separate threads with a partial sum each were not measurably faster and
/// would tie the sum to the thread count.)
pub(crate) fn conv_weight_grad<T: Elem>(x: &[T], gy: &[T], g: &ConvGeom) -> Result<Vec<T>> {
    let (chw, ohw, ckk, hwo) = (g.c * g.hw_in(), g.o * g.hw_out(), g.ckk(), g.hw_out());
    let step = g.chunk();
    let mut dwt = vec![T::zero(); ckk * g.o];
    // col: the im2col matrix; tmp: gyᵀ (needed for one sample too). Given back when dropped.
    let col = if g.pointwise() && step == 1 { Vec::new() } else { scratch::<T>(ckk * step * hwo) };
    let mut sc = Scratch { col, tmp: scratch::<T>(step * ohw) };
    for s0 in (0..g.b).step_by(step) {
        let n = step.min(g.b - s0);
        let xs = &x[s0 * chw..(s0 + n) * chw];
        let cn = n * hwo;
        let cols: &[T] = if g.pointwise() && n == 1 {
            xs
        } else {
            im2col(xs, g, n, &mut sc.col, true);
            &sc.col
        };
        transpose_samples(&gy[s0 * ohw..(s0 + n) * ohw], n, g.o, hwo, &mut sc.tmp);
        matmul(&mut dwt, Mat::row_major(cols, ckk, cn), Mat::row_major(&sc.tmp, cn, g.o), s0 > 0)?;
    }
    drop(sc);
    let mut dw = vec![T::zero(); g.o * ckk];
    transpose_samples(&dwt, 1, ckk, g.o, &mut dw);
    Ok(dw)
}

/// dL/dx [b, c, h, w] = col2im(weightᵀ · gy_s) per chunk of samples.
pub(crate) fn conv_input_grad<T: Elem>(gy: &[T], weight: &[T], g: &ConvGeom) -> Result<Vec<T>> {
    let (chw, ohw, ckk) = (g.c * g.hw_in(), g.o * g.hw_out(), g.ckk());
    let mut dx = zeroed::<T>(g.b * chw);
    over_chunks(&mut dx, chw, g, |s0, dxs, scratch, parallel| {
        let n = dxs.len() / chw;
        let gs = &gy[s0 * ohw..(s0 + n) * ohw];
        let cn = n * g.hw_out();
        let gmat: &[T] = if n == 1 {
            gs
        } else {
            gather(gs, n, g.o, g.hw_out(), &mut scratch.tmp, parallel);
            &scratch.tmp
        };
        let (wt, gm) = (Mat::row_major(weight, g.o, ckk).t(), Mat::row_major(gmat, g.o, cn));
        if g.pointwise() && n == 1 {
            matmul_on(dxs, wt, gm, false, gemm_threads(parallel))
        } else {
            matmul_on(&mut scratch.col[..ckk * cn], wt, gm, false, gemm_threads(parallel))?;
            col2im(&scratch.col, g, n, dxs, parallel);
            Ok(())
        }
    })?;
    Ok(dx)
}

/// Partial sums per plane: `LANES` interleaved sums in T (vectorised, a fixed order), added up
/// in f64 at the end. With ≤ 1024 values per plane (CIFAR), each f32 lane sums ≤ 64.
const LANES: usize = 16;

/// Σ f(v) over a plane, in `LANES` partial sums.
fn lane_sum<T: Elem>(p: &[T], f: impl Fn(T) -> T) -> f64 {
    let mut acc = [T::zero(); LANES];
    let mut it = p.chunks_exact(LANES);
    for c in &mut it {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    let tail = it.remainder().iter().fold(0f64, |s, &v| s + f(v).to_f64());
    acc.iter().fold(0f64, |s, v| s + v.to_f64()) + tail
}

/// Items per rayon task so that each task covers ≥ 32 K elements (CIFAR's late stages have
/// planes of 16 or 64 values: one task per plane would be all overhead).
fn min_items(item_len: usize) -> usize {
    (1usize << 15).div_ceil(item_len.max(1))
}

/// The shape batch norm sees: x [b, c, hw] in ghost batches of `group` samples.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BnGeom {
    pub b: usize,
    pub c: usize,
    pub hw: usize,
    pub group: usize,
}

impl BnGeom {
    fn groups(&self) -> usize {
        self.b / self.group
    }
    /// Values per (group, channel).
    fn count(&self) -> f64 {
        (self.group * self.hw) as f64
    }
    /// The (group, channel) statistics index of plane q = sample·C + channel.
    fn stat(&self, q: usize) -> usize {
        (q / self.c / self.group) * self.c + q % self.c
    }
    /// Per-plane values summed over each group's planes, in sample order: [groups·C].
    fn reduce(&self, planes: &[f64]) -> Vec<f64> {
        let mut out = vec![0f64; self.groups() * self.c];
        for (q, &v) in planes.iter().enumerate() {
            out[self.stat(q)] += v;
        }
        out
    }
}

/// Each ghost batch's mean and biased variance per channel, [groups·C] each (two passes: the
/// mean, then the mean squared deviation from it).
pub(crate) fn bn_stats<T: Elem>(x: &[T], g: &BnGeom) -> (Vec<f64>, Vec<f64>) {
    let n = g.count();
    let sums: Vec<f64> = x.par_chunks(g.hw).with_min_len(min_items(g.hw)).map(|p| lane_sum(p, |v| v)).collect();
    let mean: Vec<f64> = g.reduce(&sums).into_iter().map(|s| s / n).collect();
    let sq: Vec<f64> = x
        .par_chunks(g.hw)
        .enumerate()
        .with_min_len(min_items(g.hw))
        .map(|(q, p)| {
            let m = T::from_f64(mean[g.stat(q)]);
            lane_sum(p, |v| (v - m) * (v - m))
        })
        .collect();
    let var = g.reduce(&sq).into_iter().map(|s| s / n).collect();
    (mean, var)
}

/// y = (x − mean)·γ·inv_std + β per (group, channel), then max(·, 0) when `relu`.
pub(crate) fn bn_forward<T: Elem>(
    x: &[T],
    gamma: &[T],
    beta: &[T],
    mean: &[f64],
    inv_std: &[f64],
    relu: bool,
    g: &BnGeom,
) -> Vec<T> {
    let mut y = zeroed::<T>(x.len());
    y.par_chunks_mut(g.hw).zip(x.par_chunks(g.hw)).enumerate().with_min_len(min_items(g.hw)).for_each(
        |(q, (yp, xp))| {
            let (s, c) = (g.stat(q), q % g.c);
            let m = T::from_f64(mean[s]);
            let a = T::from_f64(gamma[c].to_f64() * inv_std[s]);
            let b = beta[c];
            if relu {
                for (o, &v) in yp.iter_mut().zip(xp) {
                    let t = (v - m) * a + b;
                    *o = if t > T::zero() { t } else { T::zero() };
                }
            } else {
                for (o, &v) in yp.iter_mut().zip(xp) {
                    *o = (v - m) * a + b;
                }
            }
        },
    );
    y
}

/// The backward pass of `bn_forward`: (dx, dγ, dβ) for the incoming gradient gy. With `relu`,
/// gy is first masked by y > 0 (y = the forward output). Per (group, channel), with
/// x̂ = (x − mean)·inv_std, N = group·H·W, g' the masked gradient:
/// dβ = Σ g', dγ = Σ g'·x̂, dx = γ·inv_std·(g' − Σg'/N − x̂·Σ(g'·x̂)/N).
#[allow(clippy::too_many_arguments)]
pub(crate) fn bn_backward<T: Elem>(
    x: &[T],
    y: &[T],
    gy: &[T],
    gamma: &[T],
    mean: &[f64],
    inv_std: &[f64],
    relu: bool,
    g: &BnGeom,
) -> (Vec<T>, Vec<f64>, Vec<f64>) {
    let masked = |gv: T, yv: T| if relu && yv <= T::zero() { T::zero() } else { gv };
    let partial: Vec<(f64, f64)> = x
        .par_chunks(g.hw)
        .zip(gy.par_chunks(g.hw))
        .zip(y.par_chunks(g.hw))
        .enumerate()
        .with_min_len(min_items(g.hw))
        .map(|(q, ((xp, gp), yp))| {
            let m = T::from_f64(mean[g.stat(q)]);
            let (mut sg, mut sgx) = ([T::zero(); LANES], [T::zero(); LANES]);
            let (mut tg, mut tgx) = (0f64, 0f64);
            let (xc, gc, yc) = (xp.chunks_exact(LANES), gp.chunks_exact(LANES), yp.chunks_exact(LANES));
            let (xr, gr, yr) = (xc.remainder(), gc.remainder(), yc.remainder());
            for ((xs, gs), ys) in xc.zip(gc).zip(yc) {
                for l in 0..LANES {
                    let gv = masked(gs[l], ys[l]);
                    sg[l] += gv;
                    sgx[l] += gv * (xs[l] - m);
                }
            }
            for ((&xv, &gv), &yv) in xr.iter().zip(gr).zip(yr) {
                let gv = masked(gv, yv);
                tg += gv.to_f64();
                tgx += (gv * (xv - m)).to_f64();
            }
            let total = |a: [T; LANES]| a.iter().fold(0f64, |s, v| s + v.to_f64());
            (total(sg) + tg, total(sgx) + tgx)
        })
        .collect();
    let sum_g = g.reduce(&partial.iter().map(|p| p.0).collect::<Vec<_>>());
    // Σ g'·(x − mean) per group; times inv_std it is Σ g'·x̂.
    let sum_gxc = g.reduce(&partial.iter().map(|p| p.1).collect::<Vec<_>>());
    let (mut dgamma, mut dbeta) = (vec![0f64; g.c], vec![0f64; g.c]);
    for (s, (&sgv, &sgx)) in sum_g.iter().zip(&sum_gxc).enumerate() {
        dbeta[s % g.c] += sgv;
        dgamma[s % g.c] += sgx * inv_std[s];
    }
    let n = g.count();
    let mut dx = zeroed::<T>(x.len());
    dx.par_chunks_mut(g.hw)
        .zip(x.par_chunks(g.hw))
        .zip(gy.par_chunks(g.hw).zip(y.par_chunks(g.hw)))
        .enumerate()
        .with_min_len(min_items(g.hw))
        .for_each(|(q, ((dp, xp), (gp, yp)))| {
            let s = g.stat(q);
            let a = gamma[q % g.c].to_f64() * inv_std[s];
            // dx = a·g' − a·Σg'/N − a·inv_std²·Σ(g'·(x − mean))/N · (x − mean)
            let m = T::from_f64(mean[s]);
            let ta = T::from_f64(a);
            let tb = T::from_f64(-a * sum_g[s] / n);
            let tc = T::from_f64(-a * inv_std[s] * inv_std[s] * sum_gxc[s] / n);
            for (((d, &xv), &gv), &yv) in dp.iter_mut().zip(xp).zip(gp).zip(yp) {
                *d = ta * masked(gv, yv) + tb + tc * (xv - m);
            }
        });
    (dx, dgamma, dbeta)
}

/// max(a + b, 0).
pub(crate) fn add_relu<T: Elem>(a: &[T], b: &[T]) -> Vec<T> {
    let mut y = zeroed::<T>(a.len());
    const BLOCK: usize = 1 << 14;
    y.par_chunks_mut(BLOCK).zip(a.par_chunks(BLOCK).zip(b.par_chunks(BLOCK))).for_each(|(yb, (ab, bb))| {
        for ((o, &u), &v) in yb.iter_mut().zip(ab).zip(bb) {
            let t = u + v;
            *o = if t > T::zero() { t } else { T::zero() };
        }
    });
    y
}

/// g where y > 0, else 0 (the backward pass of a ReLU with output y).
pub(crate) fn relu_mask<T: Elem>(g: &[T], y: &[T]) -> Vec<T> {
    let mut out = zeroed::<T>(g.len());
    const BLOCK: usize = 1 << 14;
    out.par_chunks_mut(BLOCK).zip(g.par_chunks(BLOCK).zip(y.par_chunks(BLOCK))).for_each(|(ob, (gb, yb))| {
        for ((o, &gv), &yv) in ob.iter_mut().zip(gb).zip(yb) {
            *o = if yv > T::zero() { gv } else { T::zero() };
        }
    });
    out
}
