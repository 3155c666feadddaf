//! Checksums that travel inside kutta's safetensors files (checkpoints and `model.safetensors`),
//! so that a damaged file is an error naming the file and the part that is damaged, never
//! weights silently loaded.
//!
//! Two string entries of the safetensors metadata (`__metadata__`), so that any safetensors
//! reader (PyTorch's `safetensors.torch.load_file`, candle, …) still loads the file unchanged:
//! - `kutta.crc32c.tensors`: a JSON object, tensor name → CRC32C of that tensor's bytes as 8 hex
//!   digits;
//! - `kutta.crc32c.header`: 8 hex digits, the CRC32C of every byte before the tensor data (the
//!   8-byte length prefix and the whole JSON header, padding included) computed with these 8
//!   digits read as `00000000`. Written by serializing with the placeholder and patching the
//!   digits in place (same length, so no offset moves).
//!
//! The header's JSON is written with its keys sorted (`canonical`): safetensors takes the metadata
//! as a `HashMap` and writes it in the map's random order, so the same weights would otherwise
//! give different files from run to run.
//!
//! Every such file is written atomically (`write_atomic`: a temporary file, fsync, rename).
//!
//! Every byte of a file is covered: the header by the header checksum (the tensors' checksums
//! are in it), the data by the tensors' checksums (safetensors requires the tensors to tile the
//! data exactly). CRC32C detects every error within a 32-bit burst, so every single-byte change.

use safetensors::tensor::{SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::Path;

use crate::error::{Error, Result as KResult};

/// Metadata key of the header checksum.
pub const HEADER_KEY: &str = "kutta.crc32c.header";
/// Metadata key of the tensors' checksums.
pub const TENSORS_KEY: &str = "kutta.crc32c.tensors";
/// Present in every header kutta checksummed; when the exact header entry cannot be found but
/// this can, the header is damaged (rather than written by another tool).
const FAMILY: &[u8] = b"kutta.crc32c.";
const PLACEHOLDER: &[u8; 8] = b"00000000";

/// What `verify` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verified {
    /// The header and every tensor match their checksums.
    Intact,
    /// The file carries no kutta checksums at all (written by another tool or an older kutta).
    Unchecked,
}

fn hex(x: u32) -> String {
    format!("{x:08x}")
}

/// The JSON header's search pattern for the header checksum's value.
fn pattern() -> Vec<u8> {
    format!("\"{HEADER_KEY}\":\"").into_bytes()
}

/// `safetensors::serialize` with the checksums added to `metadata`.
pub fn serialize(
    views: Vec<(String, TensorView<'_>)>,
    mut metadata: HashMap<String, String>,
) -> Result<Vec<u8>, String> {
    let sums: BTreeMap<&str, String> = views.iter().map(|(n, v)| (n.as_str(), hex(crc32c::crc32c(v.data())))).collect();
    metadata.insert(TENSORS_KEY.into(), serde_json::to_string(&sums).map_err(|e| e.to_string())?);
    metadata.insert(HEADER_KEY.into(), String::from_utf8_lossy(PLACEHOLDER).into_owned());
    let mut bytes = canonical(safetensors::serialize(views, Some(metadata)).map_err(|e| e.to_string())?)?;
    let (end, at) = match locate(&bytes) {
        Ok(Some(found)) => found,
        _ => return Err("internal: the header checksum entry is not where it was written".into()),
    };
    let sum = crc32c::crc32c(&bytes[..end]);
    bytes[at..at + 8].copy_from_slice(hex(sum).as_bytes());
    Ok(bytes)
}

/// `bytes` (a safetensors file) with the JSON header rewritten with every object's keys sorted
/// and padded with spaces to a multiple of 8 bytes, as safetensors pads it; the data is
/// unchanged (its offsets are relative to the end of the header).
fn canonical(bytes: Vec<u8>) -> Result<Vec<u8>, String> {
    fn sorted(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let mut entries: Vec<(String, serde_json::Value)> =
                    m.into_iter().map(|(k, v)| (k, sorted(v))).collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                serde_json::Value::Object(entries.into_iter().collect())
            }
            other => other,
        }
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("safetensors writes 8 length bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).map_err(|e| e.to_string())?;
    let mut json = serde_json::to_vec(&sorted(header)).map_err(|e| e.to_string())?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// The end of the header (8 + its length) and the position of the header checksum's 8 digits;
/// `None` when the header has no such entry. Errors describe a damaged length prefix or entry.
fn locate(bytes: &[u8]) -> Result<Option<(usize, usize)>, String> {
    if bytes.len() < 8 {
        return Err(format!(
            "the header is damaged or the file truncated: {} bytes, not even the 8-byte header length",
            bytes.len()
        ));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let end =
        usize::try_from(n).ok().and_then(|n| n.checked_add(8)).filter(|&e| e <= bytes.len()).ok_or_else(|| {
            format!(
                "the header is damaged or the file truncated: the header length field says {n} bytes, the file has {}",
                bytes.len()
            )
        })?;
    let header = &bytes[8..end];
    let pat = pattern();
    let mut hits = header.windows(pat.len()).enumerate().filter(|(_, w)| *w == pat.as_slice()).map(|(i, _)| i);
    let Some(first) = hits.next() else {
        if header.windows(FAMILY.len()).any(|w| w == FAMILY) {
            return Err(format!("the header is damaged: its `{HEADER_KEY}` entry is unreadable"));
        }
        return Ok(None);
    };
    if hits.next().is_some() {
        return Err(format!("the header is damaged: `{HEADER_KEY}` appears twice"));
    }
    let at = 8 + first + pat.len();
    if at + 8 >= end || bytes[at + 8] != b'"' {
        return Err(format!("the header is damaged: its `{HEADER_KEY}` entry is not 8 hex digits"));
    }
    Ok(Some((end, at)))
}

/// Check `bytes` (a whole safetensors file) against the checksums it carries. `Err` describes the
/// damage: "the header is damaged (…)" or "tensor `NAME` is damaged (…)".
pub fn verify(bytes: &[u8]) -> Result<Verified, String> {
    let Some((end, at)) = locate(bytes)? else {
        // No checksums: fine for a file another tool wrote, if it is a readable file at all.
        return match SafeTensors::deserialize(bytes) {
            Ok(_) => Ok(Verified::Unchecked),
            Err(e) => {
                Err(format!("the header is damaged or the file truncated: not a readable safetensors file ({e})"))
            }
        };
    };
    let mut sum = crc32c::crc32c(&bytes[..at]);
    sum = crc32c::crc32c_append(sum, PLACEHOLDER);
    sum = crc32c::crc32c_append(sum, &bytes[at + 8..end]);
    // Compared as written (lower-case digits), so that a changed letter case is caught too.
    let recorded = &bytes[at..at + 8];
    if hex(sum).as_bytes() != recorded {
        return Err(format!(
            "the header is damaged (CRC32C {}, recorded {})",
            hex(sum),
            String::from_utf8_lossy(recorded)
        ));
    }
    // The header is as written; what can still be wrong is the data (or its length).
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| format!("the file is truncated or extended past its header: {e}"))?;
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| format!("the header is damaged: {e}"))?;
    let sums: HashMap<String, String> = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(TENSORS_KEY))
        .ok_or_else(|| format!("the header has no `{TENSORS_KEY}` entry"))
        .and_then(|s| {
            serde_json::from_str(s).map_err(|e| format!("the header's `{TENSORS_KEY}` entry is not readable: {e}"))
        })?;
    let mut names = st.names();
    names.sort_unstable();
    for name in &names {
        let recorded = sums.get(*name).ok_or_else(|| format!("tensor `{name}` has no recorded checksum"))?;
        let view = st.tensor(name).map_err(|e| format!("tensor `{name}`: {e}"))?;
        let sum = hex(crc32c::crc32c(view.data()));
        if &sum != recorded {
            return Err(format!("tensor `{name}` is damaged (CRC32C {sum}, recorded {recorded})"));
        }
    }
    if let Some(extra) = sums.keys().find(|k| !names.contains(&k.as_str())) {
        return Err(format!("the header records a checksum for tensor `{extra}`, which the file does not hold"));
    }
    Ok(Verified::Intact)
}

