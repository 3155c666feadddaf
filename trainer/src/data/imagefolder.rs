//! `data.format = "imagefolder"`: torchvision's `ImageFolder` layout, `DIR/train/<class>/*.JPEG`
//! and `DIR/val/<class>/…` (ImageNet as the official tar files unpack, with the validation images
//! moved into class folders). Only the file list and the labels are held in memory; pixels are
//! decoded when a batch is gathered, by the prefetching pool (`data::prefetch`) during training
//! and by scoped threads during evaluation.
//!
//! **Listing**, as torchvision does it: the classes are the sorted sub-folder names of `train/`
//! (label = position); each class folder is walked recursively, folders in sorted order and files
//! sorted by name inside each, so that sample index i is stable. Files whose extension is not
//! `.jpg`, `.jpeg` or `.png` (any case) are skipped silently — like torchvision, which only
//! errors when a class has no valid file at all. `val/` must hold the same classes or a subset.
//! Everything that can be found without decoding is found before training starts: a missing
//! `train/` or `val/`, a class folder with no images, a val class unknown to train/, an empty
//! (0-byte) image file — each an error naming the folder or the file. Checking every JPEG's
//! header up front would read the 1.28 M files of ImageNet; a file that fails to decode later
//! stops the run with an error naming it (the field's batch error, agreed between ranks).
//!
//! **Decoding**: the `image` crate (zune-jpeg, png) to 8-bit RGB (greyscale replicated, alpha
//! dropped, CMYK converted by the decoder), then `transform::rrc_flip` (training,
//! `data.augment = "rrc-flip"`) or `transform::resize_center_crop` (evaluation, and training with
//! `data.augment = "none"`) to `data.image_size`², channel-major bytes through the
//! normalisation tables as every other format.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::augment::Augment;
use super::prefetch::{Decode, Plan, Prefetcher, Shared};
use super::transform::{self, Src};
use crate::error::{Error, Result};

/// The extensions read (compared case-insensitively).
pub const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// The files of one split and their labels.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    pub files: Vec<PathBuf>,
    pub labels: Vec<u32>,
}

fn is_image(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|err| Error::io(dir, err)))
        .collect::<Result<Vec<_>>>()?;
    v.sort();
    Ok(v)
}

/// The image files under `dir`, torchvision's order: `sorted(os.walk(dir))`, each folder's files
/// sorted by name.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut folders = vec![dir.to_path_buf()];
    let mut all = Vec::new();
    // Symbolic links are followed (as torchvision does), each real folder once: a link cycle
    // must not make the listing endless.
    let mut seen = std::collections::HashSet::new();
    while let Some(d) = folders.pop() {
        if !seen.insert(std::fs::canonicalize(&d).map_err(|e| Error::io(&d, e))?) {
            continue;
        }
        let mut files = Vec::new();
        for p in read_dir_sorted(&d)? {
            if p.is_dir() {
                folders.push(p);
            } else if is_image(&p) {
                files.push(p);
            }
        }
        all.push((d.to_string_lossy().into_owned(), files));
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    out.extend(all.into_iter().flat_map(|(_, f)| f));
    Ok(())
}

