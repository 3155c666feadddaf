//! Loads a directory in the MNIST layout (MNIST, Fashion-MNIST, KMNIST, …) into a pair of
//! in-memory `Dataset`s (train, test), normalized as the config's `data.normalize` asks.
//!
//! The directory holds the four standard IDX files, each either gzip-compressed (`.gz`, preferred
//! when both exist) or raw:
//! `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
//! `t10k-labels-idx1-ubyte`. Everything that can be wrong with them (missing, disagreeing
//! counts, labels out of range, train and test image sizes that differ) is an error naming the
//! file(s) at fault, checked here once so the training loop can index without further checks.

use std::path::{Path, PathBuf};

use super::{idx, Dataset};
use crate::error::{Error, Result};

/// Number of classes of every MNIST-format data set.
pub const NUM_CLASSES: usize = 10;

pub const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
pub const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
pub const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
pub const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";

pub use super::Normalize;

/// Loads `(train, test)` from an MNIST-format directory. See the module docs for the file names.
pub fn load_dir(dir: &Path, normalize: Normalize) -> Result<(Dataset, Dataset)> {
    if !dir.is_dir() {
        let what = if dir.exists() { "not a directory" } else { "directory not found" };
        return Err(Error::data(dir, format!("{what}; an MNIST-format directory holds {}", names_looked_for())));
    }
    let train_images_path = find(dir, TRAIN_IMAGES)?;
    let train_labels_path = find(dir, TRAIN_LABELS)?;
    let test_images_path = find(dir, TEST_IMAGES)?;
    let test_labels_path = find(dir, TEST_LABELS)?;

    let train = load_split(&train_images_path, &train_labels_path)?;
    let test = load_split(&test_images_path, &test_labels_path)?;
    if (train.images.rows, train.images.cols) != (test.images.rows, test.images.cols) {
        return Err(Error::data(
            &test_images_path,
            format!(
                "test images are {}×{} but the training images in {} are {}×{}: train and test \
                 image sizes must agree",
                test.images.rows,
                test.images.cols,
                train_images_path.display(),
                train.images.rows,
                train.images.cols
            ),
        ));
    }

    let shape = [1, train.images.rows, train.images.cols];
    let tables = super::normalization_tables(normalize, &train.images.pixels, shape, &train_images_path)?;
    Ok((train.into_dataset(&tables), test.into_dataset(&tables)))
}

