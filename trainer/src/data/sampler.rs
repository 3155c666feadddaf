//! The deterministic batch sampler: the batch of step `k` is a pure function of
//! `(n, batch_size, seed, shuffle, k)`, so a run resumed from a checkpoint at step `k`, or a
//! rank that joins late, sees exactly the batches an uninterrupted run would have seen.
//!
//! The global sample stream is the concatenation of one permutation of `0..n` per epoch,
//! `perm(seed, 0) ++ perm(seed, 1) ++ …`, and the batch of step `k` (0-based) is
//! `stream[k·B .. (k+1)·B]`. Batches may straddle an epoch boundary; nothing is dropped, and
//! `B` may even exceed `n` (a batch then spans several epochs). With `shuffle = false` every
//! permutation is the identity (file order).
//!
//! `perm(seed, epoch)` is a Fisher-Yates shuffle driven by
//! `ChaCha8Rng::seed_from_u64(mix(seed, epoch))` with our own unbiased bounded draw
//! (Lemire's multiply-and-reject on `next_u64()`). It deliberately avoids rand's `shuffle` and
//! `random_range`, whose algorithms may change between rand versions: the order is stable as
//! long as ChaCha8's output stream is (it is a fixed, specified cipher), and the test
//! `permutation_is_pinned` guards it.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Yields fixed-size batches of sample indices; see the module docs for the order.
#[derive(Clone, Debug)]
pub struct BatchSampler {
    n: usize,
    batch_size: usize,
    seed: u64,
    shuffle: bool,
    /// The permutation of one epoch (the last one a batch touched), so sequential steps compute
    /// each epoch's permutation once. Unused when `shuffle` is false.
    cache: Option<(u64, Vec<usize>)>,
}