/// The class names of `root/train` and both splits' listings, checked as the module docs say.
pub fn scan(root: &Path) -> Result<(Vec<String>, Listing, Listing)> {
    let (train_dir, val_dir) = (root.join("train"), root.join("val"));
    for d in [&train_dir, &val_dir] {
        if !d.is_dir() {
            return Err(Error::data(
                d,
                "no such folder: data.format = \"imagefolder\" needs DIR/train/<class>/ and DIR/val/<class>/",
            ));
        }
    }
    let classes: Vec<String> = read_dir_sorted(&train_dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    if classes.is_empty() {
        return Err(Error::data(&train_dir, "holds no class folders"));
    }
    let split = |dir: &Path, is_train: bool| -> Result<Listing> {
        let mut listing = Listing::default();
        for p in read_dir_sorted(dir)?.into_iter().filter(|p| p.is_dir()) {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let Ok(label) = classes.binary_search(&name) else {
                return Err(Error::data(&p, "is a class folder of val/ with no counterpart in train/"));
            };
            let start = listing.files.len();
            walk(&p, &mut listing.files)?;
            if listing.files.len() == start {
                return Err(Error::data(
                    &p,
                    format!(
                        "class folder holds no image files (.jpg, .jpeg, .png){}",
                        if is_train { "" } else { " (leave it out of val/ instead)" }
                    ),
                ));
            }
            for f in &listing.files[start..] {
                let len = std::fs::metadata(f).map_err(|e| Error::io(f, e))?.len();
                if len == 0 {
                    return Err(Error::data(f, "is empty (0 bytes)"));
                }
            }
            listing.labels.resize(listing.files.len(), label as u32);
        }
        Ok(listing)
    };
    let train = split(&train_dir, true)?;
    let val = split(&val_dir, false)?;
    if val.files.is_empty() {
        return Err(Error::data(&val_dir, "holds no class folders"));
    }
    Ok((classes, train, val))
}

/// One image file decoded to 8-bit RGB, interleaved: (bytes, width, height).
pub fn decode_rgb(path: &Path) -> std::result::Result<(Vec<u8>, usize, usize), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("data file {}: cannot read: {e}", path.display()))?;
    let img =
        image::load_from_memory(&bytes).map_err(|e| format!("data file {}: cannot decode: {e}", path.display()))?;
    let rgb = img.into_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    if w == 0 || h == 0 {
        return Err(format!("data file {}: the image has no pixels", path.display()));
    }
    Ok((rgb.into_raw(), w, h))
}

/// The image files of one split, decoded on demand to `size × size` RGB.
pub struct Folder {
    files: Arc<Vec<PathBuf>>,
    pub size: usize,
    /// Decode threads (`data.workers`).
    pub workers: usize,
    /// The prefetch cache's budget in bytes (`data.prefetch_mib`).
    pub prefetch_bytes: usize,
    /// The running prefetcher's shared state, while one runs ([`Folder::start_prefetch`]).
    active: Mutex<Option<(Arc<Shared>, Augment, u64)>>,
}

impl std::fmt::Debug for Folder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Folder {{ {} files, size {}, {} workers }}", self.files.len(), self.size, self.workers)
    }
}