/// The names looked for, for error messages.
fn names_looked_for() -> String {
    [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS]
        .iter()
        .map(|n| format!("{n}[.gz]"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `dir/base.gz` if it exists, else `dir/base`, else an error listing both names.
pub(crate) fn find(dir: &Path, base: &str) -> Result<PathBuf> {
    let gz = dir.join(format!("{base}.gz"));
    if gz.exists() {
        return Ok(gz);
    }
    let raw = dir.join(base);
    if raw.exists() {
        return Ok(raw);
    }
    Err(Error::data(
        raw,
        format!(
            "not found: looked for {base}.gz and {base} in {}; an MNIST-format directory holds {}",
            dir.display(),
            names_looked_for()
        ),
    ))
}

struct Split {
    images: idx::IdxImages,
    labels: Vec<u8>,
}

fn load_split(images_path: &Path, labels_path: &Path) -> Result<Split> {
    let images = idx::read_images(images_path)?;
    let labels = idx::read_labels(labels_path)?;
    if images.count != labels.len() {
        return Err(Error::data(
            images_path,
            format!(
                "image and label counts disagree: {} holds {} images but {} holds {} labels",
                images_path.display(),
                images.count,
                labels_path.display(),
                labels.len()
            ),
        ));
    }
    if let Some((i, &v)) = labels.iter().enumerate().find(|(_, &v)| v as usize >= NUM_CLASSES) {
        return Err(Error::data(labels_path, format!("label at index {i} is {v}, outside 0..{NUM_CLASSES}")));
    }
    Ok(Split { images, labels })
}

impl Split {
    fn into_dataset(self, tables: &[[f32; 256]]) -> Dataset {
        let shape = [1, self.images.rows, self.images.cols];
        let labels = self.labels.iter().map(|&l| l as u32).collect();
        Dataset::from_u8(self.images.pixels, tables.to_vec(), labels, shape, NUM_CLASSES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::idx::tests::{gzip, idx_bytes};
    use crate::data::idx::{IMAGES_MAGIC, LABELS_MAGIC};

    const FASHION: &str = "/usr/share/datasets/fashion-mnist";

    /// Writes a tiny MNIST-format directory: `n_train`/`n_test` images of `rows × cols`.
    fn write_dir(dir: &Path, n_train: u32, n_test: u32, rows: u32, cols: u32, gz: bool) {
        let write = |name: &str, bytes: Vec<u8>| {
            let (name, bytes) = if gz { (format!("{name}.gz"), gzip(&bytes)) } else { (name.to_string(), bytes) };
            std::fs::write(dir.join(name), bytes).unwrap();
        };
        let pix = |n: u32| -> Vec<u8> { (0..n * rows * cols).map(|i| (i * 37 % 256) as u8).collect() };
        let labs = |n: u32| -> Vec<u8> { (0..n).map(|i| (i % 10) as u8).collect() };
        write(TRAIN_IMAGES, idx_bytes(IMAGES_MAGIC, &[n_train, rows, cols], &pix(n_train)));
        write(TRAIN_LABELS, idx_bytes(LABELS_MAGIC, &[n_train], &labs(n_train)));
        write(TEST_IMAGES, idx_bytes(IMAGES_MAGIC, &[n_test, rows, cols], &pix(n_test)));
        write(TEST_LABELS, idx_bytes(LABELS_MAGIC, &[n_test], &labs(n_test)));
    }

    fn err_of<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.expect_err("expected an error").to_string()
    }

    #[test]
    fn normalize_serde_names() {
        assert_eq!(serde_json::to_string(&Normalize::Unit).unwrap(), "\"unit\"");
        assert_eq!(serde_json::to_string(&Normalize::Standardize).unwrap(), "\"standardize\"");
        let n: Normalize = serde_json::from_str("\"standardize\"").unwrap();
        assert_eq!(n, Normalize::Standardize);
        assert_eq!(Normalize::default(), Normalize::Unit);
    }

    #[test]
    fn loads_raw_and_gzip_dirs() {
        for gz in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            write_dir(dir.path(), 12, 5, 3, 4, gz);
            let (train, test) = load_dir(dir.path(), Normalize::Unit).unwrap();
            assert_eq!(train.len(), 12);
            assert_eq!(test.len(), 5);
            assert_eq!(train.image_shape, [1, 3, 4]);
            assert_eq!(test.image_shape, [1, 3, 4]);
            assert_eq!(train.num_classes, 10);
            assert_eq!(train.to_f32().len(), 12 * 12);
            assert_eq!(train.labels[..3], [0, 1, 2]);
            assert_eq!(train.to_f32()[1], 37.0 / 255.0);
            assert!(train.to_f32().iter().all(|&x| (0.0..=1.0).contains(&x)));
        }
    }

    #[test]
    fn prefers_gz_when_both_exist() {
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path(), 4, 2, 2, 2, true);
        // A raw train-images file that is broken: it must not be read.
        std::fs::write(dir.path().join(TRAIN_IMAGES), b"garbage").unwrap();
        let (train, _) = load_dir(dir.path(), Normalize::Unit).unwrap();
        assert_eq!(train.len(), 4);
    }

    #[test]
    fn standardize_uses_train_stats() {
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path(), 20, 7, 3, 3, false);
        let (train, test) = load_dir(dir.path(), Normalize::Standardize).unwrap();
        let n = train.to_f32().len() as f64;
        let mean = train.to_f32().iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = train.to_f32().iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 1e-5, "mean {mean}");
        assert!((var - 1.0).abs() < 1e-4, "var {var}");
        // The test set uses the same affine map: same pixel value, same output.
        let (utrain, utest) = load_dir(dir.path(), Normalize::Unit).unwrap();
        let a = (train.to_f32()[1] - train.to_f32()[0]) / (utrain.to_f32()[1] - utrain.to_f32()[0]);
        let b = (test.to_f32()[1] - test.to_f32()[0]) / (utest.to_f32()[1] - utest.to_f32()[0]);
        assert!((a - b).abs() < 1e-4 * a.abs());
    }

    #[test]
    fn constant_images_cannot_be_standardized() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::write(p.join(TRAIN_IMAGES), idx_bytes(IMAGES_MAGIC, &[2, 1, 2], &[7; 4])).unwrap();
        std::fs::write(p.join(TRAIN_LABELS), idx_bytes(LABELS_MAGIC, &[2], &[0, 1])).unwrap();
        std::fs::write(p.join(TEST_IMAGES), idx_bytes(IMAGES_MAGIC, &[1, 1, 2], &[7; 2])).unwrap();
        std::fs::write(p.join(TEST_LABELS), idx_bytes(LABELS_MAGIC, &[1], &[0])).unwrap();
        assert!(load_dir(p, Normalize::Unit).is_ok());
        let msg = err_of(load_dir(p, Normalize::Standardize));
        assert!(msg.contains(TRAIN_IMAGES) && msg.contains("standardize"), "{msg}");
    }

    #[test]
    fn missing_dir_lists_names() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-dir");
        let msg = err_of(load_dir(&missing, Normalize::Unit));
        assert!(msg.contains("no-such-dir") && msg.contains("not found"), "{msg}");
        for name in [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS] {
            assert!(msg.contains(name), "{msg}");
        }
    }

    #[test]
    fn missing_file_lists_names_looked_for() {
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path(), 4, 2, 2, 2, true);
        std::fs::remove_file(dir.path().join(format!("{TEST_LABELS}.gz"))).unwrap();
        let msg = err_of(load_dir(dir.path(), Normalize::Unit));
        assert!(msg.contains("not found"), "{msg}");
        assert!(msg.contains(&format!("{TEST_LABELS}.gz")), "{msg}");
        assert!(msg.contains(&dir.path().join(TEST_LABELS).display().to_string()), "{msg}");
    }

    #[test]
    fn counts_disagree() {
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path(), 6, 2, 2, 2, false);
        std::fs::write(dir.path().join(TRAIN_LABELS), idx_bytes(LABELS_MAGIC, &[5], &[0, 1, 2, 3, 4])).unwrap();
        let msg = err_of(load_dir(dir.path(), Normalize::Unit));
        assert!(msg.contains("counts disagree"), "{msg}");
        assert!(msg.contains(TRAIN_IMAGES) && msg.contains(TRAIN_LABELS), "{msg}");
        assert!(msg.contains("6 images") && msg.contains("5 labels"), "{msg}");
    }

    #[test]
    fn label_out_of_range() {
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path(), 4, 3, 2, 2, false);
        std::fs::write(dir.path().join(TEST_LABELS), idx_bytes(LABELS_MAGIC, &[3], &[0, 9, 10])).unwrap();
        let msg = err_of(load_dir(dir.path(), Normalize::Unit));
        assert!(msg.contains(TEST_LABELS), "{msg}");
        assert!(msg.contains("index 2") && msg.contains("10"), "{msg}");
    }

    #[test]
    fn train_and_test_sizes_must_agree() {
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path(), 4, 2, 2, 2, false);
        std::fs::write(dir.path().join(TEST_IMAGES), idx_bytes(IMAGES_MAGIC, &[2, 3, 2], &[0; 12])).unwrap();
        let msg = err_of(load_dir(dir.path(), Normalize::Unit));
        assert!(msg.contains(TEST_IMAGES) && msg.contains(TRAIN_IMAGES), "{msg}");
        assert!(msg.contains("must agree"), "{msg}");
    }

    #[test]
    fn idx_faults_propagate_with_file_name() {
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path(), 4, 2, 2, 2, false);
        // Labels where images belong.
        std::fs::copy(dir.path().join(TRAIN_LABELS), dir.path().join(TRAIN_IMAGES)).unwrap();
        let msg = err_of(load_dir(dir.path(), Normalize::Unit));
        assert!(msg.contains(TRAIN_IMAGES) && msg.contains("swapped"), "{msg}");
    }

    #[test]
    fn real_fashion_mnist_if_installed() {
        let dir = Path::new(FASHION);
        if !dir.join(format!("{TRAIN_IMAGES}.gz")).exists() && !dir.join(TRAIN_IMAGES).exists() {
            eprintln!("SKIPPED: real_fashion_mnist_if_installed: Fashion-MNIST not installed at {FASHION}");
            return;
        }
        let (train, test) = load_dir(dir, Normalize::Unit).unwrap();
        assert_eq!(train.len(), 60_000);
        assert_eq!(test.len(), 10_000);
        assert_eq!(train.image_shape, [1, 28, 28]);
        assert_eq!(test.image_shape, [1, 28, 28]);
        assert_eq!(train.num_classes, 10);
        assert_eq!(train.to_f32().len(), 60_000 * 784);
        assert!(train.to_f32().iter().chain(&test.to_f32()).all(|&x| (0.0..=1.0).contains(&x)));
        let mean = train.to_f32().iter().map(|&x| x as f64).sum::<f64>() / train.to_f32().len() as f64;
        assert!((mean - 0.286).abs() < 0.001, "train mean {mean}");
        // Balanced classes: 6000 of each in train, 1000 in test.
        let mut counts = [0usize; 10];
        for &l in &train.labels {
            counts[l as usize] += 1;
        }
        assert_eq!(counts, [6000; 10]);

        let (strain, _) = load_dir(dir, Normalize::Standardize).unwrap();
        let n = strain.to_f32().len() as f64;
        let smean = strain.to_f32().iter().map(|&x| x as f64).sum::<f64>() / n;
        let svar = strain.to_f32().iter().map(|&x| (x as f64 - smean).powi(2)).sum::<f64>() / n;
        assert!(smean.abs() < 1e-4, "standardized mean {smean}");
        assert!((svar - 1.0).abs() < 1e-3, "standardized var {svar}");
    }
}
