//! The ImageNet geometry: torchvision/timm's `RandomResizedCrop` + `RandomHorizontalFlip` for
//! training (`data.augment = "rrc-flip"`) and timm's evaluation transform (resize the shorter
//! side to ⌊size / crop_pct⌋, centre crop `size`), both ending in one bilinear resample.
//!
//! **Choices.** [`rrc_choice`] is torchvision's `RandomResizedCrop.get_params` step for step
//! (scale (0.08, 1), log-uniform ratio (3/4, 4/3), 10 attempts, then the centre-crop fallback,
//! Python's round-half-to-even where it calls `round`), with the random numbers drawn as in
//! `augment.rs`: `ChaCha8Rng::from_seed(seed ‖ step ‖ index ‖ b"rrcflip\0")`, the bounded integers
//! by our own Lemire draw (`sampler::bounded`), the uniform floats as `(next_u64 >> 11) · 2⁻⁵³` —
//! nothing from rand's distributions, whose algorithms rand may change. `choices_are_pinned`
//! freezes them.
//!
//! **Resampling.** [`resample`] is Pillow's `Image.resize(…, BILINEAR)` (the interpolation
//! timm/torchvision use on PIL images): a separable triangle filter whose support widens with the
//! downscale factor (antialiasing), coefficients normalised per output pixel and rounded to
//! 22-bit fixed point, the horizontal pass first into a rounded 8-bit intermediate, then the
//! vertical pass. Integer arithmetic: the bytes are the same on every machine. It computes only
//! the output window that is kept (the centre crop of the evaluation transform) and only the
//! source rows that window needs, and mirrors while writing.
//!
//! Sources are read through strides, so one routine serves interleaved decoded images (HWC, as
//! the decoders give them) and the channel-major (CHW) byte images of the in-memory formats.

use super::sampler::bounded;
use rand::RngCore;
use rand_chacha::ChaCha8Rng;

/// The domain tag in the last 8 bytes of the ChaCha8 key (`augment.rs` uses `b"augment\0"`).
const DOMAIN: [u8; 8] = *b"rrcflip\0";
/// `RandomResizedCrop`'s default scale range (fraction of the image area).
pub const SCALE: (f64, f64) = (0.08, 1.0);
/// `RandomResizedCrop`'s default aspect-ratio range (w / h), drawn log-uniformly.
pub const RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);
/// timm's default evaluation `crop_pct`: resize to ⌊size / 0.875⌋ (256 for 224), crop `size`.
pub const CROP_PCT: f64 = 0.875;
/// Fixed-point bits of the resampling coefficients (Pillow's `PRECISION_BITS` for 8-bit images).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// A crop box in source pixels: rows `top..top + h`, columns `left..left + w`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub top: usize,
    pub left: usize,
    pub h: usize,
    pub w: usize,
}

/// The crop and the mirror of `RandomResizedCrop(scale, ratio)` + `RandomHorizontalFlip(0.5)` for
/// a `width × height` image: a pure function of `(seed, step, index)`.
pub fn rrc_choice(width: usize, height: usize, seed: u64, step: u64, index: u64) -> (CropBox, bool) {
    let mut rng = super::augment::sample_rng(seed, step, index, DOMAIN);
    let crop = rrc_params(width, height, SCALE, RATIO, &mut rng);
    let flip = rng.next_u64() >> 63 == 1;
    (crop, flip)
}

/// Uniform in [lo, hi): 53 random bits.
fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    lo + (hi - lo) * u
}

/// Python's `int(round(x))` for x ≥ 0: round half to even.
fn round_even(x: f64) -> usize {
    x.round_ties_even().max(0.0) as usize
}

/// torchvision's `RandomResizedCrop.get_params`.
fn rrc_params(width: usize, height: usize, scale: (f64, f64), ratio: (f64, f64), rng: &mut ChaCha8Rng) -> CropBox {
    let area = (width * height) as f64;
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale.0, scale.1);
        let aspect = uniform(rng, log_lo, log_hi).exp();
        let w = round_even((target_area * aspect).sqrt());
        let h = round_even((target_area / aspect).sqrt());
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = bounded(rng, (height - h + 1) as u64) as usize;
            let left = bounded(rng, (width - w + 1) as u64) as usize;
            return CropBox { top, left, h, w };
        }
    }
    // The fallback: a centre crop of the whole image, clamped to the ratio range.
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio.0 {
        (width, round_even(width as f64 / ratio.0))
    } else if in_ratio > ratio.1 {
        (round_even(height as f64 * ratio.1), height)
    } else {
        (width, height)
    };
    let (w, h) = (w.clamp(1, width.max(1)), h.clamp(1, height.max(1)));
    CropBox { top: (height - h) / 2, left: (width - w) / 2, h, w }
}

