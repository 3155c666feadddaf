//! `data.format = "imagenet64"`: Downsampled ImageNet (Chrabaszcz, Loshchilov & Hutter 2017,
//! "A Downsampled Variant of ImageNet as an Alternative to the CIFAR datasets") at 32×32 or
//! 64×64, as its npz files: `train_data_batch_1.npz` … `train_data_batch_10.npz` (training, in
//! that order) and `val_data.npz`.
//!
//! Each npz is a zip of `.npy` arrays: `data`, uint8 `[N, 3·S·S]`, each row one image channel-
//! major (all R, then G, then B; each plane row-major) — already the CHW layout the model takes;
//! `labels`, N integers 1..=1000 (1-based; made 0-based here); the training files also hold
//! `mean`, unused. S is read from the row length (3072 → 32, 12288 → 64). Images stay bytes in
//! memory (an ordinary `Pixels::U8` data set: 1.28 M × 12288 B = 15.7 GB at 64, 3.9 GB at 32).
//!
//! The `.npy` header is parsed here (magic, version, a Python-dict header naming `descr`,
//! `fortran_order` and `shape`; see numpy's `format.py`) rather than with `npyz`: the two arrays
//! we read are plain C-order `|u1` and integer vectors, and reading `data` straight into the
//! data set's buffer (no second 1.5 GB copy per file) needs only the header's offset.
//! Every fault — a missing or truncated file, a wrong dtype or shape, a label out of 1..=1000,
//! files of different image sizes — is an error naming the file.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

pub const NUM_CLASSES: usize = 1000;
pub const TRAIN_FILES: usize = 10;
pub const VAL_FILE: &str = "val_data.npz";

pub fn train_file(k: usize) -> String {
    format!("train_data_batch_{k}.npz")
}

/// Images (n × 3·S·S bytes), 0-based labels, and S.
#[derive(Debug)]
pub struct Raw {
    pub pixels: Vec<u8>,
    pub labels: Vec<u32>,
    pub size: usize,
}

/// A parsed `.npy` header: dtype string, shape, and whether it is Fortran-ordered.
#[derive(Debug, PartialEq)]
struct Header {
    descr: String,
    fortran: bool,
    shape: Vec<usize>,
}

/// Read the header of a `.npy` stream, leaving `r` at the first data byte.
fn read_header(r: &mut impl Read) -> std::result::Result<Header, String> {
    let mut pre = [0u8; 8];
    r.read_exact(&mut pre).map_err(|e| format!("no .npy header ({e})"))?;
    if &pre[..6] != b"\x93NUMPY" {
        return Err("not a .npy array (bad magic)".into());
    }
    let len = match pre[6] {
        1 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b).map_err(|e| format!("truncated .npy header ({e})"))?;
            u16::from_le_bytes(b) as usize
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            r.read_exact(&mut b).map_err(|e| format!("truncated .npy header ({e})"))?;
            u32::from_le_bytes(b) as usize
        }
        v => return Err(format!(".npy format version {v} is not supported")),
    };
    if len > 1 << 20 {
        return Err(format!(".npy header of {len} bytes"));
    }
    let mut text = vec![0u8; len];
    r.read_exact(&mut text).map_err(|e| format!("truncated .npy header ({e})"))?;
    let text = String::from_utf8_lossy(&text);
    parse_dict(&text)
}

/// The header dict, e.g. `{'descr': '|u1', 'fortran_order': False, 'shape': (3, 4), }`.
fn parse_dict(text: &str) -> std::result::Result<Header, String> {
    let bad = || format!("cannot read the .npy header {:?}", text.trim());
    let value_after = |key: &str| -> std::result::Result<&str, String> {
        let at = text.find(&format!("'{key}'")).ok_or_else(bad)?;
        let rest = text[at + key.len() + 2..].trim_start();
        Ok(rest.strip_prefix(':').ok_or_else(bad)?.trim_start())
    };
    let d = value_after("descr")?;
    let q = d.chars().next().filter(|c| *c == '\'' || *c == '"').ok_or_else(bad)?;
    let descr = d[1..].split(q).next().ok_or_else(bad)?.to_string();
    let f = value_after("fortran_order")?;
    let fortran = if f.starts_with("True") {
        true
    } else if f.starts_with("False") {
        false
    } else {
        return Err(bad());
    };
    let s = value_after("shape")?;
    let inner = s.strip_prefix('(').and_then(|s| s.split(')').next()).ok_or_else(bad)?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| t.trim_end_matches('L').parse::<usize>().map_err(|_| bad()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Header { descr, fortran, shape })
}

