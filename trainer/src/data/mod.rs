//! Data: the readers (IDX for MNIST-format files, the CIFAR-10/100 binary files, Downsampled
//! ImageNet's npz files, ImageNet-style image folders), the `Dataset` (images kept as bytes and
//! normalised when a batch is gathered — or, for image folders, only the file list, decoded on
//! demand by a prefetching pool), the deterministic augmentation, and the batch sampler whose
//! batch for step n is a pure function of (seed, n).

pub mod augment;
pub mod cifar;
pub mod idx;
pub mod imagefolder;
pub mod imagenet64;
pub mod mnist;
pub mod prefetch;
pub mod sampler;
pub mod transform;

use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    /// torchvision's ImageFolder layout: train/<class>/*.{jpg,jpeg,png}, val/<class>/…, decoded
    /// on demand (`imagefolder.rs`).
    Imagefolder,
    /// Downsampled ImageNet 32×32 or 64×64: train_data_batch_{1..10}.npz, val_data.npz
    /// (`imagenet64.rs`).
    Imagenet64,
}

/// `data.image_size`'s default for image folders.
pub const DEFAULT_IMAGE_SIZE: usize = 224;
/// `data.prefetch_mib`'s default.
pub const DEFAULT_PREFETCH_MIB: usize = 512;

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
    /// Evaluate on the first N test samples only (all when absent): for timing studies, where
    /// evaluating the whole test set would cost more than the steps being timed.
    pub test_subset: Option<usize>,
    /// Shuffle with a permutation drawn from (seed, epoch); false keeps file order.
    pub shuffle: bool,
    /// `unit`: pixels/255 in [0, 1]. `standardize`: then minus the training mean, over its std,
    /// per channel. `imagenet`: minus ImageNet's mean (0.485, 0.456, 0.406), over its std (0.229,
    /// 0.224, 0.225). Default: unit for IDX, standardize for CIFAR, imagenet for imagefolder and
    /// imagenet64 (standardize is not available for image folders: it would decode every image).
    pub normalize: Option<Normalize>,
    /// Training augmentation: `none`, `crop-flip` (pad 4, random crop, horizontal flip: the
    /// standard CIFAR recipe) or `rrc-flip` (RandomResizedCrop + flip: the ImageNet recipe), drawn
    /// from (seed, step, sample index).
    pub augment: Augment,
    /// CIFAR-100: train on the 20 coarse labels instead of the 100 fine ones.
    pub coarse_labels: bool,
    /// Side of the square images the model sees. imagefolder: any (default 224; evaluation
    /// resizes to ⌊size/0.875⌋ and centre-crops). imagenet64: the files' 32 or 64 (checked).
    /// idx/cifar: only their native size.
    pub image_size: Option<usize>,
    /// imagefolder: decode threads (training prefetch and evaluation); 0 = the cores this
    /// process may use divided by the ranks on this node.
    pub workers: usize,
    /// imagefolder: the prefetch cache's budget in MiB (how many steps ahead the workers decode:
    /// as many as fit, at least 1).
    pub prefetch_mib: usize,
}

impl DataConfig {
    /// (C, H, W) and the number of classes of the format's images (the IDX files' own size is
    /// read from their headers; this is MNIST's 28×28).
    pub fn image_shape_and_classes(&self) -> ([usize; 3], usize) {
        match self.format {
            DataFormat::Idx => ([1, 28, 28], 10),
            DataFormat::Cifar10 => (cifar::IMAGE_SHAPE, 10),
            DataFormat::Cifar100 => (cifar::IMAGE_SHAPE, if self.coarse_labels { 20 } else { 100 }),
            DataFormat::Imagefolder => {
                let s = self.image_size.unwrap_or(DEFAULT_IMAGE_SIZE);
                ([3, s, s], 1000)
            }
            DataFormat::Imagenet64 => {
                let s = self.image_size.unwrap_or(64);
                ([3, s, s], imagenet64::NUM_CLASSES)
            }
        }
    }