/// The evaluation geometry of a `width × height` image for output `size`: torchvision's
/// `Resize(⌊size / crop_pct⌋)` (shorter side to that, longer side `int(s · long / short)`) and
/// `CenterCrop(size)` (offsets `int(round((H − size) / 2))`). Returns the resized size (w, h) and
/// the window (top, left) of the crop in it. A resized side shorter than `size` (only with a
/// crop_pct above 1) is not padded: the window is clamped at 0 and must fit.
pub fn eval_geometry(width: usize, height: usize, size: usize) -> ((usize, usize), (usize, usize)) {
    let short_target = (size as f64 / CROP_PCT).floor() as usize;
    let (short, long) = if width <= height { (width, height) } else { (height, width) };
    let long_target = (short_target as f64 * long as f64 / short as f64) as usize;
    let (rw, rh) = if width <= height { (short_target, long_target) } else { (long_target, short_target) };
    let top = ((rh as f64 - size as f64) / 2.0).round_ties_even().max(0.0) as usize;
    let left = ((rw as f64 - size as f64) / 2.0).round_ties_even().max(0.0) as usize;
    ((rw, rh), (top, left))
}

/// An image read through strides: value of channel c at (y, x) is
/// `data[y·row + x·px + c·ch]`.
#[derive(Clone, Copy)]
pub struct Src<'a> {
    pub data: &'a [u8],
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub row: usize,
    pub px: usize,
    pub ch: usize,
}

impl<'a> Src<'a> {
    /// Interleaved rows (HWC), as decoders produce.
    pub fn hwc(data: &'a [u8], channels: usize, height: usize, width: usize) -> Self {
        Src { data, channels, height, width, row: width * channels, px: channels, ch: 1 }
    }
    /// Channel-major planes (CHW), as the in-memory data sets hold.
    pub fn chw(data: &'a [u8], channels: usize, height: usize, width: usize) -> Self {
        Src { data, channels, height, width, row: width, px: 1, ch: height * width }
    }
}

/// Pillow's coefficients of one axis: for each output position, the first source pixel, how
/// many taps it has and their fixed-point weights. `in0..in0 + in_len` is the source span
/// resized to `out_size`; only the outputs `first..first + count` are computed.
struct Coeffs {
    starts: Vec<usize>,
    lens: Vec<usize>,
    taps: usize,
    weights: Vec<i32>, // (count, taps), zero-padded
}

fn coeffs(in0: usize, in_len: usize, out_size: usize, first: usize, count: usize) -> Coeffs {
    let scale = in_len as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // the triangle filter's support is 1
    let taps = (support.ceil() as usize) * 2 + 1;
    let mut starts = Vec::with_capacity(count);
    let mut lens = Vec::with_capacity(count);
    let mut weights = vec![0i32; count * taps];
    let mut k = vec![0f64; taps];
    let ss = 1.0 / filterscale;
    for (o, row) in weights.chunks_exact_mut(taps).enumerate() {
        let xx = first + o;
        // Relative to the span (torchvision crops before it resizes), as Pillow computes it.
        let center = (xx as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i64).clamp(0, in_len as i64) as usize;
        let xmax = ((center + support + 0.5) as i64).clamp(0, in_len as i64) as usize;
        let n = xmax.saturating_sub(xmin).min(taps);
        let mut total = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let t = ((x + xmin) as f64 - center + 0.5) * ss;
            let w = if t.abs() < 1.0 { 1.0 - t.abs() } else { 0.0 };
            *kx = w;
            total += w;
        }
        for (x, out) in row.iter_mut().enumerate().take(n) {
            let w = if total != 0.0 { k[x] / total } else { 0.0 };
            let f = w * (1u64 << PRECISION_BITS) as f64;
            *out = if w < 0.0 { (f - 0.5) as i32 } else { (f + 0.5) as i32 };
        }
        starts.push(in0 + xmin);
        lens.push(n);
    }
    Coeffs { starts, lens, taps, weights }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resize the `crop` of `src` to `out_w × out_h` (Pillow bilinear) and write the window