/// Append the images and labels of one npz file to `raw`.
pub fn read_npz(path: &Path, raw: &mut Raw) -> Result<()> {
    let err = |msg: String| Error::data(path, msg);
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| err(format!("not a readable npz (zip) file: {e}")))?;
    // Labels first: their count says how many rows `data` must have.
    let labels = {
        let mut entry = zip.by_name("labels.npy").map_err(|e| err(format!("no labels array: {e}")))?;
        let h = read_header(&mut entry).map_err(|m| err(format!("labels: {m}")))?;
        let width = match h.descr.as_str() {
            "<i8" | "<u8" => 8,
            "<i4" | "<u4" => 4,
            "<i2" | "<u2" => 2,
            "|u1" | "|i1" => 1,
            d => return Err(err(format!("labels have dtype {d:?}; an integer type was expected"))),
        };
        let signed = h.descr.contains('i');
        if h.shape.len() != 1 {
            return Err(err(format!("labels have shape {:?}; one dimension was expected", h.shape)));
        }
        let n = h.shape[0];
        let mut bytes = vec![0u8; n * width];
        entry.read_exact(&mut bytes).map_err(|e| err(format!("labels are truncated ({e})")))?;
        bytes
            .chunks_exact(width)
            .enumerate()
            .map(|(i, c)| {
                let mut b = [0u8; 8];
                b[..width].copy_from_slice(c);
                if signed && c[width - 1] & 0x80 != 0 {
                    b[width..].fill(0xFF);
                }
                let v = i64::from_le_bytes(b);
                if (1..=NUM_CLASSES as i64).contains(&v) {
                    Ok(v as u32 - 1)
                } else {
                    Err(err(format!("label {v} of sample {i} is outside 1..={NUM_CLASSES}")))
                }
            })
            .collect::<Result<Vec<u32>>>()?
    };
    let mut entry = zip.by_name("data.npy").map_err(|e| err(format!("no data array: {e}")))?;
    let h = read_header(&mut entry).map_err(|m| err(format!("data: {m}")))?;
    if h.descr != "|u1" {
        return Err(err(format!("data has dtype {:?}; uint8 (\"|u1\") was expected", h.descr)));
    }
    if h.fortran || h.shape.len() != 2 {
        return Err(err(format!("data has shape {:?}; C-ordered [N, 3·S·S] was expected", h.shape)));
    }
    let (n, row) = (h.shape[0], h.shape[1]);
    let size = match row {
        3072 => 32,
        12288 => 64,
        _ => return Err(err(format!("rows of {row} bytes; 3072 (32×32) or 12288 (64×64) were expected"))),
    };
    if n != labels.len() {
        return Err(err(format!("{n} images but {} labels", labels.len())));
    }
    if raw.size != 0 && raw.size != size {
        return Err(err(format!("{size}×{size} images, but the files before hold {}×{}", raw.size, raw.size)));
    }
    raw.size = size;
    let start = raw.pixels.len();
    raw.pixels
        .try_reserve_exact(n * row)
        .map_err(|e| err(format!("cannot allocate {} bytes for its images: {e}", n * row)))?;
    raw.pixels.resize(start + n * row, 0);
    entry.read_exact(&mut raw.pixels[start..]).map_err(|e| err(format!("data is truncated ({e})")))?;
    raw.labels.extend(labels);
    Ok(())
}

/// The training files (all of `train_data_batch_*.npz` present, numbered from 1 without gaps)
/// and the validation file of `dir`.
pub fn load_dir(dir: &Path) -> Result<(Raw, Raw)> {
    if !dir.is_dir() {
        return Err(Error::data(dir, "no such folder (data.format = \"imagenet64\")"));
    }
    let mut train = Raw { pixels: Vec::new(), labels: Vec::new(), size: 0 };
    let mut k = 1;
    while dir.join(train_file(k)).is_file() {
        read_npz(&dir.join(train_file(k)), &mut train)?;
        k += 1;
    }
    if k == 1 {
        return Err(Error::data(dir.join(train_file(1)), "no such file (data.format = \"imagenet64\")"));
    }
    if k <= TRAIN_FILES && dir.join(train_file(k + 1)).is_file() {
        return Err(Error::data(dir.join(train_file(k)), "missing, but later training batches exist"));
    }
    let mut val = Raw { pixels: Vec::new(), labels: Vec::new(), size: train.size };
    let vp = dir.join(VAL_FILE);
    if !vp.is_file() {
        return Err(Error::data(&vp, "no such file (data.format = \"imagenet64\")"));
    }
    read_npz(&vp, &mut val)?;
    Ok((train, val))
}

