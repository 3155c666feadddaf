//! Deterministic data augmentation on byte images, before normalization: the standard CIFAR
//! recipe of a random crop from the zero-padded image and a random horizontal flip
//! (torchvision's `RandomCrop(32, padding=4)` + `RandomHorizontalFlip(0.5)`).
//!
//! Every random choice is a pure function of `(seed, step, index)`, where `index` is the sample's
//! index in the training set, the same scheme as the batch sampler's (`data::sampler`): a run
//! resumed from a checkpoint at step `k`, and every rank of a distributed run, draw exactly the
//! crops an uninterrupted single-process run would have drawn, with no RNG state to save.
//!
//! The choices come from `ChaCha8Rng::from_seed(key)`, `key` = `seed`, `step`, `index` as
//! little-endian `u64`s followed by the 8-byte domain tag `b"augment\0"` (so these streams never
//! coincide with another use of ChaCha8 on the same numbers). Like the sampler, the bounded draws
//! use our own unbiased Lemire multiply-and-reject on `next_u64()` rather than rand's
//! `random_range`, whose algorithm rand does not promise to keep between versions; the choices
//! are therefore stable as long as ChaCha8's output is (a fixed cipher), and the test
//! `choices_are_pinned` guards them.
//!
//! [`crop_flip`] allocates nothing and copies whole row segments: one RNG seeding per image, then
//! per output row a zero fill of the padding columns and one copy of the image's row segment
//! (reversed when mirrored).

use super::sampler::bounded;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The padding of the standard CIFAR crop: 32×32 crops from the 40×40 zero-padded image.
pub const CIFAR_PAD: usize = 4;

/// The domain tag in the last 8 bytes of the ChaCha8 key.
const DOMAIN: [u8; 8] = *b"augment\0";

/// Training-time augmentation, the config's `data.augment`: `"none"`, `"crop-flip"` or
/// `"rrc-flip"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Augment {
    /// Images as stored. The default.
    #[default]
    None,
    /// [`crop_flip`] with [`CIFAR_PAD`]: random crop of the zero-padded image, random mirror.
    CropFlip,
    /// `RandomResizedCrop` + `RandomHorizontalFlip(0.5)` (`data::transform::rrc_flip`): the
    /// ImageNet recipe, resized to `data.image_size` (the native size for in-memory formats).
    RrcFlip,
}

/// The random stream of one sample's augmentation: `ChaCha8Rng::from_seed` of `seed`, `step`,
/// `index` as little-endian `u64`s and the 8-byte `domain` tag of the augmentation (so that two
/// augmentations never draw the same stream). Every augmentation's choices come from it.
pub(crate) fn sample_rng(seed: u64, step: u64, index: u64, domain: [u8; 8]) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[0..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&step.to_le_bytes());
    key[16..24].copy_from_slice(&index.to_le_bytes());
    key[24..32].copy_from_slice(&domain);
    ChaCha8Rng::from_seed(key)
}

/// The choices of [`crop_flip`] for one sample: the crop offset `(dy, dx)` into the padded image,
/// each uniform in `0..=2·pad`, and whether to mirror left-right (probability 1/2). An offset of
/// `pad` is the uncropped position. A pure function of its arguments.
pub fn crop_flip_choice(pad: usize, seed: u64, step: u64, index: u64) -> (usize, usize, bool) {
    let mut rng = sample_rng(seed, step, index, DOMAIN);
    let span = 2 * pad as u64 + 1;
    let dy = bounded(&mut rng, span) as usize;
    let dx = bounded(&mut rng, span) as usize;
    let flip = rng.next_u64() >> 63 == 1;
    (dy, dx, flip)
}

