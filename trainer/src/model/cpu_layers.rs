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
//!   then scattered into NCHW. Weight gradient: dw += g_chunk [O, n·HW'] · colᵀ, with the im2col
//!   matrix recomputed from x (storing it would cost k² activations per conv). Input gradient:
//!   dcol = wᵀ · g_chunk, then col2im (each input pixel gathers its k² taps in a fixed order). A
//!   1×1 stride-1 unpadded conv of one sample uses x itself as the im2col matrix.
//! - **Training-mode batch norm** over ghost batches (+ optional fused ReLU): statistics in two
//!   passes (mean, then the mean squared deviation) with f64 sums per (sample, channel) plane,
//!   reduced over a group's planes in a fixed order; y = (x − mean)·γ/σ + β in one pass; the
//!   backward pass is the closed form dx = γ/σ·(g − mean(g) − x̂·mean(g·x̂)) per group, with g
//!   masked by y > 0 when the ReLU is fused: two passes, no intermediate tensors.
//! - **Residual add + ReLU** in one pass, and its backward (the mask of y > 0) in one.
//!
//! Parallelism: rayon over rows of the im2col matrix, over (sample, channel) planes, and the
//! products through `native::matmul` (the one GEMM entry of the host kernels, which splits the
//! output over the threads); rayon's pool (`RAYON_NUM_THREADS`, `kutta --threads`). Every reduction
//! is over a fixed partition in a fixed order (no atomics), so results are bit-identical run to
//! run for a given thread count — and, GEMM aside, for any thread count.

use rayon::prelude::*;

use super::native::{matmul, Mat};
use crate::error::Result;

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

/// Keep freed memory in the process (glibc only, once, on the first kernel call): activations of
/// more than 32 MB (ResNet-18's first stage at batch 128) are otherwise `mmap`ed fresh at every
/// allocation and `munmap`ed at every free, so each gradient evaluation page-faults ~1 GB of
/// zeroed pages in (12% of its time in the kernel). With mmap off and the heap never trimmed, the
/// next evaluation reuses the same memory; the peak resident size is unchanged.
fn keep_freed_memory() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only sets allocator parameters; it is thread-safe in glibc.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    });
}

/// The output columns [lo, hi) of a kernel tap at offset `j` (stride 1) whose input column
/// ox + j − pad lies inside [0, w).
fn valid_columns(j: usize, pad: usize, w: usize, ow: usize) -> (usize, usize) {
    let lo = pad.saturating_sub(j).min(ow);
    let hi = (w + pad).saturating_sub(j).min(ow).max(lo);
    (lo, hi)
}

/// The input row (or column) of output position `o` and tap `i`, None in the padding.
fn input_index(o: usize, i: usize, g: &ConvGeom, size: usize) -> Option<usize> {
    (o * g.stride + i).checked_sub(g.pad).filter(|&v| v < size)
}

/// col [C·k·k, n·oh·ow] (row (c, i, j), column (sample, y, z)) = x[sample, c, y·s + i − p,
/// z·s + j − p], zero in the padding; x holds the chunk's n samples.
fn im2col<T: Elem>(x: &[T], g: &ConvGeom, n: usize, col: &mut [T]) {
    let (k, hw, hwo) = (g.k, g.hw_in(), g.hw_out());
    let cn = n * hwo;
    col[..g.ckk() * cn].par_chunks_mut(cn).enumerate().with_min_len(min_items(cn)).for_each(|(r, row)| {
        let (c, i, j) = (r / (k * k), (r / k) % k, r % k);
        for s in 0..n {
            let plane = &x[(s * g.c + c) * hw..][..hw];
            let out = &mut row[s * hwo..][..hwo];
            for (oy, orow) in out.chunks_exact_mut(g.ow).enumerate() {
                let Some(iy) = input_index(oy, i, g, g.h) else {
                    orow.fill(T::zero());
                    continue;
                };
                let xrow = &plane[iy * g.w..][..g.w];
                if g.stride == 1 {
                    let (lo, hi) = valid_columns(j, g.pad, g.w, g.ow);
                    orow[..lo].fill(T::zero());
                    orow[hi..].fill(T::zero());
                    orow[lo..hi].copy_from_slice(&xrow[lo + j - g.pad..hi + j - g.pad]);
                } else {
                    for (ox, v) in orow.iter_mut().enumerate() {
                        *v = input_index(ox, j, g, g.w).map_or(T::zero(), |ix| xrow[ix]);
                    }
                }
            }
        }
    });
}