/// (training samples, validation samples, S) from the files' `.npy` headers alone (the planner).
pub fn sizes(dir: &Path) -> Result<(usize, usize, usize)> {
    let rows_of = |path: &Path| -> Result<(usize, usize)> {
        let err = |msg: String| Error::data(path, msg);
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
            .map_err(|e| err(format!("not a readable npz (zip) file: {e}")))?;
        let mut entry = zip.by_name("data.npy").map_err(|e| err(format!("no data array: {e}")))?;
        let h = read_header(&mut entry).map_err(|m| err(format!("data: {m}")))?;
        match h.shape[..] {
            [n, 3072] => Ok((n, 32)),
            [n, 12288] => Ok((n, 64)),
            _ => Err(err(format!("data has shape {:?}; [N, 3072] or [N, 12288] was expected", h.shape))),
        }
    };
    let (mut train, mut size) = (0, 0);
    let mut k = 1;
    while dir.join(train_file(k)).is_file() {
        let (n, s) = rows_of(&dir.join(train_file(k)))?;
        (train, size) = (train + n, s);
        k += 1;
    }
    if k == 1 {
        return Err(Error::data(dir.join(train_file(1)), "no such file (data.format = \"imagenet64\")"));
    }
    let (val, _) = rows_of(&dir.join(VAL_FILE))?;
    Ok((train, val, size))
}