impl Folder {
    pub fn new(files: Vec<PathBuf>, size: usize, workers: usize, prefetch_bytes: usize) -> Self {
        Folder { files: Arc::new(files), size, workers: workers.max(1), prefetch_bytes, active: Mutex::new(None) }
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
    pub fn file(&self, i: usize) -> &Path {
        &self.files[i]
    }

    /// Files `range` (a rank's share of the evaluation set; the first n for `train_subset`).
    pub fn slice(&self, range: std::ops::Range<usize>) -> Folder {
        Folder::new(self.files[range].to_vec(), self.size, self.workers, self.prefetch_bytes)
    }

    /// Bytes per decoded sample, 3·size².
    pub fn sample_bytes(&self) -> usize {
        3 * self.size * self.size
    }

    /// Sample `i` as evaluation sees it (`out`: 3·size² bytes, CHW).
    pub fn eval_image(&self, i: usize, scratch: &mut Vec<u8>, out: &mut [u8]) -> std::result::Result<(), String> {
        eval_file(&self.files[i], self.size, scratch, out)
    }

    /// Sample `i` as training step `step` sees it.
    #[allow(clippy::too_many_arguments)]
    pub fn training_image(
        &self,
        i: usize,
        augment: Augment,
        seed: u64,
        step: u64,
        scratch: &mut Vec<u8>,
        out: &mut [u8],
    ) -> std::result::Result<(), String> {
        training_file(&self.files[i], self.size, augment, seed, step, i as u64, scratch, out)
    }

    /// Start the prefetching pool for training steps `start..end`, `plan` giving each step's
    /// indices on this rank. Stopped when the returned value is dropped.
    pub fn start_prefetch(&self, plan: Plan, start: u64, end: u64, augment: Augment, seed: u64) -> Prefetcher {
        let files = self.files.clone();
        let size = self.size;
        let decode: Decode = Arc::new(move |step, index, scratch: &mut Vec<u8>| {
            let mut out = vec![0u8; 3 * size * size];
            training_file(&files[index], size, augment, seed, step, index as u64, scratch, &mut out)?;
            Ok(out)
        });
        let mut plan = plan;
        let per_step = plan(start).len().max(1) * self.sample_bytes();
        let ahead = (self.prefetch_bytes / per_step).max(1) as u64;
        let p = Prefetcher::start(plan, decode, start, end, ahead, self.workers);
        *self.active.lock().unwrap_or_else(|e| e.into_inner()) = Some((p.shared(), augment, seed));
        p
    }

    /// Forget the prefetcher (its owner dropped it, or is about to).
    pub fn stop_prefetch(&self) {
        *self.active.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The training bytes of `indices` at `step`, each handed to `put(position, bytes)`: from the
    /// prefetcher when one runs with these settings, otherwise decoded on `workers` threads.
    pub fn training_batch(
        &self,
        indices: &[usize],
        augment: Augment,
        seed: u64,
        step: u64,
        put: &mut (dyn FnMut(usize, &[u8]) + Send),
    ) -> std::result::Result<(), String> {
        let active = self.active.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // The cache holds bytes made with the prefetcher's augmentation and seed only.
        if let Some((shared, ..)) = active.filter(|(_, a, s)| *a == augment && *s == seed) {
            return shared.fetch(step, indices, put);
        }
        self.parallel(indices, put, |i, scratch, out| self.training_image(i, augment, seed, step, scratch, out))
    }

    /// The evaluation bytes of `indices`, decoded on `workers` threads.
    pub fn eval_batch(
        &self,
        indices: &[usize],
        put: &mut (dyn FnMut(usize, &[u8]) + Send),
    ) -> std::result::Result<(), String> {
        self.parallel(indices, put, |i, scratch, out| self.eval_image(i, scratch, out))
    }

    /// `make(i, scratch, out)` for every index on up to `workers` scoped threads, contiguous
    /// shares; `put` is called under a lock in whatever order the threads finish. The first error
    /// (in position order) is returned.
    fn parallel(
        &self,
        indices: &[usize],
        put: &mut (dyn FnMut(usize, &[u8]) + Send),
        make: impl Fn(usize, &mut Vec<u8>, &mut [u8]) -> std::result::Result<(), String> + Sync,
    ) -> std::result::Result<(), String> {
        let n = indices.len();
        let threads = self.workers.min(n).max(1);
        let share = n.div_ceil(threads).max(1);
        let put = Mutex::new(put);
        let d = self.sample_bytes();
        // Share t: positions t·share.. of `indices`; the first error of the share, if any.
        let run = |t: usize| {
            let (mut scratch, mut out) = (Vec::new(), vec![0u8; d]);
            let (lo, hi) = ((t * share).min(n), ((t + 1) * share).min(n));
            for (pos, &i) in indices.iter().enumerate().take(hi).skip(lo) {
                if let Err(e) = make(i, &mut scratch, &mut out) {
                    return Some((pos, e));
                }
                (put.lock().unwrap_or_else(|e| e.into_inner()))(pos, &out);
            }
            None
        };
        // Shares 1.. on scoped threads, share 0 on this one.
        let errors: Vec<Option<(usize, String)>> = std::thread::scope(|s| {
            let run = &run;
            let handles: Vec<_> = (1..threads).map(|t| s.spawn(move || run(t))).collect();
            let mut errors = vec![run(0)];
            errors.extend(
                handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Some((n, "a decode thread panicked".into())))),
            );
            errors
        });
        match errors.into_iter().flatten().min_by_key(|(pos, _)| *pos) {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }
}

fn eval_file(path: &Path, size: usize, scratch: &mut Vec<u8>, out: &mut [u8]) -> std::result::Result<(), String> {
    let (rgb, w, h) = decode_rgb(path)?;
    transform::resize_center_crop(Src::hwc(&rgb, 3, h, w), size, scratch, out);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn training_file(
    path: &Path,
    size: usize,
    augment: Augment,
    seed: u64,
    step: u64,
    index: u64,
    scratch: &mut Vec<u8>,
    out: &mut [u8],
) -> std::result::Result<(), String> {
    match augment {
        Augment::RrcFlip => {
            let (rgb, w, h) = decode_rgb(path)?;
            transform::rrc_flip(Src::hwc(&rgb, 3, h, w), size, seed, step, index, scratch, out);
            Ok(())
        }
        Augment::None => eval_file(path, size, scratch, out),
        Augment::CropFlip => {
            Err("data.augment = \"crop-flip\" is for 32×32 images; image folders take \"rrc-flip\"".into())
        }
    }
}

/// Write a small synthetic image folder (tests, `kutta bench data --synthetic`): `classes`
/// classes, `train` and `val` JPEGs per class of `w × h`, smooth photo-like content (gradients,
/// soft blobs, a little texture; the class sets the dominant hue so a model can learn it).
pub fn write_synthetic(root: &Path, classes: usize, train: usize, val: usize, w: u32, h: u32, seed: u64) -> Result<()> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    for (split, per_class) in [("train", train), ("val", val)] {
        for c in 0..classes {
            let dir = root.join(split).join(format!("n{c:08}"));
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            for k in 0..per_class {
                let hue = [(c * 97 % 256) as f64, (c * 53 % 256) as f64, (c * 191 % 256) as f64];
                let (fx, fy, ph) = (1.0 + 6.0 * next(), 1.0 + 6.0 * next(), std::f64::consts::TAU * next());
                let (bx, by, br) = (next() * w as f64, next() * h as f64, 0.1 + 0.3 * next());
                let img = image::RgbImage::from_fn(w, h, |x, y| {
                    let (u, v) = (x as f64 / w as f64, y as f64 / h as f64);
                    let d = ((x as f64 - bx).powi(2) + (y as f64 - by).powi(2)).sqrt() / (br * w as f64);
                    let blob = (-d * d).exp();
                    let tex = 12.0 * ((fx * 6.0 * u + ph).sin() * (fy * 6.0 * v).cos());
                    let fine = 4.0 * ((x as f64 * 0.9).sin() + (y as f64 * 1.3).cos());
                    let px = |ch: usize| {
                        let g = 0.5 * hue[ch] + 60.0 * u + 40.0 * v + 70.0 * blob + tex + fine;
                        g.clamp(0.0, 255.0) as u8
                    };
                    image::Rgb([px(0), px(1), px(2)])
                });
                let path = dir.join(format!("{split}_{c}_{k:05}.JPEG"));
                let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
                let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(std::io::BufWriter::new(file), 90);
                enc.encode_image(&img).map_err(|e| Error::data(&path, format!("cannot encode: {e}")))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::sampler::BatchSampler;

    fn write_png(path: &Path, img: image::DynamicImage) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        img.save_with_format(path, image::ImageFormat::Png).unwrap();
    }

    #[test]
    fn scan_orders_and_checks() {
        let t = tempfile::tempdir().unwrap();
        write_synthetic(t.path(), 3, 2, 1, 20, 12, 1).unwrap();
        // A non-image file is skipped; a PNG and a greyscale PNG count.
        std::fs::write(t.path().join("train/n00000001/notes.txt"), "x").unwrap();
        let grey = image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(9, 7, |x, _| image::Luma([x as u8 * 20])));
        write_png(&t.path().join("train/n00000001/a_grey.PNG"), grey);
        let (classes, train, val) = scan(t.path()).unwrap();
        assert_eq!(classes, ["n00000000", "n00000001", "n00000002"]);
        assert_eq!(train.labels, [0, 0, 1, 1, 1, 2, 2]);
        assert!(train.files[2].ends_with("n00000001/a_grey.PNG"), "{:?}", train.files);
        assert_eq!(val.labels, [0, 1, 2]);
        // The greyscale PNG decodes to RGB with equal channels.
        let (rgb, w, h) = decode_rgb(&train.files[2]).unwrap();
        assert_eq!((w, h, rgb.len()), (9, 7, 9 * 7 * 3));
        assert!(rgb.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
        assert_eq!(rgb[3], 20);
        // A greyscale JPEG too (lossy: compare the channels, not the values).
        let gj = t.path().join("grey.jpg");
        let g = image::GrayImage::from_fn(16, 8, |x, y| image::Luma([(x * 10 + y * 5) as u8]));
        image::DynamicImage::ImageLuma8(g).save_with_format(&gj, image::ImageFormat::Jpeg).unwrap();
        let (rgb, w, h) = decode_rgb(&gj).unwrap();
        assert_eq!((w, h), (16, 8));
        assert!(rgb.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
        // A symbolic-link cycle inside a class folder is listed once.
        std::os::unix::fs::symlink(t.path().join("train/n00000002"), t.path().join("train/n00000002/loop")).unwrap();
        assert_eq!(scan(t.path()).unwrap().1.labels, [0, 0, 1, 1, 1, 2, 2]);
        // An RGBA PNG loses its alpha.
        let rgba = image::DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(3, 2, image::Rgba([1, 2, 3, 4])));
        write_png(&t.path().join("x.png"), rgba);
        assert_eq!(decode_rgb(&t.path().join("x.png")).unwrap().0, [1, 2, 3].repeat(6));
    }

    #[test]
    fn bad_folders_and_files_are_named() {
        let t = tempfile::tempdir().unwrap();
        let err = scan(t.path()).unwrap_err().to_string();
        assert!(err.contains("train") && err.contains("no such folder"), "{err}");
        write_synthetic(t.path(), 2, 1, 1, 8, 8, 2).unwrap();
        // An empty class folder (only a non-image file in it).
        let empty = t.path().join("train/n00000005");
        std::fs::create_dir_all(&empty).unwrap();
        std::fs::write(empty.join("readme.txt"), "x").unwrap();
        let err = scan(t.path()).unwrap_err().to_string();
        assert!(err.contains("n00000005") && err.contains("no image files"), "{err}");
        std::fs::remove_dir_all(&empty).unwrap();
        // A val class train/ lacks.
        std::fs::create_dir_all(t.path().join("val/zebra")).unwrap();
        let err = scan(t.path()).unwrap_err().to_string();
        assert!(err.contains("zebra") && err.contains("train/"), "{err}");
        std::fs::remove_dir_all(t.path().join("val/zebra")).unwrap();
        // A 0-byte file, before training.
        let zero = t.path().join("train/n00000001/zero.jpg");
        std::fs::write(&zero, b"").unwrap();
        let err = scan(t.path()).unwrap_err().to_string();
        assert!(err.contains("zero.jpg") && err.contains("empty"), "{err}");
        // A corrupt JPEG passes the scan and names itself when decoded.
        std::fs::write(&zero, b"\xFF\xD8\xFF\xE0 not a jpeg at all").unwrap();
        let (_, train, _) = scan(t.path()).unwrap();
        let folder = Folder::new(train.files, 8, 2, 1 << 20);
        let bad = (0..folder.len()).find(|&i| folder.file(i).ends_with("zero.jpg")).unwrap();
        let err = folder.eval_image(bad, &mut Vec::new(), &mut [0; 192]).unwrap_err();
        assert!(err.contains("zero.jpg") && err.contains("cannot decode"), "{err}");
        let err = folder.eval_batch(&[0, bad], &mut |_, _| {}).unwrap_err();
        assert!(err.contains("zero.jpg"), "{err}");
        // Missing val/.
        std::fs::remove_dir_all(t.path().join("val")).unwrap();
        let err = scan(t.path()).unwrap_err().to_string();
        assert!(err.contains("val") && err.contains("no such folder"), "{err}");
    }

    /// Every worker count, with the prefetcher or without, gives the same bytes.
    #[test]
    fn deterministic_across_worker_counts_and_prefetch() {
        let t = tempfile::tempdir().unwrap();
        write_synthetic(t.path(), 2, 6, 1, 40, 30, 3).unwrap();
        let (_, train, _) = scan(t.path()).unwrap();
        let (n, b) = (train.files.len(), 5);
        let collect = |folder: &Folder, step: u64, idx: &[usize]| {
            let mut got = vec![Vec::new(); idx.len()];
            folder.training_batch(idx, Augment::RrcFlip, 9, step, &mut |p, bytes| got[p] = bytes.to_vec()).unwrap();
            got
        };
        let mut reference = Vec::new();
        let mut sampler = BatchSampler::new(n, b, 9, true);
        let serial = Folder::new(train.files.clone(), 16, 1, 0);
        for step in 0..6 {
            reference.push(collect(&serial, step, &sampler.batch(step)));
        }
        for workers in [1, 2, 4] {
            let folder = Folder::new(train.files.clone(), 16, workers, 3 * 16 * 16 * b * 2);
            let mut plan_sampler = sampler.clone();
            let p = folder.start_prefetch(Box::new(move |s| plan_sampler.batch(s)), 1, 6, Augment::RrcFlip, 9);
            for step in 1..6 {
                assert_eq!(collect(&folder, step, &sampler.batch(step)), reference[step as usize], "{workers}");
            }
            let (hits, misses) = p.hits_and_misses();
            assert_eq!(hits + misses, 25);
            folder.stop_prefetch();
            // Without the prefetcher, in parallel.
            assert_eq!(collect(&folder, 0, &sampler.batch(0)), reference[0]);
        }
    }
}