/// The adjoint of `im2col`: dx [n, C, h, w] = Σ over the taps that read each pixel of dcol,
/// gathered per (sample, channel) plane in tap order (deterministic, no write conflicts).
fn col2im<T: Elem>(dcol: &[T], g: &ConvGeom, n: usize, dx: &mut [T]) {
    let (k, hw, hwo) = (g.k, g.hw_in(), g.hw_out());
    let cn = n * hwo;
    dx[..n * g.c * hw].par_chunks_mut(hw).enumerate().with_min_len(min_items(hw)).for_each(|(q, plane)| {
        let (s, c) = (q / g.c, q % g.c);
        plane.fill(T::zero());
        for i in 0..k {
            for j in 0..k {
                let row = &dcol[((c * k + i) * k + j) * cn + s * hwo..][..hwo];
                for (oy, grow) in row.chunks_exact(g.ow).enumerate() {
                    let Some(iy) = input_index(oy, i, g, g.h) else { continue };
                    let prow = &mut plane[iy * g.w..][..g.w];
                    if g.stride == 1 {
                        let (lo, hi) = valid_columns(j, g.pad, g.w, g.ow);
                        for (d, &v) in prow[lo + j - g.pad..hi + j - g.pad].iter_mut().zip(&grow[lo..hi]) {
                            *d += v;
                        }
                    } else {
                        for (ox, &v) in grow.iter().enumerate() {
                            if let Some(ix) = input_index(ox, j, g, g.w) {
                                prow[ix] += v;
                            }
                        }
                    }
                }
            }
        }
    });
}

/// [n, rows, len] (NCHW, a chunk of samples) → [rows, n·len] (the GEMM's column layout).
fn gather<T: Elem>(src: &[T], n: usize, rows: usize, len: usize, dst: &mut [T]) {
    dst[..rows * n * len].par_chunks_mut(n * len).enumerate().with_min_len(min_items(n * len)).for_each(|(r, out)| {
        for (s, o) in out.chunks_exact_mut(len).enumerate() {
            o.copy_from_slice(&src[(s * rows + r) * len..][..len]);
        }
    });
}

/// The inverse of `gather`: [rows, n·len] → [n, rows, len].
fn scatter<T: Elem>(src: &[T], n: usize, rows: usize, len: usize, dst: &mut [T]) {
    dst[..n * rows * len].par_chunks_mut(len).enumerate().with_min_len(min_items(len)).for_each(|(q, out)| {
        let (s, r) = (q / rows, q % rows);
        out.copy_from_slice(&src[r * n * len + s * len..][..len]);
    });
}

/// A buffer of `len` elements for scratch use (its contents are overwritten before being read).
fn scratch<T: Elem>(len: usize) -> Vec<T> {
    vec![T::zero(); len]
}

/// The chunks of samples the GEMMs run over: (first sample, samples).
fn chunks(g: &ConvGeom) -> impl Iterator<Item = (usize, usize)> {
    let (b, step) = (g.b, g.chunk());
    (0..b).step_by(step).map(move |s| (s, step.min(b - s)))
}

/// y [b, o, oh, ow] = x [b, c, h, w] ⊛ weight [o, c, k, k].
pub(crate) fn conv_forward<T: Elem>(x: &[T], weight: &[T], g: &ConvGeom) -> Result<Vec<T>> {
    keep_freed_memory();
    let (chw, ohw, ckk) = (g.c * g.hw_in(), g.o * g.hw_out(), g.ckk());
    let mut y = vec![T::zero(); g.b * ohw];
    let cap = g.chunk() * g.hw_out();
    let mut col = if g.pointwise() && g.chunk() == 1 { Vec::new() } else { scratch::<T>(ckk * cap) };
    let mut tmp = if g.chunk() == 1 { Vec::new() } else { scratch::<T>(g.o * cap) };
    for (s0, n) in chunks(g) {
        let xs = &x[s0 * chw..(s0 + n) * chw];
        let ys = &mut y[s0 * ohw..(s0 + n) * ohw];
        let cn = n * g.hw_out();
        let cols: &[T] = if g.pointwise() && n == 1 {
            xs
        } else {
            im2col(xs, g, n, &mut col);
            &col
        };
        let (w, c) = (Mat::row_major(weight, g.o, ckk), Mat::row_major(cols, ckk, cn));
        if n == 1 {
            matmul(ys, w, c, false)?;
        } else {
            matmul(&mut tmp[..g.o * cn], w, c, false)?;
            scatter(&tmp, n, g.o, g.hw_out(), ys);
        }
    }
    Ok(y)
}

