//! Data: the readers (IDX for MNIST-format files, the CIFAR-10/100 binary files), the in-memory
//! `Dataset` (images kept as bytes and normalised when a batch is gathered), the deterministic
//! augmentation, and the batch sampler whose batch for step n is a pure function of (seed, n).

pub mod augment;
pub mod cifar;
pub mod idx;
pub mod mnist;
pub mod sampler;

use std::path::{Path, PathBuf};

use augment::Augment;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `data.format`: which files `data.dir` holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// MNIST-format IDX files (MNIST, Fashion-MNIST): train-images-idx3-ubyte[.gz], …
    #[default]
    Idx,
    /// CIFAR-10's binary files: data_batch_1.bin … data_batch_5.bin, test_batch.bin.
    Cifar10,
    /// CIFAR-100's binary files: train.bin, test.bin (fine labels; `data.coarse_labels` for the
    /// 20 superclasses).
    Cifar100,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `idx` (default), `cifar10` or `cifar100`.
    pub format: DataFormat,
    /// The directory with the data set's files (for CIFAR also its parent, holding
    /// `cifar-10-batches-bin/` or `cifar-100-binary/`).
    pub dir: PathBuf,
    /// Use only the first N training samples.
    pub train_subset: Option<usize>,
    /// Shuffle with a permutation drawn from (seed, epoch); false keeps file order.
    pub shuffle: bool,
    /// `unit`: pixels/255 in [0, 1]. `standardize`: then minus the training mean, over its std,
    /// per channel. Default: unit for IDX, standardize for CIFAR.
    pub normalize: Option<Normalize>,
    /// Training augmentation: `none` or `crop-flip` (pad 4, random crop, horizontal flip: the
    /// standard CIFAR recipe), drawn from (seed, step, sample index).
    pub augment: Augment,
    /// CIFAR-100: train on the 20 coarse labels instead of the 100 fine ones.
    pub coarse_labels: bool,
}

impl DataConfig {
    /// (C, H, W) and the number of classes of the format's images (the IDX files' own size is
    /// read from their headers; this is MNIST's 28×28).
    pub fn image_shape_and_classes(&self) -> ([usize; 3], usize) {
        match self.format {
            DataFormat::Idx => ([1, 28, 28], 10),
            DataFormat::Cifar10 => (cifar::IMAGE_SHAPE, 10),
            DataFormat::Cifar100 => (cifar::IMAGE_SHAPE, if self.coarse_labels { 20 } else { 100 }),
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            format: DataFormat::Idx,
            dir: PathBuf::from("/usr/share/datasets/fashion-mnist"),
            train_subset: None,
            shuffle: true,
            normalize: None,
            augment: Augment::None,
            coarse_labels: false,
        }
    }
}

/// The training and test sets `data` names (`data.format`, `data.dir`, `data.normalize`), images
/// kept as bytes. `data.train_subset` is the caller's (`train::load_data`).
pub fn load(data: &DataConfig) -> Result<(Dataset, Dataset)> {
    let normalize = data.normalize.unwrap_or_default();
    let kind = match data.format {
        DataFormat::Idx => return mnist::load_dir(&data.dir, normalize),
        DataFormat::Cifar10 => cifar::CifarKind::Cifar10,
        DataFormat::Cifar100 => cifar::CifarKind::Cifar100 { coarse: data.coarse_labels },
    };
    let (train, test) = cifar::load_dir(&data.dir, kind)?;
    let folder = cifar::locate(&data.dir, kind)?;
    let tables = normalization_tables(normalize, &train.pixels, train.image_shape, &folder)?;
    let to_dataset = |raw: cifar::RawImages| {
        Dataset::from_u8(raw.pixels, tables.clone(), raw.labels, raw.image_shape, raw.num_classes)
    };
    Ok((to_dataset(train), to_dataset(test)))
}

/// How raw pixels (0..=255) become the `f32` values the model sees (`data.normalize`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Normalize {
    /// `pixel / 255`, in [0, 1]. The default for IDX files.
    #[default]
    Unit,
    /// `(pixel / 255 − mean_c) / std_c`, with the mean and the (population) standard deviation
    /// of channel c over every training image as loaded (before any `data.train_subset`
    /// truncation). The same numbers are applied to the test set (no statistics are taken from
    /// test data). The default for CIFAR.
    Standardize,
}

