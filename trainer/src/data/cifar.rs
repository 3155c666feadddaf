//! Readers for CIFAR-10 and CIFAR-100 in Krizhevsky's "binary version": fixed-size records, no
//! header, so a file's size alone says how many images it holds.
//!
//! - CIFAR-10 (`cifar-10-batches-bin/`): `data_batch_1.bin` … `data_batch_5.bin` (training, in
//!   that order) and `test_batch.bin`. A record is 1 label byte (0..=9) and 3072 pixel bytes,
//!   3073 bytes in all.
//! - CIFAR-100 (`cifar-100-binary/`): `train.bin` and `test.bin`. A record is 1 coarse label byte
//!   (0..=19), 1 fine label byte (0..=99) and 3072 pixel bytes, 3074 bytes in all.
//!
//! The 3072 pixel bytes of a record are one 3 × 32 × 32 image, channel-major as the model wants
//! it (CHW): the 1024 red values, then the green, then the blue, each plane row-major. Images are
//! kept as bytes ([`RawImages`]) so that augmentation (`data::augment`) can work on them before
//! normalization, and so that the training set takes a quarter of the memory of `f32`s.
//!
//! The directory a user names may be the folder holding the `.bin` files or its parent (the
//! folder the archive was unpacked into); [`locate`] accepts both. Data files are user input, so
//! every fault (missing folder or file, a size that is not a positive multiple of the record
//! size, a label out of range) is an `Err` naming the file and the fault, never a panic. Sizes are
//! checked from the file's metadata before anything is allocated, and the allocation itself is
//! fallible, so a huge stray file gives an error rather than an abort.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// (C, H, W) of every CIFAR image.
pub const IMAGE_SHAPE: [usize; 3] = [3, 32, 32];
/// Bytes of pixels per record, C·H·W.
pub const IMAGE_BYTES: usize = 3 * 32 * 32;

/// The CIFAR-10 training batches, concatenated in this order to form the training set.
pub const CIFAR10_TRAIN_FILES: [&str; 5] =
    ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"];
pub const CIFAR10_TEST_FILE: &str = "test_batch.bin";
pub const CIFAR100_TRAIN_FILE: &str = "train.bin";
pub const CIFAR100_TEST_FILE: &str = "test.bin";

/// Which of the two data sets, and for CIFAR-100 which of its two labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CifarKind {
    /// 10 classes, one label byte per record.
    Cifar10,
    /// Two label bytes per record: `coarse = false` takes the fine label (100 classes, the usual
    /// benchmark), `coarse = true` the superclass (20 classes).
    Cifar100 { coarse: bool },
}

impl CifarKind {
    /// Number of classes of the label this kind reads: 10, 100 (fine) or 20 (coarse).
    pub fn num_classes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 10,
            CifarKind::Cifar100 { coarse: false } => 100,
            CifarKind::Cifar100 { coarse: true } => 20,
        }
    }

    /// A human-readable name for messages and logs.
    pub fn name(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "CIFAR-10",
            CifarKind::Cifar100 { coarse: false } => "CIFAR-100",
            CifarKind::Cifar100 { coarse: true } => "CIFAR-100 (coarse labels)",
        }
    }

    /// The folder the official archive unpacks into.
    pub fn folder_name(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "cifar-10-batches-bin",
            CifarKind::Cifar100 { .. } => "cifar-100-binary",
        }
    }

    /// Bytes per record: the label bytes and the pixels.
    pub fn record_bytes(self) -> usize {
        self.label_bytes() + IMAGE_BYTES
    }

    /// The training files, in the order they are concatenated.
    pub fn train_files(self) -> &'static [&'static str] {
        match self {
            CifarKind::Cifar10 => &CIFAR10_TRAIN_FILES,
            CifarKind::Cifar100 { .. } => &[CIFAR100_TRAIN_FILE],
        }
    }

    /// The test file.
    pub fn test_file(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => CIFAR10_TEST_FILE,
            CifarKind::Cifar100 { .. } => CIFAR100_TEST_FILE,
        }
    }

    fn label_bytes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 1,
            CifarKind::Cifar100 { .. } => 2,
        }
    }

    /// The label bytes of a record as (name, class count), in file order.
    fn label_fields(self) -> &'static [(&'static str, u8)] {
        match self {
            CifarKind::Cifar10 => &[("label", 10)],
            CifarKind::Cifar100 { .. } => &[("coarse label", 20), ("fine label", 100)],
        }
    }

    /// Which label byte of a record is the label this kind reads.
    fn label_index(self) -> usize {
        match self {
            CifarKind::Cifar10 | CifarKind::Cifar100 { coarse: true } => 0,
            CifarKind::Cifar100 { coarse: false } => 1,
        }
    }

    /// The file names, for error messages: "data_batch_1.bin, …, test_batch.bin".
    fn files_listed(self) -> String {
        let mut names: Vec<&str> = self.train_files().to_vec();
        names.push(self.test_file());
        names.join(", ")
    }
}