impl BatchSampler {
    /// A sampler over `n` samples with batches of `batch_size`.
    ///
    /// # Panics
    /// If `n` or `batch_size` is zero (the config layer rejects those before building one).
    pub fn new(n: usize, batch_size: usize, seed: u64, shuffle: bool) -> Self {
        assert!(n > 0, "BatchSampler over an empty data set");
        assert!(batch_size > 0, "BatchSampler with batch_size 0");
        BatchSampler { n, batch_size, seed, shuffle, cache: None }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The indices (into the data set) of the batch of step `step`: `batch_size` of them.
    pub fn batch(&mut self, step: u64) -> Vec<usize> {
        let n = self.n as u128;
        let b = self.batch_size;
        let start = step as u128 * b as u128;
        // Epoch numbers beyond u64 would need > 2^64 samples; wrapping there is harmless.
        let mut epoch = (start / n) as u64;
        let mut offset = (start % n) as usize;
        let mut out = Vec::with_capacity(b);
        while out.len() < b {
            let take = (b - out.len()).min(self.n - offset);
            if self.shuffle {
                let perm = self.perm(epoch);
                out.extend_from_slice(&perm[offset..offset + take]);
            } else {
                out.extend(offset..offset + take);
            }
            epoch = epoch.wrapping_add(1);
            offset = 0;
        }
        out
    }

    /// The fractional epoch at the start of step `step`: `step · B / n`.
    pub fn epoch(&self, step: u64) -> f64 {
        (step as u128 * self.batch_size as u128) as f64 / self.n as f64
    }

    /// The (cached) permutation of `epoch`.
    fn perm(&mut self, epoch: u64) -> &[usize] {
        let hit = matches!(&self.cache, Some((e, _)) if *e == epoch);
        if !hit {
            let mut v = match self.cache.take() {
                Some((_, v)) => v,
                None => Vec::with_capacity(self.n),
            };
            permutation_into(self.seed, epoch, self.n, &mut v);
            self.cache = Some((epoch, v));
        }
        &self.cache.as_ref().expect("cache just filled").1
    }
}

/// The shuffled order of `0..n` for `(seed, epoch)`; stable across rand versions.
pub fn permutation(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut v = Vec::with_capacity(n);
    permutation_into(seed, epoch, n, &mut v);
    v
}

fn permutation_into(seed: u64, epoch: u64, n: usize, v: &mut Vec<usize>) {
    v.clear();
    v.extend(0..n);
    let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, epoch));
    // Fisher-Yates: position i takes a uniform pick from 0..=i.
    for i in (1..n).rev() {
        let j = bounded(&mut rng, i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

/// One 64-bit seed from (seed, epoch), via SplitMix64's finalizer so nearby seeds and epochs
/// give unrelated streams.
fn mix(seed: u64, epoch: u64) -> u64 {
    splitmix64(seed ^ splitmix64(epoch.wrapping_add(0x6a09_e667_f3bc_c909)))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform integer in `0..s` (`s > 0`), unbiased: Lemire's multiply-shift with rejection.
/// Ours rather than `rand`'s `random_range`, whose algorithm rand does not promise to keep: the
/// shuffles and the augmentation (`augment`) must draw the same numbers in every version.
pub(crate) fn bounded(rng: &mut impl RngCore, s: u64) -> u64 {
    debug_assert!(s > 0);
    let mut m = rng.next_u64() as u128 * s as u128;
    if (m as u64) < s {
        let threshold = s.wrapping_neg() % s;
        while (m as u64) < threshold {
            m = rng.next_u64() as u128 * s as u128;
        }
    }
    (m >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_permutation(v: &[usize], n: usize) -> bool {
        let mut seen = vec![false; n];
        v.len() == n && v.iter().all(|&i| i < n && !std::mem::replace(&mut seen[i], true))
    }

    #[test]
    fn permutation_is_a_permutation() {
        for n in [0, 1, 2, 3, 10, 97, 1000] {
            for epoch in 0..3 {
                assert!(is_permutation(&permutation(7, epoch, n), n), "n={n} epoch={epoch}");
            }
        }
    }

    #[test]
    fn same_seed_same_order_different_seed_different_order() {
        assert_eq!(permutation(42, 3, 500), permutation(42, 3, 500));
        assert_ne!(permutation(42, 3, 500), permutation(43, 3, 500));
        assert_ne!(permutation(42, 3, 500), permutation(42, 4, 500));
        assert_ne!(permutation(0, 0, 500), permutation(0, 1, 500));
        assert_ne!(permutation(0, 1, 500), permutation(1, 0, 500));
    }

    /// Freezes the order: if this fails, runs are no longer reproducible across versions.
    #[test]
    fn permutation_is_pinned() {
        assert_eq!(permutation(42, 0, 10), PINNED_42_0);
        assert_eq!(permutation(0, 5, 10), PINNED_0_5);
    }
    const PINNED_42_0: [usize; 10] = [6, 2, 7, 1, 0, 5, 3, 9, 4, 8];
    const PINNED_0_5: [usize; 10] = [8, 1, 3, 0, 9, 2, 7, 4, 5, 6];

    #[test]
    fn bounded_is_roughly_uniform() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut counts = [0u32; 6];
        for _ in 0..60_000 {
            counts[bounded(&mut rng, 6) as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
        // A bound near 2^64 exercises the rejection path and stays in range.
        let s = u64::MAX - 3;
        for _ in 0..1000 {
            assert!(bounded(&mut rng, s) < s);
        }
    }

    #[test]
    fn no_shuffle_is_file_order() {
        let mut s = BatchSampler::new(7, 3, 99, false);
        assert_eq!(s.batch(0), vec![0, 1, 2]);
        assert_eq!(s.batch(1), vec![3, 4, 5]);
        assert_eq!(s.batch(2), vec![6, 0, 1]);
        assert_eq!(s.batch(3), vec![2, 3, 4]);
        let stream: Vec<usize> = (0..7).flat_map(|k| s.batch(k)).collect();
        let expect: Vec<usize> = (0..21).map(|i| i % 7).collect();
        assert_eq!(stream, expect);
    }

    /// Concatenating batches reproduces the stream of per-epoch permutations, and every epoch
    /// covers every index exactly once.
    fn check_coverage(n: usize, b: usize, shuffle: bool) {
        let mut s = BatchSampler::new(n, b, 1234, shuffle);
        let epochs = 4;
        let steps = (epochs * n).div_ceil(b) as u64;
        let stream: Vec<usize> = (0..steps).flat_map(|k| s.batch(k)).collect();
        for k in 0..steps {
            assert_eq!(s.batch(k).len(), b);
        }
        for e in 0..epochs {
            let chunk = &stream[e * n..(e + 1) * n];
            assert!(is_permutation(chunk, n), "n={n} b={b} epoch {e} not covered once");
            if shuffle {
                assert_eq!(chunk, permutation(1234, e as u64, n), "n={n} b={b} epoch {e}");
            }
        }
    }

    #[test]
    fn batches_cover_each_epoch_once_when_b_divides_n() {
        check_coverage(100, 10, true);
        check_coverage(100, 25, true);
        check_coverage(100, 10, false);
    }

    #[test]
    fn batches_cover_each_epoch_once_when_straddling() {
        check_coverage(100, 7, true);
        check_coverage(10, 3, true);
        check_coverage(37, 36, true);
        check_coverage(13, 5, false);
    }

    #[test]
    fn batch_does_not_depend_on_history() {
        let (n, b, seed) = (53, 8, 77);
        let mut seq = BatchSampler::new(n, b, seed, true);
        let sequential: Vec<Vec<usize>> = (0..40).map(|k| seq.batch(k)).collect();
        for k in 0..40u64 {
            let mut fresh = BatchSampler::new(n, b, seed, true);
            assert_eq!(fresh.batch(k), sequential[k as usize], "step {k}");
        }
        // Random access, backwards and jumping, on one sampler.
        let mut jumpy = BatchSampler::new(n, b, seed, true);
        for k in [39u64, 0, 17, 16, 38, 1, 25, 25, 2] {
            assert_eq!(jumpy.batch(k), sequential[k as usize], "step {k}");
        }
    }

    #[test]
    fn full_batch_is_one_epoch_per_step() {
        let n = 31;
        let mut s = BatchSampler::new(n, n, 5, true);
        for k in 0..5u64 {
            let b = s.batch(k);
            assert_eq!(b, permutation(5, k, n));
            assert!((s.epoch(k) - k as f64).abs() < 1e-12);
        }
        let mut s = BatchSampler::new(n, n, 5, false);
        assert_eq!(s.batch(3), (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn batch_larger_than_n_spans_epochs() {
        let n = 4;
        let mut s = BatchSampler::new(n, 10, 3, true);
        let b0 = s.batch(0);
        assert_eq!(b0.len(), 10);
        assert!(is_permutation(&b0[0..4], n));
        assert!(is_permutation(&b0[4..8], n));
        assert_eq!(b0[0..4], permutation(3, 0, n)[..]);
        assert_eq!(b0[4..8], permutation(3, 1, n)[..]);
        assert_eq!(b0[8..10], permutation(3, 2, n)[..2]);
        let b1 = s.batch(1);
        assert_eq!(b1[0..2], permutation(3, 2, n)[2..]);
        assert_eq!(s.epoch(1), 2.5);
        check_coverage(4, 10, true);
    }

    #[test]
    fn epoch_is_fractional() {
        let s = BatchSampler::new(100, 30, 0, true);
        assert_eq!(s.epoch(0), 0.0);
        assert_eq!(s.epoch(1), 0.3);
        assert_eq!(s.epoch(10), 3.0);
        // Huge steps do not overflow.
        assert!(s.epoch(u64::MAX).is_finite());
        let mut s = BatchSampler::new(100, 30, 0, true);
        assert_eq!(s.batch(u64::MAX).len(), 30);
    }
}