    /// The native image side of the in-memory formats whose size is fixed (None: any or read
    /// from the files).
    pub fn native_size(&self) -> Option<usize> {
        match self.format {
            DataFormat::Idx => Some(28),
            DataFormat::Cifar10 | DataFormat::Cifar100 => Some(32),
            DataFormat::Imagefolder | DataFormat::Imagenet64 => None,
        }
    }

    /// `data.normalize` when not given: unit for IDX, standardize for CIFAR, ImageNet's
    /// constants for the ImageNet formats.
    pub fn default_normalize(&self) -> Normalize {
        match self.format {
            DataFormat::Idx => Normalize::Unit,
            DataFormat::Cifar10 | DataFormat::Cifar100 => Normalize::Standardize,
            DataFormat::Imagefolder | DataFormat::Imagenet64 => Normalize::Imagenet,
        }
    }

    /// Decode threads: `workers`, or when 0 the CPUs this process may use divided by the ranks
    /// of the job on this node (as the compute threads' default, `threads::decide`), at least 1.
    pub fn worker_threads(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
        let local = crate::threads::LOCAL_RANKS_VARS
            .iter()
            .find_map(|v| std::env::var(v).ok().and_then(|s| s.trim().parse::<usize>().ok()).filter(|&n| n > 0))
            .unwrap_or(1);
        (allowed / local).max(1)
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            format: DataFormat::Idx,
            dir: PathBuf::from("/usr/share/datasets/fashion-mnist"),
            train_subset: None,
            test_subset: None,
            shuffle: true,
            normalize: None,
            augment: Augment::None,
            coarse_labels: false,
            image_size: None,
            workers: 0,
            prefetch_mib: DEFAULT_PREFETCH_MIB,
        }
    }
}

/// The training and test sets `data` names (`data.format`, `data.dir`, `data.normalize`), images
/// kept as bytes. `data.train_subset` is the caller's (`train::load_data`).
pub fn load(data: &DataConfig) -> Result<(Dataset, Dataset)> {
    let normalize = data.normalize.unwrap_or(data.default_normalize());
    let kind = match data.format {
        DataFormat::Idx => return mnist::load_dir(&data.dir, normalize),
        DataFormat::Cifar10 => cifar::CifarKind::Cifar10,
        DataFormat::Cifar100 => cifar::CifarKind::Cifar100 { coarse: data.coarse_labels },
        DataFormat::Imagefolder => return load_folder(data, normalize),
        DataFormat::Imagenet64 => return load_imagenet64(data, normalize),
    };
    let (train, test) = cifar::load_dir(&data.dir, kind)?;
    let folder = cifar::locate(&data.dir, kind)?;
    let tables = normalization_tables(normalize, &train.pixels, train.image_shape, &folder)?;
    let to_dataset = |raw: cifar::RawImages| {
        Dataset::from_u8(raw.pixels, tables.clone(), raw.labels, raw.image_shape, raw.num_classes)
    };
    Ok((to_dataset(train), to_dataset(test)))
}

/// `data.format = "imagefolder"`: the file lists (checked) and the decoders' settings.
fn load_folder(data: &DataConfig, normalize: Normalize) -> Result<(Dataset, Dataset)> {
    let size = data.image_size.unwrap_or(DEFAULT_IMAGE_SIZE);
    if normalize == Normalize::Standardize {
        return Err(Error::config(
            "data.normalize",
            "\"standardize\" needs a pass over every training image, too slow for an image folder; use \"imagenet\" (the default) or \"unit\"",
        ));
    }
    let (classes, train, val) = imagefolder::scan(&data.dir)?;
    let tables = normalization_tables(normalize, &[], [3, size, size], &data.dir)?;
    let workers = data.worker_threads();
    let budget = data.prefetch_mib.saturating_mul(1 << 20);
    // Only the training set prefetches (and counts its budget in `resident_bytes`).
    let make = |l: imagefolder::Listing, budget: usize| Dataset {
        pixels: Pixels::Folder {
            folder: Arc::new(imagefolder::Folder::new(l.files, size, workers, budget)),
            tables: tables.clone(),
        },
        labels: l.labels,
        image_shape: [3, size, size],
        num_classes: classes.len(),
    };
    Ok((make(train, budget), make(val, 0)))
}

