//! Data: the IDX reader (MNIST-format files), the in-memory `Dataset`, and the deterministic
//! batch sampler whose batch for step n is a pure function of (seed, n).

pub mod idx;
pub mod mnist;
pub mod sampler;

/// An image-classification data set held in memory, already normalized.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// n × (C·H·W) pixels, row-major, normalized as `data.normalize` says.
    pub images: Vec<f32>,
    /// n labels in 0..num_classes.
    pub labels: Vec<u32>,
    /// (C, H, W) of one image, e.g. (1, 28, 28).
    pub image_shape: [usize; 3],
    pub num_classes: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Number of values per image, C·H·W.
    pub fn sample_dim(&self) -> usize {
        self.image_shape.iter().product()
    }
    /// The pixels of sample `i`.
    pub fn image(&self, i: usize) -> &[f32] {
        let d = self.sample_dim();
        &self.images[i * d..(i + 1) * d]
    }
    /// `n` images of N(0, 1) pixels with uniform random labels, reproducible from `seed`: a
    /// stand-in data set for tests of the model and gradient code.
    pub fn random(n: usize, image_shape: [usize; 3], num_classes: usize, seed: u64) -> Self {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let d: usize = image_shape.iter().product();
        Dataset {
            images: (0..n * d).map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal)).collect(),
            labels: (0..n).map(|_| rng.random_range(0..num_classes as u32)).collect(),
            image_shape,
            num_classes,
        }
    }
    /// Keep only the first `n` samples (`data.train_subset`).
    pub fn truncate(&mut self, n: usize) {
        if n < self.len() {
            let d = self.sample_dim();
            self.images.truncate(n * d);
            self.labels.truncate(n);
        }
    }
}
