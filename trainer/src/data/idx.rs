//! Reader for IDX files, the big-endian format of the MNIST family (MNIST, Fashion-MNIST, …):
//! `u8` image files (magic 0x00000803, dims `[n, rows, cols]`) and `u8` label files (magic
//! 0x00000801, dims `[n]`), raw or gzip-compressed (detected by the bytes 0x1f 0x8b, not by the
//! file name).
//!
//! Data files are user input, so every fault (missing, unreadable, corrupt gzip, short header,
//! wrong magic, zero or absurd dimensions, truncated payload, trailing bytes) comes back as an
//! `Err` naming the file and the fault, never a panic. The header's sizes are multiplied with
//! overflow checks and compared with the bytes actually read before anything is allocated from
//! them, so a corrupt header cannot trigger a giant allocation.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Magic number of an IDX file of `u8` with 3 dimensions (images `[n, rows, cols]`).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of `u8` with 1 dimension (labels `[n]`).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// The first two bytes of every gzip stream.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The images of one IDX image file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxImages {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    /// `count × rows × cols` pixels, row-major, one byte each (0 = background for MNIST).
    pub pixels: Vec<u8>,
}

/// Reads an IDX image file (`u8`, dims `[n, rows, cols]`), raw or gzip-compressed.
pub fn read_images(path: &Path) -> Result<IdxImages> {
    let bytes = read_maybe_gzip(path)?;
    let (dims, pixels) = parse(path, bytes, Kind::Images)?;
    Ok(IdxImages { count: dims[0], rows: dims[1], cols: dims[2], pixels })
}

/// Reads an IDX label file (`u8`, dims `[n]`), raw or gzip-compressed.
pub fn read_labels(path: &Path) -> Result<Vec<u8>> {
    let bytes = read_maybe_gzip(path)?;
    let (_dims, labels) = parse(path, bytes, Kind::Labels)?;
    Ok(labels)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Images,
    Labels,
}

impl Kind {
    fn magic(self) -> u32 {
        match self {
            Kind::Images => IMAGES_MAGIC,
            Kind::Labels => LABELS_MAGIC,
        }
    }
    fn ndims(self) -> usize {
        match self {
            Kind::Images => 3,
            Kind::Labels => 1,
        }
    }
    fn what(self) -> &'static str {
        match self {
            Kind::Images => "image",
            Kind::Labels => "label",
        }
    }
    fn dim_names(self) -> &'static [&'static str] {
        match self {
            Kind::Images => &["count", "rows", "cols"],
            Kind::Labels => &["count"],
        }
    }
}