/// `top..top + oh, left..left + ow` of the result into `out` as CHW bytes (`C × oh × ow`),
/// mirrored left-right when `flip`. `scratch` holds the horizontal pass.
#[allow(clippy::too_many_arguments)]
pub fn resample(
    src: Src,
    crop: CropBox,
    (out_w, out_h): (usize, usize),
    (top, left, oh, ow): (usize, usize, usize, usize),
    flip: bool,
    scratch: &mut Vec<u8>,
    out: &mut [u8],
) {
    let c = src.channels;
    debug_assert_eq!(out.len(), c * oh * ow);
    if oh == 0 || ow == 0 || crop.w == 0 || crop.h == 0 {
        out.fill(0);
        return;
    }
    let cx = coeffs(crop.left, crop.w, out_w, left, ow);
    let cy = coeffs(crop.top, crop.h, out_h, top, oh);
    // Source rows the kept output rows touch.
    let r0 = cy.starts.iter().copied().min().unwrap_or(0);
    let r1 = cy.starts.iter().zip(&cy.lens).map(|(s, n)| s + n).max().unwrap_or(r0).max(r0 + 1);
    let rows = r1 - r0;
    // Horizontal pass: (C, rows, ow), rounded to bytes as Pillow does.
    scratch.clear();
    scratch.resize(c * rows * ow, 0);
    let half = 1i32 << (PRECISION_BITS - 1);
    let taps = cx.taps;
    if c == 3 && src.ch == 1 && src.px == 3 {
        // Interleaved RGB (the decoders' layout): the three channels of a tap side by side.
        let (p0, rest) = scratch.split_at_mut(rows * ow);
        let (p1, p2) = rest.split_at_mut(rows * ow);
        for r in 0..rows {
            let line = &src.data[(r0 + r) * src.row..(r0 + r) * src.row + 3 * src.width];
            let (d0, d1, d2) =
                (&mut p0[r * ow..(r + 1) * ow], &mut p1[r * ow..(r + 1) * ow], &mut p2[r * ow..(r + 1) * ow]);
            for o in 0..ow {
                let (xs, n) = (cx.starts[o], cx.lens[o]);
                let w = &cx.weights[o * taps..o * taps + n];
                let px = &line[3 * xs..3 * (xs + n)];
                let (mut a0, mut a1, mut a2) = (half, half, half);
                for (p, &wt) in px.chunks_exact(3).zip(w) {
                    a0 += p[0] as i32 * wt;
                    a1 += p[1] as i32 * wt;
                    a2 += p[2] as i32 * wt;
                }
                (d0[o], d1[o], d2[o]) = (clip8(a0), clip8(a1), clip8(a2));
            }
        }
    } else {
        for ch in 0..c {
            for r in 0..rows {
                let base = (r0 + r) * src.row + ch * src.ch;
                let dst = &mut scratch[(ch * rows + r) * ow..(ch * rows + r + 1) * ow];
                for (o, d) in dst.iter_mut().enumerate() {
                    let (xs, n) = (cx.starts[o], cx.lens[o]);
                    let mut acc = half;
                    for (t, &wt) in cx.weights[o * taps..o * taps + n].iter().enumerate() {
                        acc += src.data[base + (xs + t) * src.px] as i32 * wt;
                    }
                    *d = clip8(acc);
                }
            }
        }
    }
    // Vertical pass: whole rows at a time (vectorizes), mirrored on write.
    let mut acc = vec![0i32; ow];
    for ch in 0..c {
        let plane = &scratch[ch * rows * ow..(ch + 1) * rows * ow];
        for (o, out_row) in out[ch * oh * ow..(ch + 1) * oh * ow].chunks_exact_mut(ow).enumerate() {
            let (ys, n) = (cy.starts[o] - r0, cy.lens[o]);
            acc.fill(half);
            for (t, &wt) in cy.weights[o * cy.taps..o * cy.taps + n].iter().enumerate() {
                let line = &plane[(ys + t) * ow..(ys + t + 1) * ow];
                for (a, &p) in acc.iter_mut().zip(line) {
                    *a += p as i32 * wt;
                }
            }
            if flip {
                for (o, &a) in out_row.iter_mut().rev().zip(&acc) {
                    *o = clip8(a);
                }
            } else {
                for (o, &a) in out_row.iter_mut().zip(&acc) {
                    *o = clip8(a);
                }
            }
        }
    }
}