/// Images kept as bytes: `n × 3 × 32 × 32`, channel-major (CHW) per image as in the files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawImages {
    /// n × (C·H·W) pixel bytes, image after image.
    pub pixels: Vec<u8>,
    /// n labels in 0..num_classes.
    pub labels: Vec<u32>,
    /// (C, H, W) of one image: [`IMAGE_SHAPE`].
    pub image_shape: [usize; 3],
    pub num_classes: usize,
}

impl RawImages {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Number of bytes per image, C·H·W.
    pub fn sample_dim(&self) -> usize {
        self.image_shape.iter().product()
    }
    /// The pixel bytes of sample `i` (CHW).
    pub fn image(&self, i: usize) -> &[u8] {
        let d = self.sample_dim();
        &self.pixels[i * d..(i + 1) * d]
    }
}

/// The folder holding the `.bin` files: `dir` itself if any of the expected files is in it, else
/// `dir/cifar-10-batches-bin` (or `dir/cifar-100-binary`) if that is a folder.
pub fn locate(dir: &Path, kind: CifarKind) -> Result<PathBuf> {
    let expected = || {
        format!(
            "a {} folder holds {} (either name this folder or the one that contains {})",
            kind.name(),
            kind.files_listed(),
            kind.folder_name()
        )
    };
    if !dir.is_dir() {
        let what = if dir.exists() { "not a directory" } else { "directory not found" };
        return Err(Error::data(dir, format!("{what}; {}", expected())));
    }
    let has_any = |d: &Path| kind.train_files().iter().chain([&kind.test_file()]).any(|f| d.join(f).exists());
    if has_any(dir) {
        return Ok(dir.to_path_buf());
    }
    let sub = dir.join(kind.folder_name());
    if sub.is_dir() {
        return Ok(sub);
    }
    Err(Error::data(
        dir,
        format!("no {} files here nor in a subfolder {}; {}", kind.name(), kind.folder_name(), expected()),
    ))
}

/// Loads `(train, test)`. Train is the concatenation of the training files in order
/// (`data_batch_1.bin` … `data_batch_5.bin` for CIFAR-10).
pub fn load_dir(dir: &Path, kind: CifarKind) -> Result<(RawImages, RawImages)> {
    let folder = locate(dir, kind)?;
    let train_paths = kind.train_files().iter().map(|f| folder.join(f)).collect::<Vec<_>>();
    let test_path = folder.join(kind.test_file());
    // All sizes first, so a missing or truncated later file fails before the big reads.
    let train_counts = train_paths.iter().map(|p| records_in(p, kind)).collect::<Result<Vec<_>>>()?;
    let test_count = records_in(&test_path, kind)?;

    let train_total: usize = train_counts.iter().sum();
    let mut train = empty(kind, train_total, &train_paths[0])?;
    for (path, &count) in train_paths.iter().zip(&train_counts) {
        read_records(path, kind, count, &mut train)?;
    }
    let mut test = empty(kind, test_count, &test_path)?;
    read_records(&test_path, kind, test_count, &mut test)?;
    Ok((train, test))
}