pub fn f32_to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn bytes_to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Write `bytes` to `path` atomically: a temporary file `<path>.tmp` in the same directory,
/// fsync, rename, fsync of the directory. On failure (disk full, a file-size limit) the temporary
/// file is removed and `path`, if it existed, is untouched; the error names `path` and the cause.
/// A second stop signal during the write removes the temporary file too (`stop::PartialWrite`).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> KResult<()> {
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    let _partial = crate::stop::PartialWrite::new(&tmp);
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    // The rename itself reaches the disk with the directory (best effort: not every file system
    // lets a directory be opened for fsync).
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::Dtype;

    fn sample() -> Vec<u8> {
        let a: Vec<u8> = (0..64u32).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect();
        let b: Vec<u8> = (0..6u32).flat_map(|i| (-(i as f32)).to_le_bytes()).collect();
        let views = vec![
            ("a.weight".to_string(), TensorView::new(Dtype::F32, vec![8, 8], &a).unwrap()),
            ("b".to_string(), TensorView::new(Dtype::F32, vec![6], &b).unwrap()),
        ];
        serialize(views, HashMap::from([("note".to_string(), "x".to_string())])).unwrap()
    }

    #[test]
    fn written_files_verify_and_stay_plain_safetensors() {
        let bytes = sample();
        assert!(bytes == sample(), "the same tensors and metadata give the same bytes");
        assert_eq!(verify(&bytes), Ok(Verified::Intact));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("a.weight").unwrap().shape(), [8, 8]);
        let plain = safetensors::serialize(vec![("b", st.tensor("b").unwrap())], None).unwrap();
        assert_eq!(verify(&plain), Ok(Verified::Unchecked));
    }

    /// Every byte of the file, changed in each of several ways, is caught, and the message says
    /// whether the header or which tensor is damaged.
    #[test]
    fn every_single_byte_change_is_detected() {
        let bytes = sample();
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for pos in 0..bytes.len() {
            for mask in [0x01u8, 0x80, 0xff, 0x20] {
                let mut bad = bytes.clone();
                bad[pos] ^= mask;
                let e = verify(&bad).expect_err(&format!("byte {pos} ^ {mask:#x} not detected"));
                if pos < header_end {
                    assert!(e.contains("header") || e.contains("truncated"), "byte {pos}: {e}");
                } else {
                    let t = if pos < header_end + 256 { "a.weight" } else { "b" };
                    assert!(e.contains(&format!("tensor `{t}`")), "byte {pos}: {e}");
                }
            }
        }
        assert!(verify(&bytes[..bytes.len() - 1]).is_err());
        assert!(verify(&bytes[..5]).is_err());
    }
}