/// The standard CIFAR recipe (torchvision `RandomCrop(size, padding=pad)` +
/// `RandomHorizontalFlip(0.5)`): the image is zero-padded by `pad` pixels on every side (pixel
/// value 0, as torchvision pads before normalization), an `h × w` window is taken at an offset
/// `(dy, dx)` uniform in `0..=2·pad` each, and it is mirrored left-right with probability 1/2.
/// All three choices are [`crop_flip_choice`]`(pad, seed, step, index)`, a pure function of
/// `(seed, step, index)` — `index` is the sample's index in the training set — so that a resumed
/// run and any number of ranks draw the same crops.
///
/// `src` and `out` are one image each, `shape = [C, H, W]`, channel-major (CHW), `C·H·W` bytes;
/// every channel gets the same crop and flip. Any `pad` works, even one larger than the image
/// (the window may then be all padding).
pub fn crop_flip(src: &[u8], shape: [usize; 3], pad: usize, seed: u64, step: u64, index: u64, out: &mut [u8]) {
    let (dy, dx, flip) = crop_flip_choice(pad, seed, step, index);
    apply_crop_flip(src, shape, pad, dy, dx, flip, out);
}

/// [`crop_flip`] with its choices given: `out[c][y][x] = padded[c][y + dy][x' + dx]`, where
/// `x' = W − 1 − x` if `flip` else `x`, and `padded` is `src` with `pad` zeros on every side.
fn apply_crop_flip(src: &[u8], [c, h, w]: [usize; 3], pad: usize, dy: usize, dx: usize, flip: bool, out: &mut [u8]) {
    let plane = h * w;
    if plane == 0 {
        return;
    }
    debug_assert_eq!(src.len(), c * plane, "crop_flip: src is not one {c}×{h}×{w} image");
    debug_assert_eq!(out.len(), c * plane, "crop_flip: out is not one {c}×{h}×{w} image");
    // Source column of output column x (before the flip) is x + dx − pad; the columns whose
    // source lies inside the image are x0..x1, the rest are padding.
    let x0 = pad.saturating_sub(dx).min(w);
    let x1 = (w + pad).saturating_sub(dx).min(w).max(x0);
    // Exact whenever x0 < x1 (then x0 ≥ pad − dx); unused otherwise.
    let src_x0 = (x0 + dx).saturating_sub(pad);
    for (src_plane, out_plane) in src.chunks_exact(plane).zip(out.chunks_exact_mut(plane)) {
        for (y, out_row) in out_plane.chunks_exact_mut(w).enumerate() {
            // Source row y + dy − pad, if inside the image.
            let sy = (y + dy).checked_sub(pad).filter(|&sy| sy < h);
            match sy {
                Some(sy) if x1 > x0 => {
                    let seg = &src_plane[sy * w + src_x0..sy * w + src_x0 + (x1 - x0)];
                    // Mirrored, output columns x0..x1 land on w − x1..w − x0.
                    let (a, b) = if flip { (w - x1, w - x0) } else { (x0, x1) };
                    out_row[..a].fill(0);
                    if flip {
                        out_row[a..b].iter_mut().zip(seg.iter().rev()).for_each(|(o, &s)| *o = s);
                    } else {
                        out_row[a..b].copy_from_slice(seg);
                    }
                    out_row[b..].fill(0);
                }
                _ => out_row.fill(0),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, spelled out: pad into an (H+2p)×(W+2p) buffer, take the window, mirror.
    fn reference(src: &[u8], [c, h, w]: [usize; 3], pad: usize, choice: (usize, usize, bool)) -> Vec<u8> {
        let (dy, dx, flip) = choice;
        let (ph, pw) = (h + 2 * pad, w + 2 * pad);
        let mut padded = vec![0u8; c * ph * pw];
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    padded[ch * ph * pw + (y + pad) * pw + (x + pad)] = src[ch * h * w + y * w + x];
                }
            }
        }
        let mut crop = vec![0u8; c * h * w];
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    crop[ch * h * w + y * w + x] = padded[ch * ph * pw + (y + dy) * pw + (x + dx)];
                }
            }
        }
        if flip {
            for row in crop.chunks_exact_mut(w) {
                row.reverse();
            }
        }
        crop
    }

    /// An image whose bytes are all distinct and non-zero (for up to 255 pixels).
    fn image(shape: [usize; 3]) -> Vec<u8> {
        let n: usize = shape.iter().product();
        (0..n).map(|i| (i % 255 + 1) as u8).collect()
    }

    fn run(src: &[u8], shape: [usize; 3], pad: usize, seed: u64, step: u64, index: u64) -> Vec<u8> {
        let mut out = vec![0xAA; src.len()];
        crop_flip(src, shape, pad, seed, step, index, &mut out);
        out
    }

    #[test]
    fn augment_serde_names() {
        assert_eq!(serde_json::to_string(&Augment::None).unwrap(), "\"none\"");
        assert_eq!(serde_json::to_string(&Augment::CropFlip).unwrap(), "\"crop-flip\"");
        let a: Augment = serde_json::from_str("\"crop-flip\"").unwrap();
        assert_eq!(a, Augment::CropFlip);
        assert_eq!(serde_json::from_str::<Augment>("\"rrc-flip\"").unwrap(), Augment::RrcFlip);
        assert_eq!(Augment::default(), Augment::None);
        assert!(serde_json::from_str::<Augment>("\"crop_flip\"").is_err());
    }

    #[test]
    fn deterministic() {
        let shape = [3, 32, 32];
        let src: Vec<u8> = (0..3 * 32 * 32).map(|i| (i * 7 % 251) as u8).collect();
        for (seed, step, index) in [(0, 0, 0), (42, 7, 123), (u64::MAX, u64::MAX, u64::MAX)] {
            assert_eq!(run(&src, shape, CIFAR_PAD, seed, step, index), run(&src, shape, CIFAR_PAD, seed, step, index));
            assert_eq!(crop_flip_choice(CIFAR_PAD, seed, step, index), crop_flip_choice(CIFAR_PAD, seed, step, index));
        }
    }

    #[test]
    fn different_step_index_or_seed_differ() {
        // 162 equally likely choices: two independent draws agree with probability 1/162.
        let c = |seed, step, index| crop_flip_choice(CIFAR_PAD, seed, step, index);
        let differ = |f: &dyn Fn(u64) -> bool| (0..100u64).filter(|&i| f(i)).count();
        let by_step = differ(&|i| c(5, i, i * 3) != c(5, i + 1, i * 3));
        let by_index = differ(&|i| c(5, i, i * 3) != c(5, i, i * 3 + 1));
        let by_seed = differ(&|i| c(5, i, i * 3) != c(6, i, i * 3));
        // Swapping step and index must not give the same stream either.
        let by_swap = differ(&|i| c(5, i, i + 1) != c(5, i + 1, i));
        for (what, n) in [("step", by_step), ("index", by_index), ("seed", by_seed), ("swap", by_swap)] {
            assert!(n >= 90, "{what}: only {n} of 100 choices differ");
        }
    }

    #[test]
    fn covers_all_offsets_and_flips() {
        let span = 2 * CIFAR_PAD + 1;
        let mut counts = vec![[0u32; 2]; span * span];
        let draws = 8100;
        for i in 0..draws {
            let (dy, dx, flip) = crop_flip_choice(CIFAR_PAD, 17, i / 100, i);
            assert!(dy < span && dx < span);
            counts[dy * span + dx][flip as usize] += 1;
        }
        // Expected 50 per cell; all 162 cells hit, none wildly off.
        for (cell, c) in counts.iter().enumerate() {
            for &n in c {
                assert!((15..=100).contains(&n), "cell {cell}: {n} draws of {draws}: {counts:?}");
            }
        }
        let flips: u32 = counts.iter().map(|c| c[1]).sum();
        assert!((3800..=4300).contains(&flips), "{flips} flips of {draws}");
    }

    #[test]
    fn matches_reference_small_case() {
        // A 1×4×4 image with pad 1: 3×3 offsets × 2 flips; enough draws to meet all 18.
        let shape = [1, 4, 4];
        let src = image(shape);
        let mut seen = std::collections::HashSet::new();
        for index in 0..400 {
            let choice = crop_flip_choice(1, 3, 9, index);
            seen.insert(choice);
            assert_eq!(run(&src, shape, 1, 3, 9, index), reference(&src, shape, 1, choice), "{choice:?}");
        }
        assert_eq!(seen.len(), 18);
    }

    #[test]
    fn hand_checked_case() {
        // 1×4×4, pad 1: find a draw with (dy, dx, flip) = (0, 2, true) and check it by hand.
        // Padded row 0 is zeros; padded rows 1..=3 are [0, r0 r1 r2 r3, 0] with image rows 0..=2;
        // the window starts at column 2: [r1 r2 r3 0], mirrored: [0 r3 r2 r1].
        let shape = [1, 4, 4];
        #[rustfmt::skip]
        let src: Vec<u8> = vec![
             1,  2,  3,  4,
             5,  6,  7,  8,
             9, 10, 11, 12,
            13, 14, 15, 16,
        ];
        let index = (0..).find(|&i| crop_flip_choice(1, 0, 0, i) == (0, 2, true)).unwrap();
        #[rustfmt::skip]
        let expect: Vec<u8> = vec![
            0,  0,  0,  0,
            0,  4,  3,  2,
            0,  8,  7,  6,
            0, 12, 11, 10,
        ];
        assert_eq!(run(&src, shape, 1, 0, 0, index), expect);
    }

    #[test]
    fn matches_reference_general() {
        // Several channels, non-square, pads from none to more than the image.
        for (shape, pad) in [([3, 5, 7], 2), ([2, 3, 4], 0), ([1, 4, 4], 5), ([3, 32, 32], CIFAR_PAD)] {
            let src = image(shape);
            for index in 0..300 {
                let choice = crop_flip_choice(pad, 11, 2, index);
                let got = run(&src, shape, pad, 11, 2, index);
                assert_eq!(got, reference(&src, shape, pad, choice), "{shape:?} pad {pad} {choice:?}");
            }
        }
    }

    #[test]
    fn pad_zero_is_identity_or_mirror() {
        let shape = [3, 6, 5];
        let src = image(shape);
        for index in 0..20 {
            let (dy, dx, flip) = crop_flip_choice(0, 1, 1, index);
            assert_eq!((dy, dx), (0, 0));
            let out = run(&src, shape, 0, 1, 1, index);
            let mut expect = src.clone();
            if flip {
                expect.chunks_exact_mut(5).for_each(|r| r.reverse());
            }
            assert_eq!(out, expect);
        }
    }

    #[test]
    fn zero_padding_at_border() {
        // Offset (0, 0) shifts the image down-right by `pad`: the top `pad` rows and the left
        // `pad` columns are the zero padding (the right ones when mirrored).
        let shape = [3, 32, 32];
        let src = vec![200u8; 3 * 32 * 32];
        let p = CIFAR_PAD;
        for want_flip in [false, true] {
            let index = (0..).find(|&i| crop_flip_choice(p, 8, 1, i) == (0, 0, want_flip)).unwrap();
            let out = run(&src, shape, p, 8, 1, index);
            for (ch, plane) in out.chunks_exact(32 * 32).enumerate() {
                for (y, row) in plane.chunks_exact(32).enumerate() {
                    for (x, &v) in row.iter().enumerate() {
                        let col = if want_flip { 31 - x } else { x };
                        let border = y < p || col < p;
                        assert_eq!(v, if border { 0 } else { 200 }, "ch {ch} y {y} x {x} flip {want_flip}");
                    }
                }
            }
        }
    }

    /// Freezes the choices: if this fails, augmented runs are no longer reproducible across
    /// versions (and a resumed run would not continue the same crops).
    #[test]
    fn choices_are_pinned() {
        let got: Vec<_> = (0..6).map(|i| crop_flip_choice(CIFAR_PAD, 42, 1000, i)).collect();
        assert_eq!(got, PINNED);
    }
    const PINNED: [(usize, usize, bool); 6] =
        [(8, 8, true), (7, 6, true), (6, 5, false), (1, 7, false), (2, 5, true), (4, 4, false)];
}