/// `(train samples, test samples)` from the file sizes alone, without reading the files (for the
/// memory planner). Fails exactly where [`load_dir`] would fail before reading any pixel.
pub fn sizes(dir: &Path, kind: CifarKind) -> Result<(usize, usize)> {
    let folder = locate(dir, kind)?;
    let mut train = 0;
    for f in kind.train_files() {
        train += records_in(&folder.join(f), kind)?;
    }
    let test = records_in(&folder.join(kind.test_file()), kind)?;
    Ok((train, test))
}

/// The class names, if the archive's text file is there: `batches.meta.txt` for CIFAR-10,
/// `fine_label_names.txt` / `coarse_label_names.txt` for CIFAR-100. One name per line; blank
/// lines (the official files end with some) are skipped. `Ok(None)` when the file is absent; an
/// error when it is present but does not hold exactly `num_classes` names.
pub fn class_names(dir: &Path, kind: CifarKind) -> Result<Option<Vec<String>>> {
    let folder = locate(dir, kind)?;
    let name = match kind {
        CifarKind::Cifar10 => "batches.meta.txt",
        CifarKind::Cifar100 { coarse: false } => "fine_label_names.txt",
        CifarKind::Cifar100 { coarse: true } => "coarse_label_names.txt",
    };
    let path = folder.join(name);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let names: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if names.len() != kind.num_classes() {
        return Err(Error::data(
            &path,
            format!("holds {} class names, but {} has {} classes", names.len(), kind.name(), kind.num_classes()),
        ));
    }
    Ok(Some(names))
}

/// The number of records in `path`, from its size: an error if it is missing, empty or not a
/// whole number of records.
fn records_in(path: &Path, kind: CifarKind) -> Result<usize> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::data(path, format!("not found; a {} folder holds {}", kind.name(), kind.files_listed())))
        }
        Err(e) => return Err(Error::io(path, e)),
    };
    if !meta.is_file() {
        return Err(Error::data(path, "not a regular file"));
    }
    let len = meta.len();
    let rec = kind.record_bytes() as u64;
    if len == 0 {
        return Err(Error::data(path, format!("empty file; a {} file holds {rec}-byte records", kind.name())));
    }
    if len % rec != 0 {
        return Err(Error::data(
            path,
            format!("truncated or not a {} file: {len} bytes is not a multiple of {rec}-byte records", kind.name()),
        ));
    }
    usize::try_from(len / rec).map_err(|_| Error::data(path, format!("{len} bytes is too large for this machine")))
}

/// Empty [`RawImages`] with room for `n` images, failing (naming `path`) if that much memory
/// cannot be had.
fn empty(kind: CifarKind, n: usize, path: &Path) -> Result<RawImages> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    let fail = |what: &str| Error::data(path, format!("cannot allocate memory for {n} images ({what})"));
    let bytes = n.checked_mul(IMAGE_BYTES).ok_or_else(|| fail("size overflows"))?;
    pixels.try_reserve_exact(bytes).map_err(|_| fail("pixels"))?;
    labels.try_reserve_exact(n).map_err(|_| fail("labels"))?;
    Ok(RawImages { pixels, labels, image_shape: IMAGE_SHAPE, num_classes: kind.num_classes() })
}