/// The whole file, decompressed if it starts with the gzip magic.
fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    let raw = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::data(path, "not found"));
        }
        Err(e) => return Err(Error::io(path, e)),
    };
    if raw.len() >= 2 && raw[..2] == GZIP_MAGIC {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::data(path, format!("corrupt gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// The dimensions of an IDX image file, (count, rows, cols), from its header alone (the file is
/// read only that far, through the gzip stream if it is compressed): what the memory planner
/// needs without loading the data.
pub fn read_image_dims(path: &Path) -> Result<[usize; 3]> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::data(path, "not found")),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut reader = std::io::BufReader::new(file);
    let gzip = std::io::BufRead::fill_buf(&mut reader).map_err(|e| Error::io(path, e))?.starts_with(&GZIP_MAGIC);
    let reader: Box<dyn Read> =
        if gzip { Box::new(flate2::read::MultiGzDecoder::new(reader)) } else { Box::new(reader) };
    let mut header = Vec::with_capacity(16);
    reader
        .take(16)
        .read_to_end(&mut header)
        .map_err(|e| Error::data(path, format!("cannot read the IDX header: {e}")))?;
    let dims = parse_header(path, &header, Kind::Images)?;
    Ok([dims[0], dims[1], dims[2]])
}

/// Checks the header at the start of `bytes` against `kind` and returns the dimensions.
fn parse_header(path: &Path, bytes: &[u8], kind: Kind) -> Result<Vec<usize>> {
    let ndims = kind.ndims();
    let header_len = 4 + 4 * ndims;
    if bytes.len() < 4 {
        return Err(Error::data(
            path,
            format!(
                "file is shorter than the IDX header: {} bytes, expected at least {header_len} \
                 (truncated or empty file)",
                bytes.len()
            ),
        ));
    }
    let magic = be_u32(&bytes[0..4]);
    if magic != kind.magic() {
        return Err(Error::data(path, magic_message(magic, kind)));
    }
    if bytes.len() < header_len {
        return Err(Error::data(
            path,
            format!(
                "file is shorter than the IDX {} header: {} bytes, expected at least {header_len} \
                 (truncated)",
                kind.what(),
                bytes.len()
            ),
        ));
    }

    let mut dims = Vec::with_capacity(ndims);
    for (i, name) in kind.dim_names().iter().enumerate() {
        let d = be_u32(&bytes[4 + 4 * i..8 + 4 * i]);
        if d == 0 {
            return Err(Error::data(
                path,
                format!("zero dimension in the IDX header: {name} = 0 (an empty or corrupt file)"),
            ));
        }
        dims.push(
            usize::try_from(d)
                .map_err(|_| Error::data(path, format!("IDX header dimension {name} = {d} does not fit in memory")))?,
        );
    }
    Ok(dims)
}

/// Checks the header of `bytes` against `kind` and returns the dimensions and the payload.
fn parse(path: &Path, mut bytes: Vec<u8>, kind: Kind) -> Result<(Vec<usize>, Vec<u8>)> {
    let dims = parse_header(path, &bytes, kind)?;
    let header_len = 4 + 4 * kind.ndims();
    let expected = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(|| {
        Error::data(path, format!("IDX header promises an absurd payload size (dims {dims:?} overflow)"))
    })?;

    let found = bytes.len() - header_len;
    if found < expected {
        return Err(Error::data(
            path,
            format!(
                "truncated: the header (dims {dims:?}) promises {expected} bytes of {} data after \
                 the {header_len}-byte header, found {found}",
                kind.what()
            ),
        ));
    }
    if found > expected {
        return Err(Error::data(
            path,
            format!(
                "{} trailing bytes after the payload: the header (dims {dims:?}) promises \
                 {expected} bytes after the {header_len}-byte header, found {found}",
                found - expected
            ),
        ));
    }
    bytes.drain(..header_len);
    Ok((dims, bytes))
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn magic_message(found: u32, kind: Kind) -> String {
    let expected = kind.magic();
    let mut msg = format!(
        "wrong magic number 0x{found:08x} ({found}), expected 0x{expected:08x} ({expected}) for an \
         IDX {} file",
        kind.what()
    );
    match (kind, found) {
        (Kind::Images, LABELS_MAGIC) => {
            msg.push_str("; this is an IDX label file: were the image and label files swapped?")
        }
        (Kind::Labels, IMAGES_MAGIC) => {
            msg.push_str("; this is an IDX image file: were the image and label files swapped?")
        }
        _ if found >> 16 == 0 => {
            // Looks like IDX, with another element type (byte 2) or rank (byte 3).
            msg.push_str(&format!(
                "; the file looks like IDX with element type 0x{:02x} and {} dimension(s), but \
                 only u8 (0x08) with {} dimension(s) is supported here",
                (found >> 8) & 0xff,
                found & 0xff,
                kind.ndims()
            ))
        }
        _ => msg.push_str("; not an IDX file (or a corrupt one)"),
    }
    msg
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// Bytes of an IDX file with the given magic, dims and payload.
    pub(crate) fn idx_bytes(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
        let mut b = magic.to_be_bytes().to_vec();
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(payload);
        b
    }

    pub(crate) fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn err_of<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.expect_err("expected an error").to_string()
    }

    fn assert_msg(msg: &str, file: &str, keyword: &str) {
        assert!(msg.contains(file), "message does not name the file `{file}`: {msg}");
        assert!(msg.to_lowercase().contains(keyword), "message does not contain `{keyword}`: {msg}");
    }

    fn sample_images() -> (Vec<u8>, Vec<u8>) {
        let pixels: Vec<u8> = (0..2 * 3 * 4).map(|i| (i * 10) as u8).collect();
        (idx_bytes(IMAGES_MAGIC, &[2, 3, 4], &pixels), pixels)
    }

    #[test]
    fn reads_raw_and_gzip_images() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, pixels) = sample_images();
        for (name, b) in [("raw-images", bytes.clone()), ("gz-images.gz", gzip(&bytes))] {
            let p = write(dir.path(), name, &b);
            let im = read_images(&p).unwrap();
            assert_eq!((im.count, im.rows, im.cols), (2, 3, 4));
            assert_eq!(im.pixels, pixels);
        }
    }

    #[test]
    fn image_dims_from_the_header_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, _) = sample_images();
        for (name, b) in [("raw-images", bytes.clone()), ("gz-images.gz", gzip(&bytes))] {
            assert_eq!(read_image_dims(&write(dir.path(), name, &b)).unwrap(), [2, 3, 4]);
        }
        // The payload is not read: a header promising more data still gives its dims.
        assert_eq!(read_image_dims(&write(dir.path(), "short", &bytes[..16])).unwrap(), [2, 3, 4]);
        assert_msg(&err_of(read_image_dims(&write(dir.path(), "cut", &bytes[..10]))), "cut", "shorter");
        let labels = idx_bytes(LABELS_MAGIC, &[2], &[1, 2]);
        assert_msg(&err_of(read_image_dims(&write(dir.path(), "labels", &labels))), "labels", "magic");
        assert_msg(&err_of(read_image_dims(&dir.path().join("absent"))), "absent", "not found");
    }

    #[test]
    fn reads_raw_and_gzip_labels() {
        let dir = tempfile::tempdir().unwrap();
        let labels = vec![3u8, 1, 4, 1, 5];
        let bytes = idx_bytes(LABELS_MAGIC, &[5], &labels);
        // Gzip is detected from the content, not the name.
        for (name, b) in [("raw-labels", bytes.clone()), ("gz-labels", gzip(&bytes))] {
            let p = write(dir.path(), name, &b);
            assert_eq!(read_labels(&p).unwrap(), labels);
        }
    }

    #[test]
    fn multi_member_gzip_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let labels = vec![0u8, 1, 2, 3, 4, 5];
        let bytes = idx_bytes(LABELS_MAGIC, &[6], &labels);
        let mut gz = gzip(&bytes[..7]);
        gz.extend(gzip(&bytes[7..]));
        let p = write(dir.path(), "multi.gz", &gz);
        assert_eq!(read_labels(&p).unwrap(), labels);
    }

    #[test]
    fn missing_file_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nope-images");
        assert_msg(&err_of(read_images(&p)), "nope-images", "not found");
        assert_msg(&err_of(read_labels(&p)), "nope-images", "not found");
    }

    #[test]
    fn unreadable_path_is_an_error() {
        // A directory opens but cannot be read.
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a-directory");
        std::fs::create_dir(&sub).unwrap();
        assert_msg(&err_of(read_images(&sub)), "a-directory", "a-directory");
    }

    #[test]
    fn corrupt_gzip_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, _) = sample_images();
        let gz = gzip(&bytes);
        // Cut the stream short.
        let p = write(dir.path(), "cut.gz", &gz[..gz.len() / 2]);
        let msg = err_of(read_images(&p));
        assert_msg(&msg, "cut.gz", "gzip");
        assert_msg(&msg, "cut.gz", "corrupt");
        // Garbage after the gzip magic.
        let p = write(dir.path(), "garbage.gz", &[0x1f, 0x8b, 0xff, 0x00, 0x13, 0x37, 0x00]);
        assert_msg(&err_of(read_labels(&p)), "garbage.gz", "gzip");
        // A flipped byte in the deflate body or CRC.
        let mut flipped = gz.clone();
        let k = flipped.len() - 6;
        flipped[k] ^= 0xff;
        let p = write(dir.path(), "flipped.gz", &flipped);
        assert_msg(&err_of(read_images(&p)), "flipped.gz", "gzip");
    }

    #[test]
    fn short_header_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "empty-file", &[]);
        assert_msg(&err_of(read_images(&p)), "empty-file", "shorter than the idx header");
        let p = write(dir.path(), "two-bytes", &[0, 0]);
        assert_msg(&err_of(read_labels(&p)), "two-bytes", "header");
        // Right magic, but the dims are cut off.
        let bytes = idx_bytes(IMAGES_MAGIC, &[2, 3], &[]);
        let p = write(dir.path(), "half-header", &bytes);
        assert_msg(&err_of(read_images(&p)), "half-header", "truncated");
    }

    #[test]
    fn wrong_magic_says_found_expected_and_swapped() {
        let dir = tempfile::tempdir().unwrap();
        let labels = idx_bytes(LABELS_MAGIC, &[2], &[1, 2]);
        let p = write(dir.path(), "labels-as-images", &labels);
        let msg = err_of(read_images(&p));
        assert_msg(&msg, "labels-as-images", "magic");
        assert!(msg.contains("0x00000801") && msg.contains("0x00000803"), "{msg}");
        assert!(msg.contains("swapped"), "{msg}");

        let (images, _) = sample_images();
        let p = write(dir.path(), "images-as-labels.gz", &gzip(&images));
        let msg = err_of(read_labels(&p));
        assert_msg(&msg, "images-as-labels.gz", "magic");
        assert!(msg.contains("swapped"), "{msg}");

        let p = write(dir.path(), "float-images", &idx_bytes(0x0d03, &[1, 1, 1], &[0; 4]));
        let msg = err_of(read_images(&p));
        assert_msg(&msg, "float-images", "magic");
        assert!(msg.contains("0x00000d03"), "{msg}");

        let p = write(dir.path(), "png-file", b"\x89PNG\r\n\x1a\n....");
        assert_msg(&err_of(read_images(&p)), "png-file", "not an idx file");
    }

    #[test]
    fn zero_dimensions_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        for (i, dims) in [[0u32, 3, 4], [2, 0, 4], [2, 3, 0]].iter().enumerate() {
            let name = format!("zero-{i}");
            let p = write(dir.path(), &name, &idx_bytes(IMAGES_MAGIC, dims, &[]));
            assert_msg(&err_of(read_images(&p)), &name, "zero");
        }
        let p = write(dir.path(), "zero-labels", &idx_bytes(LABELS_MAGIC, &[0], &[]));
        assert_msg(&err_of(read_labels(&p)), "zero-labels", "zero");
    }

    #[test]
    fn truncated_payload_says_expected_and_found() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, _) = sample_images();
        let p = write(dir.path(), "short-images.gz", &gzip(&bytes[..bytes.len() - 5]));
        let msg = err_of(read_images(&p));
        assert_msg(&msg, "short-images.gz", "truncated");
        assert!(msg.contains("24") && msg.contains("19"), "{msg}");

        let p = write(dir.path(), "short-labels", &idx_bytes(LABELS_MAGIC, &[10], &[1, 2, 3]));
        let msg = err_of(read_labels(&p));
        assert_msg(&msg, "short-labels", "truncated");
        assert!(msg.contains("10") && msg.contains('3'), "{msg}");
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (mut bytes, _) = sample_images();
        bytes.extend_from_slice(&[9, 9, 9]);
        let p = write(dir.path(), "long-images", &bytes);
        let msg = err_of(read_images(&p));
        assert_msg(&msg, "long-images", "trailing");
        assert!(msg.contains("3 trailing"), "{msg}");
    }

    #[test]
    fn absurd_header_sizes_do_not_allocate_or_panic() {
        let dir = tempfile::tempdir().unwrap();
        let max = u32::MAX;
        let p = write(dir.path(), "huge-images", &idx_bytes(IMAGES_MAGIC, &[max, max, max], &[1]));
        let msg = err_of(read_images(&p));
        assert!(msg.contains("huge-images"), "{msg}");
        assert!(msg.contains("absurd") || msg.contains("truncated"), "{msg}");
        let p = write(dir.path(), "huge-labels", &idx_bytes(LABELS_MAGIC, &[max], &[1, 2]));
        assert_msg(&err_of(read_labels(&p)), "huge-labels", "truncated");
    }
}