/// Tests' writer: an npz with `data` (uint8, [n, row]) and `labels` (int64), stored or deflated.
pub fn write_npz(path: &Path, data: &[u8], row: usize, labels: &[i64], deflate: bool) -> Result<()> {
    use std::io::Write;
    let npy = |descr: &str, shape: String, body: &[u8]| {
        let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + dict.len() + 1) % 64 != 0 {
            dict.push(' ');
        }
        dict.push('\n');
        let mut v = b"\x93NUMPY\x01\x00".to_vec();
        v.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        v.extend_from_slice(dict.as_bytes());
        v.extend_from_slice(body);
        v
    };
    let n = labels.len();
    let label_bytes: Vec<u8> = labels.iter().flat_map(|l| l.to_le_bytes()).collect();
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipWriter::new(file);
    let method = if deflate { zip::CompressionMethod::Deflated } else { zip::CompressionMethod::Stored };
    let opts = zip::write::SimpleFileOptions::default().compression_method(method);
    let io = |e: std::io::Error| Error::io(path, e);
    let z = |e: zip::result::ZipError| Error::data(path, e.to_string());
    zip.start_file("data.npy", opts).map_err(z)?;
    zip.write_all(&npy("|u1", format!("({n}, {row})"), data)).map_err(io)?;
    zip.start_file("labels.npy", opts).map_err(z)?;
    zip.write_all(&npy("<i8", format!("({n},)"), &label_bytes)).map_err(io)?;
    zip.finish().map_err(z)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_as_a_byte_dataset_and_augments() {
        use crate::data::{augment::Augment, DataConfig, DataFormat};
        let t = tempfile::tempdir().unwrap();
        let row = 12288;
        let img: Vec<u8> = (0..4 * row).map(|i| (i % 253) as u8).collect();
        write_npz(&t.path().join(train_file(1)), &img, row, &[3, 1, 4, 1], true).unwrap();
        write_npz(&t.path().join(VAL_FILE), &img[..row], row, &[9], false).unwrap();
        let cfg = DataConfig { format: DataFormat::Imagenet64, dir: t.path().into(), ..Default::default() };
        let (train, val) = crate::data::load(&cfg).unwrap();
        assert_eq!((train.len(), val.len(), train.image_shape, train.num_classes), (4, 1, [3, 64, 64], 1000));
        assert_eq!(train.labels, [2, 0, 3, 0]);
        // ImageNet's normalisation by default: byte 0 of the red plane → −0.485 / 0.229.
        let mut x = vec![0f32; 12288];
        val.write_image(0, &mut x).unwrap();
        assert!((x[0] - (-0.485 / 0.229) as f32).abs() < 1e-6, "{}", x[0]);
        for augment in [Augment::CropFlip, Augment::RrcFlip] {
            let mut a = vec![0f32; 2 * 12288];
            let mut b = a.clone();
            train.write_training_batch(&[1, 2], augment, 5, 9, &mut a).unwrap();
            train.write_training_batch(&[1, 2], augment, 5, 9, &mut b).unwrap();
            assert_eq!(a, b);
        }
        let bad = DataConfig { image_size: Some(32), ..cfg };
        let e = crate::data::load(&bad).unwrap_err().to_string();
        assert!(e.contains("data.image_size"), "{e}");
        assert_eq!(sizes(t.path()).unwrap(), (4, 1, 64));
    }

    #[test]
    fn wrong_dtype_is_named() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("x.npz");
        let file = std::fs::File::create(&p).unwrap();
        let mut zip = zip::ZipWriter::new(file);
        let opts = zip::write::SimpleFileOptions::default();
        use std::io::Write;
        let header = |descr: &str, shape: &str| {
            let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}\n");
            let mut v = b"\x93NUMPY\x01\x00".to_vec();
            v.extend_from_slice(&(dict.len() as u16).to_le_bytes());
            v.extend_from_slice(dict.as_bytes());
            v
        };
        zip.start_file("labels.npy", opts).unwrap();
        zip.write_all(&header("<i8", "(1,)")).unwrap();
        zip.write_all(&1i64.to_le_bytes()).unwrap();
        zip.start_file("data.npy", opts).unwrap();
        zip.write_all(&header("<f4", "(1, 3072)")).unwrap();
        zip.write_all(&[0u8; 4 * 3072]).unwrap();
        zip.finish().unwrap();
        let mut raw = Raw { pixels: Vec::new(), labels: Vec::new(), size: 0 };
        let e = read_npz(&p, &mut raw).unwrap_err().to_string();
        assert!(e.contains("x.npz") && e.contains("<f4"), "{e}");
    }

    #[test]
    fn header_parses() {
        let h = parse_dict("{'descr': '<i8', 'fortran_order': False, 'shape': (12,), }").unwrap();
        assert_eq!(h, Header { descr: "<i8".into(), fortran: false, shape: vec![12] });
        let h = parse_dict("{'descr': '|u1', 'fortran_order': True, 'shape': (3, 3072), }").unwrap();
        assert_eq!(h, Header { descr: "|u1".into(), fortran: true, shape: vec![3, 3072] });
        assert!(parse_dict("{'descr': '|u1'}").is_err());
    }

    #[test]
    fn reads_npz_files_and_names_bad_ones() {
        let t = tempfile::tempdir().unwrap();
        let row = 3072;
        let img = |n: usize, salt: u8| (0..n * row).map(|i| (i as u8).wrapping_mul(7) ^ salt).collect::<Vec<u8>>();
        write_npz(&t.path().join(train_file(1)), &img(3, 1), row, &[1, 2, 1000], false).unwrap();
        write_npz(&t.path().join(train_file(2)), &img(2, 2), row, &[5, 6], true).unwrap();
        write_npz(&t.path().join(VAL_FILE), &img(2, 3), row, &[7, 8], true).unwrap();
        let (train, val) = load_dir(t.path()).unwrap();
        assert_eq!(train.size, 32);
        assert_eq!(train.labels, [0, 1, 999, 4, 5]);
        assert_eq!(train.pixels.len(), 5 * row);
        assert_eq!(&train.pixels[3 * row..], &img(2, 2)[..]);
        assert_eq!(val.labels, [6, 7]);
        // A label out of range.
        let bad = t.path().join(VAL_FILE);
        write_npz(&bad, &img(2, 3), row, &[7, 1001], true).unwrap();
        let e = load_dir(t.path()).unwrap_err().to_string();
        assert!(e.contains("val_data.npz") && e.contains("1001"), "{e}");
        write_npz(&bad, &img(1, 3), row, &[0], true).unwrap();
        assert!(load_dir(t.path()).unwrap_err().to_string().contains("label 0"));
        // A truncated file.
        write_npz(&bad, &img(2, 3), row, &[7, 8], false).unwrap();
        let bytes = std::fs::read(&bad).unwrap();
        std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
        let e = load_dir(t.path()).unwrap_err().to_string();
        assert!(e.contains("val_data.npz"), "{e}");
        // A wrong row length, and files of two sizes.
        write_npz(&bad, &[0; 2 * 100], 100, &[7, 8], true).unwrap();
        let e = load_dir(t.path()).unwrap_err().to_string();
        assert!(e.contains("val_data.npz") && e.contains("100 bytes"), "{e}");
        write_npz(&bad, &[0; 12288], 12288, &[7], true).unwrap();
        let e = load_dir(t.path()).unwrap_err().to_string();
        assert!(e.contains("val_data.npz") && e.contains("64×64"), "{e}");
        // A gap in the numbering.
        std::fs::rename(t.path().join(train_file(2)), t.path().join(train_file(3))).unwrap();
        let e = load_dir(t.path()).unwrap_err().to_string();
        assert!(e.contains(&train_file(2)), "{e}");
    }
}