/// `data.format = "imagenet64"`: the npz files, held as bytes.
fn load_imagenet64(data: &DataConfig, normalize: Normalize) -> Result<(Dataset, Dataset)> {
    let (train, val) = imagenet64::load_dir(&data.dir)?;
    let s = train.size;
    if let Some(want) = data.image_size.filter(|&w| w != s) {
        return Err(Error::config(
            "data.image_size",
            format!("{want}, but the files in {} hold {s}×{s} images", data.dir.display()),
        ));
    }
    let shape = [3, s, s];
    let tables = normalization_tables(normalize, &train.pixels, shape, &data.dir)?;
    let k = imagenet64::NUM_CLASSES;
    Ok((
        Dataset::from_u8(train.pixels, tables.clone(), train.labels, shape, k),
        Dataset::from_u8(val.pixels, tables, val.labels, shape, k),
    ))
}

/// ImageNet's per-channel mean and standard deviation of pixel/255 (torchvision, timm).
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

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
    /// `(pixel / 255 − mean_c) / std_c` with ImageNet's constants ([`IMAGENET_MEAN`],
    /// [`IMAGENET_STD`]; three channels). The default for imagefolder and imagenet64.
    Imagenet,
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
            Normalize::Imagenet => {
                if channels != 3 {
                    return Err(Error::config(
                        "data.normalize",
                        format!("\"imagenet\" is for RGB images, but {} has {channels} channel(s)", what.display()),
                    ));
                }
                for (v, out) in lut.iter_mut().enumerate() {
                    *out = ((v as f64 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]) as f32;
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
    /// Image files decoded on demand to C × H × W bytes (`imagefolder::Folder`), then through the
    /// tables as `U8`. Clones share the folder (and its prefetcher).
    Folder { folder: Arc<imagefolder::Folder>, tables: Vec<[f32; 256]> },
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
            Pixels::Folder { folder, tables } => (folder.len() * self.sample_dim(), tables.len()),
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

    /// Write the normalised pixels of sample `i` into `out` (C·H·W values), as evaluation sees
    /// it. Only an image file that cannot be read or decoded fails (the message names it).
    pub fn write_image(&self, i: usize, out: &mut [f32]) -> std::result::Result<(), String> {
        let d = self.sample_dim();
        match &self.pixels {
            Pixels::F32(v) => out.copy_from_slice(&v[i * d..(i + 1) * d]),
            Pixels::U8 { bytes, tables } => normalize_into(&bytes[i * d..(i + 1) * d], tables, out),
            Pixels::Folder { folder, tables } => {
                let mut bytes = vec![0u8; d];
                folder.eval_image(i, &mut Vec::new(), &mut bytes)?;
                normalize_into(&bytes, tables, out);
            }
        }
        Ok(())
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
    ) -> std::result::Result<(), String> {
        let d = self.sample_dim();
        match (&self.pixels, augment) {
            (Pixels::U8 { bytes, tables }, Augment::CropFlip) => {
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
            (Pixels::U8 { bytes, tables }, Augment::RrcFlip) => {
                let [c, h, w] = self.image_shape;
                let mut img = vec![0u8; d];
                let src = transform::Src::chw(&bytes[i * d..(i + 1) * d], c, h, w);
                let (crop, flip) = transform::rrc_choice(w, h, seed, step, i as u64);
                transform::resample(src, crop, (w, h), (0, 0, h, w), flip, scratch, &mut img);
                normalize_into(&img, tables, out);
            }
            (Pixels::Folder { folder, tables }, _) => {
                scratch.resize(d, 0);
                folder.training_image(i, augment, seed, step, &mut Vec::new(), scratch)?;
                normalize_into(scratch, tables, out);
            }
            _ => self.write_image(i, out)?,
        }
        Ok(())
    }

    /// The training images of `indices` at `step` into `out` (one C·H·W row each): image folders
    /// take them from the prefetcher when one runs, or decode them on their worker threads.
    pub fn write_training_batch(
        &self,
        indices: &[usize],
        augment: Augment,
        seed: u64,
        step: u64,
        out: &mut [f32],
    ) -> std::result::Result<(), String> {
        let d = self.sample_dim();
        if let Pixels::Folder { folder, tables } = &self.pixels {
            let mut put = |pos: usize, bytes: &[u8]| normalize_into(bytes, tables, &mut out[pos * d..(pos + 1) * d]);
            return folder.training_batch(indices, augment, seed, step, &mut put);
        }
        let mut scratch = Vec::new();
        for (row, &i) in out.chunks_exact_mut(d).zip(indices) {
            self.write_training_image(i, augment, seed, step, &mut scratch, row)?;
        }
        Ok(())
    }

    /// Start prefetching the training images of steps `start..end` (`plan`: this rank's indices
    /// of a step) on the folder's worker threads; None for in-memory data sets. Prefetching
    /// stops when the returned guard is dropped.
    pub fn start_prefetch(
        &self,
        plan: prefetch::Plan,
        start: u64,
        end: u64,
        augment: Augment,
        seed: u64,
    ) -> Option<PrefetchGuard> {
        match &self.pixels {
            Pixels::Folder { folder, .. } => Some(PrefetchGuard {
                prefetcher: Some(folder.start_prefetch(plan, start, end, augment, seed)),
                folder: folder.clone(),
            }),
            _ => None,
        }
    }

    /// The normalised pixels of samples `range`, appended to `out` (image folders decode them on
    /// their worker threads). An error names an image file that cannot be decoded.
    pub fn extend_images(&self, range: std::ops::Range<usize>, out: &mut Vec<f32>) -> std::result::Result<(), String> {
        let d = self.sample_dim();
        let start = out.len();
        out.resize(start + range.len() * d, 0.0);
        let rows = &mut out[start..];
        if let Pixels::Folder { folder, tables } = &self.pixels {
            let indices: Vec<usize> = range.collect();
            let mut put = |pos: usize, bytes: &[u8]| normalize_into(bytes, tables, &mut rows[pos * d..(pos + 1) * d]);
            return folder.eval_batch(&indices, &mut put);
        }
        for (row, i) in rows.chunks_exact_mut(d.max(1)).zip(range) {
            self.write_image(i, row)?;
        }
        Ok(())
    }

    /// Every image normalised, n × C·H·W (tests and small data sets).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::new();
        self.extend_images(0..self.len(), &mut out).unwrap_or_else(|e| panic!("to_f32: {e}"));
        out
    }

    /// Bytes this data set holds in memory (pixels and labels).
    pub fn resident_bytes(&self) -> u64 {
        let pixels = match &self.pixels {
            Pixels::F32(v) => v.len() * 4,
            Pixels::U8 { bytes, tables } => bytes.len() + tables.len() * 256 * 4,
            // The paths, and the prefetch cache at its budget.
            Pixels::Folder { folder, tables } => {
                (0..folder.len()).map(|i| folder.file(i).as_os_str().len() + 24).sum::<usize>()
                    + folder.prefetch_bytes
                    + tables.len() * 256 * 4
            }
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
            Pixels::Folder { folder, tables } => {
                Pixels::Folder { folder: Arc::new(folder.slice(range.clone())), tables: tables.clone() }
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
                Pixels::Folder { folder, .. } => *folder = Arc::new(folder.slice(0..n)),
            }
            self.labels.truncate(n);
        }
    }
}

/// The running prefetcher of an image folder (`Dataset::start_prefetch`); dropping it stops the
/// workers, and gathering falls back to decoding on demand.
pub struct PrefetchGuard {
    prefetcher: Option<prefetch::Prefetcher>,
    folder: Arc<imagefolder::Folder>,
}

impl PrefetchGuard {
    /// (samples gathered from the workers' cache, samples decoded when gathered).
    pub fn hits_and_misses(&self) -> (u64, u64) {
        self.prefetcher.as_ref().map_or((0, 0), |p| p.hits_and_misses())
    }
}

impl Drop for PrefetchGuard {
    fn drop(&mut self) {
        self.folder.stop_prefetch();
        let (hits, misses) = self.hits_and_misses();
        tracing::debug!("image decoding: {hits} samples taken from the prefetch cache, {misses} decoded when gathered");
        self.prefetcher.take();
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