/// Appends the `count` records of `path` to `out`, checking every label byte.
fn read_records(path: &Path, kind: CifarKind, count: usize, out: &mut RawImages) -> Result<()> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let fields = kind.label_fields();
    let pick = kind.label_index();
    let mut label_buf = [0u8; 2];
    let label_buf = &mut label_buf[..fields.len()];
    let read_err = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::data(path, "file became shorter while being read")
        } else {
            Error::io(path, e)
        }
    };
    for record in 0..count {
        reader.read_exact(label_buf).map_err(read_err)?;
        for (&(what, classes), &v) in fields.iter().zip(label_buf.iter()) {
            if v >= classes {
                return Err(Error::data(
                    path,
                    format!(
                        "record {record}: {what} is {v}, outside 0..{classes} (0..={}); not a \
                         {} file?",
                        classes - 1,
                        kind.name()
                    ),
                ));
            }
        }
        out.labels.push(label_buf[pick] as u32);
        let start = out.pixels.len();
        out.pixels.resize(start + IMAGE_BYTES, 0);
        reader.read_exact(&mut out.pixels[start..]).map_err(read_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CIFAR10_REAL: &str = "/usr/share/datasets/cifar-10";
    const CIFAR100_REAL: &str = "/usr/share/datasets/cifar-100";

    /// The pixel byte at position `p` of the image with global id `id`: distinct across images in
    /// the first bytes, and varying along the image.
    fn pixel(id: usize, p: usize) -> u8 {
        (id * 7 + p * 13 + p / 256) as u8
    }

    /// `n` records for `kind`, image ids `first..first + n`; labels derived from the id.
    fn records(kind: CifarKind, first: usize, n: usize) -> Vec<u8> {
        let mut v = Vec::new();
        for id in first..first + n {
            match kind {
                CifarKind::Cifar10 => v.push((id % 10) as u8),
                CifarKind::Cifar100 { .. } => {
                    v.push(coarse_of(id));
                    v.push(fine_of(id));
                }
            }
            v.extend((0..IMAGE_BYTES).map(|p| pixel(id, p)));
        }
        v
    }
    fn fine_of(id: usize) -> u8 {
        (id * 31 % 100) as u8
    }
    fn coarse_of(id: usize) -> u8 {
        (id * 3 % 20) as u8
    }

    /// Writes a small data set of `kind` into `folder`: `per_file` records in every training file
    /// and `n_test` in the test file; training ids count up across files, test ids start at 1000.
    fn write_set(folder: &Path, kind: CifarKind, per_file: usize, n_test: usize) {
        std::fs::create_dir_all(folder).unwrap();
        for (i, f) in kind.train_files().iter().enumerate() {
            std::fs::write(folder.join(f), records(kind, i * per_file, per_file)).unwrap();
        }
        std::fs::write(folder.join(kind.test_file()), records(kind, 1000, n_test)).unwrap();
    }

    fn check_images(set: &RawImages, ids: std::ops::Range<usize>, label: impl Fn(usize) -> u32) {
        assert_eq!(set.len(), ids.len());
        assert_eq!(set.pixels.len(), ids.len() * IMAGE_BYTES);
        assert_eq!(set.image_shape, IMAGE_SHAPE);
        for (i, id) in ids.enumerate() {
            let expect: Vec<u8> = (0..IMAGE_BYTES).map(|p| pixel(id, p)).collect();
            assert_eq!(set.image(i), &expect[..], "image {i} (id {id})");
            assert_eq!(set.labels[i], label(id), "label {i} (id {id})");
        }
    }

    fn err_of<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.expect_err("expected an error").to_string()
    }

    #[test]
    fn kinds() {
        assert_eq!(CifarKind::Cifar10.num_classes(), 10);
        assert_eq!(CifarKind::Cifar100 { coarse: false }.num_classes(), 100);
        assert_eq!(CifarKind::Cifar100 { coarse: true }.num_classes(), 20);
        assert_eq!(CifarKind::Cifar10.record_bytes(), 3073);
        assert_eq!(CifarKind::Cifar100 { coarse: true }.record_bytes(), 3074);
        assert_eq!(CifarKind::Cifar10.name(), "CIFAR-10");
        assert_eq!(CifarKind::Cifar100 { coarse: false }.name(), "CIFAR-100");
    }

    #[test]
    fn cifar10_loads_both_layouts() {
        let kind = CifarKind::Cifar10;
        let root = tempfile::tempdir().unwrap();
        let folder = root.path().join("cifar-10-batches-bin");
        write_set(&folder, kind, 3, 4);
        for dir in [root.path(), folder.as_path()] {
            assert_eq!(locate(dir, kind).unwrap(), folder);
            let (train, test) = load_dir(dir, kind).unwrap();
            assert_eq!(train.num_classes, 10);
            // Train: batches 1..5 in order, 3 records each, ids 0..15.
            check_images(&train, 0..15, |id| (id % 10) as u32);
            check_images(&test, 1000..1004, |id| (id % 10) as u32);
            assert_eq!(sizes(dir, kind).unwrap(), (train.len(), test.len()));
        }
    }

    #[test]
    fn cifar100_fine_and_coarse() {
        let root = tempfile::tempdir().unwrap();
        let folder = root.path().join("cifar-100-binary");
        write_set(&folder, CifarKind::Cifar100 { coarse: false }, 5, 2);
        for dir in [root.path(), folder.as_path()] {
            let fine = CifarKind::Cifar100 { coarse: false };
            let (train, test) = load_dir(dir, fine).unwrap();
            assert_eq!(train.num_classes, 100);
            check_images(&train, 0..5, |id| fine_of(id) as u32);
            check_images(&test, 1000..1002, |id| fine_of(id) as u32);
            assert_eq!(sizes(dir, fine).unwrap(), (5, 2));

            let coarse = CifarKind::Cifar100 { coarse: true };
            let (train, test) = load_dir(dir, coarse).unwrap();
            assert_eq!(train.num_classes, 20);
            check_images(&train, 0..5, |id| coarse_of(id) as u32);
            check_images(&test, 1000..1002, |id| coarse_of(id) as u32);
            assert_eq!(sizes(dir, coarse).unwrap(), (5, 2));
        }
        // A CIFAR-100 folder is not a CIFAR-10 folder.
        let msg = err_of(load_dir(root.path(), CifarKind::Cifar10));
        assert!(msg.contains("no CIFAR-10 files") && msg.contains("data_batch_1.bin"), "{msg}");
    }

    #[test]
    fn missing_folder() {
        let root = tempfile::tempdir().unwrap();
        let gone = root.path().join("nope");
        let msg = err_of(load_dir(&gone, CifarKind::Cifar10));
        assert!(msg.contains("nope") && msg.contains("directory not found"), "{msg}");
        assert!(msg.contains("data_batch_5.bin") && msg.contains("test_batch.bin"), "{msg}");
        let msg = err_of(sizes(root.path(), CifarKind::Cifar100 { coarse: false }));
        assert!(msg.contains("no CIFAR-100 files") && msg.contains("cifar-100-binary"), "{msg}");
        assert!(msg.contains("train.bin") && msg.contains("test.bin"), "{msg}");
    }

    #[test]
    fn missing_file_is_named() {
        let kind = CifarKind::Cifar10;
        let root = tempfile::tempdir().unwrap();
        write_set(root.path(), kind, 2, 2);
        std::fs::remove_file(root.path().join("data_batch_4.bin")).unwrap();
        for msg in [err_of(load_dir(root.path(), kind)), err_of(sizes(root.path(), kind))] {
            assert!(msg.contains("data_batch_4.bin: not found"), "{msg}");
            assert!(msg.contains("data_batch_1.bin, data_batch_2.bin"), "{msg}");
        }
        write_set(root.path(), kind, 2, 2);
        std::fs::remove_file(root.path().join("test_batch.bin")).unwrap();
        let msg = err_of(load_dir(root.path(), kind));
        assert!(msg.contains("test_batch.bin: not found"), "{msg}");
    }

    #[test]
    fn truncated_file() {
        let kind = CifarKind::Cifar10;
        let root = tempfile::tempdir().unwrap();
        write_set(root.path(), kind, 10, 2);
        let p = root.path().join("data_batch_2.bin");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..30729]).unwrap();
        for msg in [err_of(load_dir(root.path(), kind)), err_of(sizes(root.path(), kind))] {
            assert!(msg.contains("data_batch_2.bin"), "{msg}");
            assert!(
                msg.contains(
                    "truncated or not a CIFAR-10 file: 30729 bytes is not a multiple of \
                     3073-byte records"
                ),
                "{msg}"
            );
        }
        // A CIFAR-10 batch is not a CIFAR-100 file (3073 vs 3074-byte records).
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("train.bin"), records(CifarKind::Cifar10, 0, 4)).unwrap();
        std::fs::write(root.path().join("test.bin"), records(CifarKind::Cifar10, 0, 4)).unwrap();
        let msg = err_of(load_dir(root.path(), CifarKind::Cifar100 { coarse: false }));
        assert!(msg.contains("train.bin") && msg.contains("3074-byte records"), "{msg}");
    }

    #[test]
    fn empty_file() {
        let kind = CifarKind::Cifar100 { coarse: false };
        let root = tempfile::tempdir().unwrap();
        write_set(root.path(), kind, 3, 3);
        std::fs::write(root.path().join("test.bin"), b"").unwrap();
        for msg in [err_of(load_dir(root.path(), kind)), err_of(sizes(root.path(), kind))] {
            assert!(msg.contains("test.bin: empty file"), "{msg}");
        }
    }

    #[test]
    fn label_out_of_range() {
        let kind = CifarKind::Cifar10;
        let root = tempfile::tempdir().unwrap();
        write_set(root.path(), kind, 3, 3);
        let p = root.path().join("data_batch_3.bin");
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[2 * 3073] = 10;
        std::fs::write(&p, bytes).unwrap();
        let msg = err_of(load_dir(root.path(), kind));
        assert!(msg.contains("data_batch_3.bin"), "{msg}");
        assert!(msg.contains("record 2: label is 10, outside 0..10 (0..=9)"), "{msg}");
        // `sizes` reads no labels, so it does not see this.
        assert_eq!(sizes(root.path(), kind).unwrap(), (15, 3));

        // CIFAR-100: both label bytes are checked, whichever one is used.
        let kind = CifarKind::Cifar100 { coarse: true };
        let root = tempfile::tempdir().unwrap();
        write_set(root.path(), kind, 3, 3);
        let p = root.path().join("train.bin");
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[3074 + 1] = 200;
        std::fs::write(&p, &bytes).unwrap();
        let msg = err_of(load_dir(root.path(), kind));
        assert!(msg.contains("train.bin"), "{msg}");
        assert!(msg.contains("record 1: fine label is 200, outside 0..100 (0..=99)"), "{msg}");
        bytes[3074 + 1] = 0;
        bytes[0] = 20;
        std::fs::write(&p, &bytes).unwrap();
        let msg = err_of(load_dir(root.path(), CifarKind::Cifar100 { coarse: false }));
        assert!(msg.contains("record 0: coarse label is 20, outside 0..20"), "{msg}");
    }

    #[test]
    fn class_names_optional() {
        let kind = CifarKind::Cifar10;
        let root = tempfile::tempdir().unwrap();
        write_set(root.path(), kind, 1, 1);
        assert_eq!(class_names(root.path(), kind).unwrap(), None);
        let names = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n";
        std::fs::write(root.path().join("batches.meta.txt"), names).unwrap();
        let got = class_names(root.path(), kind).unwrap().unwrap();
        assert_eq!(got.len(), 10);
        assert_eq!((got[0].as_str(), got[9].as_str()), ("airplane", "truck"));
        std::fs::write(root.path().join("batches.meta.txt"), "a\nb\n").unwrap();
        let msg = err_of(class_names(root.path(), kind));
        assert!(msg.contains("batches.meta.txt") && msg.contains("holds 2 class names"), "{msg}");
    }

    fn real_if_installed(dir: &str, kind: CifarKind, n_train: usize, n_test: usize) {
        let dir = Path::new(dir);
        if locate(dir, kind).is_err() {
            eprintln!("SKIPPED: {} not installed at {}", kind.name(), dir.display());
            return;
        }
        assert_eq!(sizes(dir, kind).unwrap(), (n_train, n_test));
        let (train, test) = load_dir(dir, kind).unwrap();
        assert_eq!((train.len(), test.len()), (n_train, n_test));
        // Balanced classes in both splits.
        for (set, n) in [(&train, n_train), (&test, n_test)] {
            let mut counts = vec![0usize; kind.num_classes()];
            for &l in &set.labels {
                counts[l as usize] += 1;
            }
            assert!(counts.iter().all(|&c| c == n / kind.num_classes()), "{counts:?}");
        }
    }

    #[test]
    fn real_cifar10_if_installed() {
        real_if_installed(CIFAR10_REAL, CifarKind::Cifar10, 50_000, 10_000);
    }

    #[test]
    fn real_cifar100_if_installed() {
        real_if_installed(CIFAR100_REAL, CifarKind::Cifar100 { coarse: false }, 50_000, 10_000);
        real_if_installed(CIFAR100_REAL, CifarKind::Cifar100 { coarse: true }, 50_000, 10_000);
    }
}