/// dL/dweight [o, c, k, k] = Σ over samples of gy_s [o, oh·ow] · col_sᵀ.
pub(crate) fn conv_weight_grad<T: Elem>(x: &[T], gy: &[T], g: &ConvGeom) -> Result<Vec<T>> {
    let (chw, ohw, ckk) = (g.c * g.hw_in(), g.o * g.hw_out(), g.ckk());
    let mut dw = vec![T::zero(); g.o * ckk];
    let cap = g.chunk() * g.hw_out();
    let mut col = if g.pointwise() && g.chunk() == 1 { Vec::new() } else { scratch::<T>(ckk * cap) };
    let mut gc = if g.chunk() == 1 { Vec::new() } else { scratch::<T>(g.o * cap) };
    for (s0, n) in chunks(g) {
        let xs = &x[s0 * chw..(s0 + n) * chw];
        let gs = &gy[s0 * ohw..(s0 + n) * ohw];
        let cn = n * g.hw_out();
        let cols: &[T] = if g.pointwise() && n == 1 {
            xs
        } else {
            im2col(xs, g, n, &mut col);
            &col
        };
        let gmat: &[T] = if n == 1 {
            gs
        } else {
            gather(gs, n, g.o, g.hw_out(), &mut gc);
            &gc
        };
        matmul(&mut dw, Mat::row_major(gmat, g.o, cn), Mat::row_major(cols, ckk, cn).t(), s0 > 0)?;
    }
    Ok(dw)
}

/// dL/dx [b, c, h, w] = col2im(weightᵀ · gy_s) per chunk of samples.
pub(crate) fn conv_input_grad<T: Elem>(gy: &[T], weight: &[T], g: &ConvGeom) -> Result<Vec<T>> {
    let (chw, ohw, ckk) = (g.c * g.hw_in(), g.o * g.hw_out(), g.ckk());
    let mut dx = vec![T::zero(); g.b * chw];
    let cap = g.chunk() * g.hw_out();
    let mut dcol = if g.pointwise() && g.chunk() == 1 { Vec::new() } else { scratch::<T>(ckk * cap) };
    let mut gc = if g.chunk() == 1 { Vec::new() } else { scratch::<T>(g.o * cap) };
    for (s0, n) in chunks(g) {
        let gs = &gy[s0 * ohw..(s0 + n) * ohw];
        let dxs = &mut dx[s0 * chw..(s0 + n) * chw];
        let cn = n * g.hw_out();
        let gmat: &[T] = if n == 1 {
            gs
        } else {
            gather(gs, n, g.o, g.hw_out(), &mut gc);
            &gc
        };
        let (wt, gm) = (Mat::row_major(weight, g.o, ckk).t(), Mat::row_major(gmat, g.o, cn));
        if g.pointwise() && n == 1 {
            matmul(dxs, wt, gm, false)?;
        } else {
            matmul(&mut dcol[..ckk * cn], wt, gm, false)?;
            col2im(&dcol, g, n, dxs);
        }
    }
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
    let mut y = vec![T::zero(); x.len()];
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
    let mut dx = vec![T::zero(); x.len()];
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
    let mut y = vec![T::zero(); a.len()];
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
    let mut out = vec![T::zero(); g.len()];
    const BLOCK: usize = 1 << 14;
    out.par_chunks_mut(BLOCK).zip(g.par_chunks(BLOCK).zip(y.par_chunks(BLOCK))).for_each(|(ob, (gb, yb))| {
        for ((o, &gv), &yv) in ob.iter_mut().zip(gb).zip(yb) {
            *o = if yv > T::zero() { gv } else { T::zero() };
        }
    });
    out
}