/// Per channel, the f32 value of each byte: `Normalize` as a lookup table, so that normalising
/// is one table read per pixel when a batch is gathered. `pixels` are the training images, CHW
/// per image of `image_shape`; `what` names them for the error of a constant channel.
pub fn normalization_tables(
    normalize: Normalize,
    pixels: &[u8],
    image_shape: [usize; 3],
    what: &Path,
) -> Result<Vec<[f32; 256]>> {
    let [channels, h, w] = image_shape;
    let plane = h * w;
    let mut tables = Vec::with_capacity(channels);
    for c in 0..channels {
        let mut lut = [0f32; 256];
        match normalize {
            Normalize::Unit => {
                for (v, out) in lut.iter_mut().enumerate() {
                    *out = v as f32 / 255.0;
                }
            }
            Normalize::Standardize => {
                let mut hist = [0u64; 256];
                for image in pixels.chunks_exact(channels * plane) {
                    for &p in &image[c * plane..(c + 1) * plane] {
                        hist[p as usize] += 1;
                    }
                }
                let (mean, std) = histogram_stats(&hist);
                if std.is_nan() || std <= 1e-12 {
                    return Err(Error::data(
                        what,
                        format!(
                            "cannot standardize: every training pixel{} has the same value (mean {mean}, std {std})",
                            if channels > 1 { format!(" of channel {c}") } else { String::new() }
                        ),
                    ));
                }
                for (v, out) in lut.iter_mut().enumerate() {
                    *out = ((v as f64 / 255.0 - mean) / std) as f32;
                }
            }
        }
        tables.push(lut);
    }
    Ok(tables)
}

/// Mean and population standard deviation of `pixel / 255` from a histogram of pixel values:
/// exact, no accumulation error from summing tens of millions of floats.
fn histogram_stats(hist: &[u64; 256]) -> (f64, f64) {
    let n = hist.iter().sum::<u64>() as f64;
    let mean = hist.iter().enumerate().map(|(v, &c)| c as f64 * (v as f64 / 255.0)).sum::<f64>() / n;
    let var = hist
        .iter()
        .enumerate()
        .map(|(v, &c)| {
            let d = v as f64 / 255.0 - mean;
            c as f64 * d * d
        })
        .sum::<f64>()
        / n;
    (mean, var.sqrt())
}

/// Where the pixels of a `Dataset` live.
#[derive(Clone, Debug)]
pub enum Pixels {
    /// Values as the model sees them (generated test data).
    F32(Vec<f32>),
    /// Bytes as read from the files, n × C × H × W, and per channel the f32 value of each byte
    /// (`normalization_tables`): a quarter of the memory of f32 images, normalised per batch.
    U8 { bytes: Vec<u8>, tables: Vec<[f32; 256]> },
}

/// An image-classification data set held in memory.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub pixels: Pixels,
    /// n labels in 0..num_classes.
    pub labels: Vec<u32>,
    /// (C, H, W) of one image, e.g. (1, 28, 28).
    pub image_shape: [usize; 3],
    pub num_classes: usize,
}

impl Dataset {
    /// A data set of f32 images (n × C·H·W values, row-major), taken as the model sees them.
    pub fn from_f32(images: Vec<f32>, labels: Vec<u32>, image_shape: [usize; 3], num_classes: usize) -> Self {
        Self { pixels: Pixels::F32(images), labels, image_shape, num_classes }
    }

    /// A data set of byte images (n × C × H × W) normalised through per-channel `tables`.
    pub fn from_u8(
        bytes: Vec<u8>,
        tables: Vec<[f32; 256]>,
        labels: Vec<u32>,
        image_shape: [usize; 3],
        num_classes: usize,
    ) -> Self {
        Self { pixels: Pixels::U8 { bytes, tables }, labels, image_shape, num_classes }
    }

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

    /// Pixel values stored (bytes or floats) against what `len` and `image_shape` need; an
    /// error message when they disagree.
    pub fn check(&self) -> std::result::Result<(), String> {
        let (stored, tables) = match &self.pixels {
            Pixels::F32(v) => (v.len(), self.image_shape[0]),
            Pixels::U8 { bytes, tables } => (bytes.len(), tables.len()),
        };
        let d = self.sample_dim();
        if stored != self.len() * d {
            return Err(format!("the data set has {} labels but {stored} pixel values for {d} per image", self.len()));
        }
        if tables != self.image_shape[0] {
            return Err(format!("{tables} normalisation tables for {} channels", self.image_shape[0]));
        }
        Ok(())
    }

    /// Write the normalised pixels of sample `i` into `out` (C·H·W values).
    pub fn write_image(&self, i: usize, out: &mut [f32]) {
        let d = self.sample_dim();
        match &self.pixels {
            Pixels::F32(v) => out.copy_from_slice(&v[i * d..(i + 1) * d]),
            Pixels::U8 { bytes, tables } => normalize_into(&bytes[i * d..(i + 1) * d], tables, out),
        }
    }

    /// Write sample `i` as training step `step` sees it: augmented by `augment` (drawn from
    /// (seed, step, i)), then normalised. `scratch` holds the augmented bytes. Augmentation needs
    /// byte images; f32 images are written as they are.
    pub fn write_training_image(
        &self,
        i: usize,
        augment: Augment,
        seed: u64,
        step: u64,
        scratch: &mut Vec<u8>,
        out: &mut [f32],
    ) {
        match (&self.pixels, augment) {
            (Pixels::U8 { bytes, tables }, Augment::CropFlip) => {
                let d = self.sample_dim();
                scratch.resize(d, 0);
                augment::crop_flip(
                    &bytes[i * d..(i + 1) * d],
                    self.image_shape,
                    augment::CIFAR_PAD,
                    seed,
                    step,
                    i as u64,
                    scratch,
                );
                normalize_into(scratch, tables, out);
            }
            _ => self.write_image(i, out),
        }
    }