/// `RandomResizedCrop(size)` + `RandomHorizontalFlip(0.5)` of `src` into `out` (CHW, `C × size ×
/// size`), the choices [`rrc_choice`]`(W, H, seed, step, index)`.
#[allow(clippy::too_many_arguments)]
pub fn rrc_flip(src: Src, size: usize, seed: u64, step: u64, index: u64, scratch: &mut Vec<u8>, out: &mut [u8]) {
    let (crop, flip) = rrc_choice(src.width, src.height, seed, step, index);
    resample(src, crop, (size, size), (0, 0, size, size), flip, scratch, out);
}

/// The evaluation transform of `src` into `out` (CHW, `C × size × size`): [`eval_geometry`].
pub fn resize_center_crop(src: Src, size: usize, scratch: &mut Vec<u8>, out: &mut [u8]) {
    let ((rw, rh), (top, left)) = eval_geometry(src.width, src.height, size);
    let whole = CropBox { top: 0, left: 0, h: src.height, w: src.width };
    if rw < size || rh < size {
        // Only possible for images smaller than a pixel or two: resize straight to size.
        resample(src, whole, (size, size), (0, 0, size, size), false, scratch, out);
        return;
    }
    resample(src, whole, (rw, rh), (top, left, size, size), false, scratch, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn gradient(c: usize, h: usize, w: usize) -> Vec<u8> {
        (0..c * h * w).map(|i| ((i * 37 + i / w * 11) % 251) as u8).collect()
    }

    #[test]
    fn same_size_is_identity_and_flip_mirrors() {
        let (c, h, w) = (3, 5, 7);
        let img = gradient(c, h, w);
        let src = Src::chw(&img, c, h, w);
        let all = CropBox { top: 0, left: 0, h, w };
        let mut out = vec![0; c * h * w];
        resample(src, all, (w, h), (0, 0, h, w), false, &mut Vec::new(), &mut out);
        assert_eq!(out, img);
        resample(src, all, (w, h), (0, 0, h, w), true, &mut Vec::new(), &mut out);
        let mut mirrored = img.clone();
        mirrored.chunks_exact_mut(w).for_each(|r| r.reverse());
        assert_eq!(out, mirrored);
        // HWC and CHW views of one image give the same result.
        let mut hwc = vec![0; c * h * w];
        for ch in 0..c {
            for p in 0..h * w {
                hwc[p * c + ch] = img[ch * h * w + p];
            }
        }
        resample(Src::hwc(&hwc, c, h, w), all, (w, h), (0, 0, h, w), true, &mut Vec::new(), &mut out);
        assert_eq!(out, mirrored);
    }

    #[test]
    fn halving_averages_pairs() {
        // 4 → 2 along x: scale 2, support 2; the centre of output 0 is at 1.0, taps at 0..=2 with
        // weights (t = −0.5, 0.5, 1.5 over 2) → 0.75, 0.75, 0.25 → normalised 3/7, 3/7, 1/7.
        let img = vec![0u8, 70, 140, 210];
        let src = Src::chw(&img, 1, 1, 4);
        let mut out = vec![0; 2];
        resample(src, CropBox { top: 0, left: 0, h: 1, w: 4 }, (2, 1), (0, 0, 1, 2), false, &mut Vec::new(), &mut out);
        let o0: f64 = (0.0 * 3.0 + 70.0 * 3.0 + 140.0) / 7.0; // 50
        let o1: f64 = (70.0 + 140.0 * 3.0 + 210.0 * 3.0) / 7.0; // 160
        assert_eq!(out, [o0.round() as u8, o1.round() as u8]);
    }

    #[test]
    fn eval_geometry_matches_torchvision() {
        // 500×375 at 224: shorter side 375 → 256, longer int(256·500/375) = 341; crop offsets
        // round((256 − 224)/2) = 16 and round((341 − 224)/2) = round(58.5) = 58 (half to even).
        assert_eq!(eval_geometry(500, 375, 224), ((341, 256), (16, 58)));
        assert_eq!(eval_geometry(375, 500, 224), ((256, 341), (58, 16)));
        // 16 → ⌊16/0.875⌋ = 18.
        assert_eq!(eval_geometry(20, 20, 16), ((18, 18), (1, 1)));
    }

    #[test]
    fn eval_resize_center_crop_hand_case() {
        // A 1×4×4 image to size 2: ⌊2/0.875⌋ = 2, so a plain 4 → 2 resize, no crop; each output
        // is the 3/7, 3/7, 1/7 (or 1/7, 3/7, 3/7) blend of `halving_averages_pairs`, both axes.
        #[rustfmt::skip]
        let img: Vec<u8> = vec![
            0, 0, 0, 0,
            0, 70, 70, 0,
            0, 70, 70, 0,
            0, 0, 0, 0,
        ];
        let mut out = vec![0; 4];
        resize_center_crop(Src::chw(&img, 1, 4, 4), 2, &mut Vec::new(), &mut out);
        // Horizontal pass, row 1: out0 = (0·3 + 70·3 + 70)/7 = 40, out1 = (70 + 70·3 + 0)/7 = 40.
        // Vertical: (0·3 + 40·3 + 40)/7 = 22.86 → 23.
        assert_eq!(out, [23, 23, 23, 23]);
        // A 1×6×6 image to 4: resized to ⌊4/0.875⌋ = 4 (a 6 → 4 resize), crop offset 0.
        let img6 = gradient(1, 6, 6);
        let mut a = vec![0; 16];
        resize_center_crop(Src::chw(&img6, 1, 6, 6), 4, &mut Vec::new(), &mut a);
        let mut b = vec![0; 16];
        let all = CropBox { top: 0, left: 0, h: 6, w: 6 };
        resample(Src::chw(&img6, 1, 6, 6), all, (4, 4), (0, 0, 4, 4), false, &mut Vec::new(), &mut b);
        assert_eq!(a, b);
        // A window is the same pixels as the full resize, cut.
        let img_big = gradient(3, 30, 40);
        let src = Src::chw(&img_big, 3, 30, 40);
        let all = CropBox { top: 0, left: 0, h: 30, w: 40 };
        let mut full = vec![0; 3 * 18 * 24];
        resample(src, all, (24, 18), (0, 0, 18, 24), false, &mut Vec::new(), &mut full);
        let mut win = vec![0; 3 * 16 * 16];
        resize_center_crop(src, 16, &mut Vec::new(), &mut win);
        let ((rw, rh), (top, left)) = eval_geometry(40, 30, 16);
        assert_eq!((rw, rh, top, left), (24, 18, 1, 4));
        for ch in 0..3 {
            for y in 0..16 {
                for x in 0..16 {
                    assert_eq!(win[ch * 256 + y * 16 + x], full[ch * 18 * 24 + (y + top) * 24 + x + left]);
                }
            }
        }
    }

    #[test]
    fn rrc_choices_are_valid_and_cover() {
        let (w, h) = (500, 375);
        let (mut flips, mut small, mut fallback) = (0, 0, 0);
        for i in 0..2000 {
            let (b, flip) = rrc_choice(w, h, 3, i / 7, i);
            assert!(b.w >= 1 && b.h >= 1 && b.left + b.w <= w && b.top + b.h <= h, "{b:?}");
            let area = (b.w * b.h) as f64 / (w * h) as f64;
            let ratio = b.w as f64 / b.h as f64;
            assert!((0.07..=1.0).contains(&area), "{b:?}");
            assert!((0.7..=1.45).contains(&ratio), "{b:?}");
            flips += flip as u32;
            small += (area < 0.3) as u32;
            fallback += (b == CropBox { top: 0, left: 31, h: 375, w: 438 }) as u32;
        }
        assert!((900..=1100).contains(&flips), "{flips}");
        assert!(small > 300, "{small}");
        // A draw falling back to the centre crop needs 10 failed attempts: rare at 4:3.
        assert!(fallback < 20, "{fallback}");
        let mut rng = ChaCha8Rng::from_seed([7; 32]);
        // A 1000×10 strip: every attempt fails (h ≥ 28 > 10 for scale ≥ 0.08 at ratio ≤ 4/3).
        let b = rrc_params(1000, 10, SCALE, RATIO, &mut rng);
        assert_eq!(b, CropBox { top: 0, left: (1000 - 13) / 2, h: 10, w: 13 });
    }

    #[test]
    fn scale_one_ratio_one_is_a_resize() {
        // With the whole image as the crop, rrc is the plain resize (and its mirror).
        let img = gradient(3, 12, 12);
        let src = Src::chw(&img, 3, 12, 12);
        let mut rng = ChaCha8Rng::from_seed([1; 32]);
        let b = rrc_params(12, 12, (1.0, 1.0), (1.0, 1.0), &mut rng);
        assert_eq!(b, CropBox { top: 0, left: 0, h: 12, w: 12 });
        let (mut a, mut m) = (vec![0; 3 * 64], vec![0; 3 * 64]);
        resample(src, b, (8, 8), (0, 0, 8, 8), false, &mut Vec::new(), &mut a);
        resample(src, b, (8, 8), (0, 0, 8, 8), true, &mut Vec::new(), &mut m);
        a.chunks_exact_mut(8).for_each(|r| r.reverse());
        assert_eq!(a, m);
    }

    #[test]
    fn deterministic_and_distinct() {
        let c = |s, t, i| rrc_choice(500, 375, s, t, i);
        assert_eq!(c(1, 2, 3), c(1, 2, 3));
        let differ = (0..100u64).filter(|&i| c(5, i, i) != c(5, i + 1, i) && c(5, i, i) != c(6, i, i)).count();
        assert!(differ >= 98, "{differ}");
    }

    /// The interleaved-RGB fast path and the general strided path agree, on down- and upscales.
    #[test]
    fn rgb_fast_path_matches_general_path() {
        let (h, w) = (37, 53);
        let chw = gradient(3, h, w);
        let mut hwc = vec![0; 3 * h * w];
        for ch in 0..3 {
            for p in 0..h * w {
                hwc[p * 3 + ch] = chw[ch * h * w + p];
            }
        }
        for i in 0..20 {
            let (crop, flip) = rrc_choice(w, h, 1, 2, i);
            for size in [7, 16, 70] {
                let (mut a, mut b) = (vec![0; 3 * size * size], vec![0; 3 * size * size]);
                let win = (0, 0, size, size);
                resample(Src::hwc(&hwc, 3, h, w), crop, (size, size), win, flip, &mut Vec::new(), &mut a);
                resample(Src::chw(&chw, 3, h, w), crop, (size, size), win, flip, &mut Vec::new(), &mut b);
                assert_eq!(a, b, "{crop:?} {size}");
            }
        }
    }

    /// Freezes the resampled bytes: a change to the filter changes every trained model.
    #[test]
    fn resampled_bytes_are_pinned() {
        let img = gradient(3, 60, 80);
        let mut out = vec![0; 3 * 24 * 24];
        let mut sum = 0u64;
        for i in 0..8 {
            rrc_flip(Src::chw(&img, 3, 60, 80), 24, 42, 7, i, &mut Vec::new(), &mut out);
            sum = out.iter().fold(sum, |h, &b| h.wrapping_mul(1_000_003).wrapping_add(b as u64));
        }
        resize_center_crop(Src::chw(&img, 3, 60, 80), 24, &mut Vec::new(), &mut out);
        sum = out.iter().fold(sum, |h, &b| h.wrapping_mul(1_000_003).wrapping_add(b as u64));
        assert_eq!(sum, 12_686_541_046_534_891_087);
    }

    /// Freezes the choices (see `augment::choices_are_pinned`).
    #[test]
    fn choices_are_pinned() {
        let got: Vec<_> = (0..4).map(|i| rrc_choice(500, 375, 42, 1000, i)).collect();
        let pinned: Vec<(CropBox, bool)> =
            PINNED.iter().map(|&(t, l, h, w, f)| (CropBox { top: t, left: l, h, w }, f)).collect();
        assert_eq!(got, pinned);
    }
    const PINNED: [(usize, usize, usize, usize, bool); 4] =
        [(2, 100, 293, 242, true), (34, 5, 335, 445, false), (6, 78, 367, 302, false), (1, 191, 359, 303, true)];
}