    /// The normalised pixels of samples `range`, appended to `out`.
    pub fn extend_images(&self, range: std::ops::Range<usize>, out: &mut Vec<f32>) {
        let d = self.sample_dim();
        let start = out.len();
        out.resize(start + range.len() * d, 0.0);
        for (k, i) in range.enumerate() {
            self.write_image(i, &mut out[start + k * d..start + (k + 1) * d]);
        }
    }

    /// Every image normalised, n × C·H·W (tests and small data sets).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::new();
        self.extend_images(0..self.len(), &mut out);
        out
    }

    /// Bytes this data set holds in memory (pixels and labels).
    pub fn resident_bytes(&self) -> u64 {
        let pixels = match &self.pixels {
            Pixels::F32(v) => v.len() * 4,
            Pixels::U8 { bytes, tables } => bytes.len() + tables.len() * 256 * 4,
        };
        (pixels + self.labels.len() * 4) as u64
    }

    /// The samples `range`, copied (a rank's share of the test set).
    pub fn slice(&self, range: std::ops::Range<usize>) -> Dataset {
        let d = self.sample_dim();
        let pixels = match &self.pixels {
            Pixels::F32(v) => Pixels::F32(v[range.start * d..range.end * d].to_vec()),
            Pixels::U8 { bytes, tables } => {
                Pixels::U8 { bytes: bytes[range.start * d..range.end * d].to_vec(), tables: tables.clone() }
            }
        };
        Dataset {
            pixels,
            labels: self.labels[range].to_vec(),
            image_shape: self.image_shape,
            num_classes: self.num_classes,
        }
    }

    /// `n` images of N(0, 1) pixels with uniform random labels, reproducible from `seed`: a
    /// stand-in data set for tests of the model and gradient code.
    pub fn random(n: usize, image_shape: [usize; 3], num_classes: usize, seed: u64) -> Self {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let d: usize = image_shape.iter().product();
        let images = (0..n * d).map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal)).collect();
        let labels = (0..n).map(|_| rng.random_range(0..num_classes as u32)).collect();
        Dataset::from_f32(images, labels, image_shape, num_classes)
    }

    /// Keep only the first `n` samples (`data.train_subset`).
    pub fn truncate(&mut self, n: usize) {
        if n < self.len() {
            let d = self.sample_dim();
            match &mut self.pixels {
                Pixels::F32(v) => v.truncate(n * d),
                Pixels::U8 { bytes, .. } => bytes.truncate(n * d),
            }
            self.labels.truncate(n);
        }
    }
}

/// One image's bytes (CHW) through its channels' tables.
fn normalize_into(bytes: &[u8], tables: &[[f32; 256]], out: &mut [f32]) {
    let plane = bytes.len() / tables.len().max(1);
    for ((src, dst), table) in bytes.chunks(plane).zip(out.chunks_mut(plane)).zip(tables) {
        for (o, &b) in dst.iter_mut().zip(src) {
            *o = table[b as usize];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_images_normalise_per_channel_and_slice() {
        // Two 2×1×2 images: channel 0 then channel 1.
        let bytes = vec![0u8, 255, 10, 20, 255, 0, 30, 40];
        let tables = normalization_tables(Normalize::Standardize, &bytes, [2, 1, 2], Path::new("x")).unwrap();
        let d = Dataset::from_u8(bytes.clone(), tables, vec![0, 1], [2, 1, 2], 2);
        d.check().unwrap();
        let v = d.to_f32();
        // Channel 0 holds 0, 255, 255, 0: mean 0.5, std 0.5 → ±1.
        assert_eq!([v[0], v[1], v[4], v[5]], [-1.0, 1.0, 1.0, -1.0]);
        // Channel 1 holds 10, 20, 30, 40.
        let c1: Vec<f64> = [v[2], v[3], v[6], v[7]].iter().map(|&x| x as f64).collect();
        let mean = c1.iter().sum::<f64>() / 4.0;
        let var = c1.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5, "{mean} {var}");
        let s = d.slice(1..2);
        assert_eq!(s.to_f32(), v[4..].to_vec());
        assert_eq!(s.labels, [1]);
        let unit = normalization_tables(Normalize::Unit, &bytes, [2, 1, 2], Path::new("x")).unwrap();
        assert_eq!(Dataset::from_u8(bytes, unit, vec![0, 1], [2, 1, 2], 2).to_f32()[1], 1.0);
        let flat = vec![7u8; 8];
        let err =
            normalization_tables(Normalize::Standardize, &flat, [2, 1, 2], Path::new("f")).unwrap_err().to_string();
        assert!(err.contains("channel 0") && err.contains("f"), "{err}");
    }
}
