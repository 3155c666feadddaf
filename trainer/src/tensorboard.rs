//! TensorBoard event files: `events.out.tfevents.<unix seconds>.<hostname>.<pid>.kutta` in the
//! run folder, so that `tensorboard --logdir runs` shows every run's curves.
//!
//! An event file is a sequence of TFRecords, each one serialized `Event` protobuf:
//!
//! ```text
//! u64 LE length | u32 LE masked CRC32C of those 8 bytes | data | u32 LE masked CRC32C of data
//! ```
//!
//! with mask(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (LevelDB's, so that a CRC of bytes
//! holding CRCs is not a CRC). The messages are declared below with prost's derive, only the
//! fields we write, with the field numbers of TensorBoard's `tensorboard/compat/proto/event.proto`
//! and `summary.proto` (protobuf decoders skip what they do not know, and we write nothing else).
//!
//! Every process writes a file of its own (a resumed run too): first `file_version`
//! "brain.Event:2", then a `SessionLog` START. TensorBoard's Python loader
//! (`event_accumulator._CheckForRestartAndMaybePurge`, with file version ≥ 2) drops, on a START
//! at step s, every event already read with step ≥ s — the events an interrupted process logged
//! past the checkpoint the run continues from, which the resumed process logs again. Files are
//! read in name order, so a new file's name sorts after those already there (`name_seconds`).
//! The Rust loader (`rustboard`, TensorBoard's `--load_fast`) ignores the START and drops instead a
//! series' points from a step that comes again onwards. The START is at the first step the
//! process logs (checkpoint's + 1): TensorBoard keeps only the events with smaller steps.

use crate::error::{Error, Result};
use prost::Message;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// `Event.file_version` of every file: version 2 turns on TensorBoard's SessionLog-based purge.
pub const FILE_VERSION: &str = "brain.Event:2";

/// `tensorboard.Event` (event.proto), only the fields kutta writes.
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    /// Seconds since the UNIX epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5, 7")]
    pub what: Option<What>,
}

/// `Event.what`. (6 is the deprecated `log_message`; `session_log` is 7.)
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

/// `tensorboard.Summary` (summary.proto).
#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<Value>,
}

/// `tensorboard.Summary.Value`: a tag and a scalar. `simple_value` belongs to the oneof `value`
/// there; `optional` encodes the same way and, unlike a plain proto3 float, writes 0.0 too
/// (TensorBoard drops a value whose oneof is unset).
#[derive(Clone, PartialEq, Message)]
pub struct Value {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// `tensorboard.SessionLog`.
#[derive(Clone, PartialEq, Message)]
pub struct SessionLog {
    #[prost(enumeration = "SessionStatus", tag = "1")]
    pub status: i32,
    #[prost(string, tag = "2")]
    pub checkpoint_path: String,
    #[prost(string, tag = "3")]
    pub msg: String,
}

/// `tensorboard.SessionLog.SessionStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum SessionStatus {
    StatusUnspecified = 0,
    Start = 1,
    Stop = 2,
    Checkpoint = 3,
}

/// How every event file's name starts (TensorBoard reads the files whose names hold "tfevents").
const PREFIX: &str = "events.out.tfevents.";

/// The seconds in a new event file's name: now, or one more than those of the newest event file
/// already in `dir` when now is not later (a process started within the same second, or on a
/// machine whose clock is behind). TensorBoard reads a run's files in name order, and its purge of
/// orphaned events needs that to be the order of the processes; the events keep the true time.
fn name_seconds(dir: &Path, now: u64) -> u64 {
    let newest: Option<u64> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok()?.strip_prefix(PREFIX)?.split('.').next()?.parse().ok())
        .max();
    match newest {
        Some(s) if s >= now => s + 1,
        _ => now,
    }
}

/// The masked CRC32C of TFRecords.
pub fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    // (crc >> 15) | (crc << 17), then the delta.
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord holding `data`, appended to `out`.
pub fn frame(data: &[u8], out: &mut Vec<u8>) {
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
}

/// Seconds since the UNIX epoch, now.
fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// This machine's name, for the file name (as TensorFlow's writers put it there): `localhost`
/// when it cannot be had, with anything but `[A-Za-z0-9._-]` replaced by `_`.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name: String = String::from_utf8_lossy(&buf[..end])
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' })
        .collect();
    if ok && !name.is_empty() {
        name
    } else {
        "localhost".into()
    }
}

/// An event file being written: a new file per process (`create`), records buffered until
/// `flush`. Every I/O error is an `Error::Io` naming the file.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
    record: Vec<u8>,
}

impl EventWriter {
    /// A new event file in `dir`, `events.out.tfevents.<unix seconds>.<hostname>.<pid>.kutta`
    /// (see `name_seconds`), holding the `file_version` record, written through.
    pub fn create(dir: &Path) -> Result<Self> {
        let now = unix_now();
        let secs = name_seconds(dir, now as u64);
        let path = dir.join(format!("{PREFIX}{secs:010}.{}.{}.kutta", hostname(), std::process::id()));
        let file = File::options().write(true).create_new(true).open(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = EventWriter { path, out: BufWriter::new(file), record: Vec::new() };
        w.write(&Event { wall_time: now, step: 0, what: Some(What::FileVersion(FILE_VERSION.into())) })?;
        w.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A SessionLog START at `step`: TensorBoard forgets the events of earlier files with
    /// steps ≥ `step` (see the module comment). `checkpoint`: the file the process continues from.
    pub fn session_start(&mut self, step: u64, checkpoint: Option<&Path>, msg: &str) -> Result<()> {
        let log = SessionLog {
            status: SessionStatus::Start as i32,
            checkpoint_path: checkpoint.map(|p| p.display().to_string()).unwrap_or_default(),
            msg: msg.into(),
        };
        self.write(&Event { wall_time: unix_now(), step: step as i64, what: Some(What::SessionLog(log)) })
    }

    /// One event at `step`, now, holding `values` as scalar summaries (f32, as TensorBoard keeps them).
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let value = values.iter().map(|&(tag, v)| Value { tag: tag.into(), simple_value: Some(v as f32) }).collect();
        self.write(&Event { wall_time: unix_now(), step: step as i64, what: Some(What::Summary(Summary { value })) })
    }

    /// `event` as one record (buffered).
    pub fn write(&mut self, event: &Event) -> Result<()> {
        self.record.clear();
        frame(&event.encode_to_vec(), &mut self.record);
        self.out.write_all(&self.record).map_err(|e| Error::io(&self.path, e))
    }

    /// The buffered records to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| Error::io(&self.path, e))
    }

    /// `flush`, then the file's data to the disk (with a checkpoint).
    pub fn sync(&mut self) -> Result<()> {
        self.flush()?;
        self.out.get_ref().sync_data().map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The records of an event file, each checked against both its CRCs: a reader written apart
    /// from `frame`, from the format's description.
    fn read_records(bytes: &[u8]) -> std::result::Result<Vec<Vec<u8>>, String> {
        let mut records = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let header = bytes.get(at..at + 12).ok_or(format!("truncated header at {at}"))?;
            let len_crc = u32::from_le_bytes(header[8..12].try_into().unwrap());
            if masked_crc(&header[..8]) != len_crc {
                return Err(format!("length CRC mismatch at {at}"));
            }
            let len = u64::from_le_bytes(header[..8].try_into().unwrap()) as usize;
            let data = bytes.get(at + 12..at + 12 + len).ok_or(format!("truncated data at {at}"))?;
            let crc = bytes.get(at + 12 + len..at + 16 + len).ok_or(format!("truncated CRC at {at}"))?;
            if masked_crc(data) != u32::from_le_bytes(crc.try_into().unwrap()) {
                return Err(format!("data CRC mismatch at {at}"));
            }
            records.push(data.to_vec());
            at += 16 + len;
        }
        Ok(records)
    }

    fn read_events(path: &Path) -> Vec<Event> {
        let records = read_records(&std::fs::read(path).unwrap()).unwrap();
        records.iter().map(|r| Event::decode(r.as_slice()).unwrap()).collect()
    }

    /// Known values computed elsewhere: RFC 3720's CRC32C of 32 zero bytes (masked by the formula
    /// in Python), the masked CRC TensorFlow wrote for the record of
    /// `Event(file_version="CRC test, one two")` (quoted in TensorBoard's `masked_crc.rs`), and
    /// that record's length and "123456789" masked by a bitwise CRC32C in Python.
    #[test]
    fn masked_crc_matches_known_values() {
        assert_eq!(crc32c::crc32c(&[0; 32]), 0x8a91_36aa);
        assert_eq!(masked_crc(&[0; 32]), 0x0fd7_fffa);
        let data = b"\x1a\x11CRC test, one two";
        assert_eq!(masked_crc(data), 0x5794_d08a);
        assert_eq!(masked_crc(&19u64.to_le_bytes()), 0x1b32_910c);
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
        // And prost encodes that event to exactly those bytes.
        let e = Event { wall_time: 0.0, step: 0, what: Some(What::FileVersion("CRC test, one two".into())) };
        assert_eq!(e.encode_to_vec(), data);
    }

    #[test]
    fn events_read_back_with_their_crcs() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        let name = w.path().file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with("events.out.tfevents.") && name.ends_with(&format!(".{}.kutta", std::process::id())));
        w.session_start(41, Some(Path::new("run/checkpoint-00000040.safetensors")), "resumed").unwrap();
        w.scalars(41, &[("train/loss", 2.5), ("train/epoch", 0.0)]).unwrap();
        w.scalars(50, &[("test/accuracy", 0.875), ("train/h", 1e-3)]).unwrap();
        w.flush().unwrap();

        let events = read_events(w.path());
        assert_eq!(events.len(), 4);
        assert_eq!(events[0].what, Some(What::FileVersion(FILE_VERSION.into())));
        assert!(events[0].wall_time > 1.6e9);
        assert_eq!(events[1].step, 41);
        match &events[1].what {
            Some(What::SessionLog(s)) => {
                assert_eq!(s.status(), SessionStatus::Start);
                assert_eq!(s.checkpoint_path, "run/checkpoint-00000040.safetensors");
            }
            other => panic!("not a session log: {other:?}"),
        }
        let scalars = |e: &Event| match &e.what {
            Some(What::Summary(s)) => s.value.iter().map(|v| (v.tag.clone(), v.simple_value)).collect::<Vec<_>>(),
            other => panic!("not a summary: {other:?}"),
        };
        // 0.0 is written (a plain proto3 float would be left out and TensorBoard would drop it).
        assert_eq!(scalars(&events[2]), [("train/loss".into(), Some(2.5)), ("train/epoch".into(), Some(0.0))]);
        assert_eq!(scalars(&events[3]), [("test/accuracy".into(), Some(0.875)), ("train/h".into(), Some(1e-3f32))]);
        assert_eq!((events[2].step, events[3].step), (41, 50));

        // A second writer within the same second, or with a clock behind, gets a name that sorts
        // after the first's.
        let w2 = EventWriter::create(dir.path()).unwrap();
        assert!(w2.path() > w.path(), "{} !> {}", w2.path().display(), w.path().display());
        let ahead = format!("{PREFIX}{:010}.elsewhere.1.kutta", unix_now() as u64 + 100);
        std::fs::write(dir.path().join(&ahead), b"").unwrap();
        let w3 = EventWriter::create(dir.path()).unwrap();
        assert!(w3.path() > dir.path().join(&ahead), "{}", w3.path().display());

        // Any flipped bit is found by one of the CRCs (or as a truncation).
        let bytes = std::fs::read(w.path()).unwrap();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(read_records(&bad).is_err(), "flipped byte {i} of {} not detected", bytes.len());
        }
    }

    #[test]
    fn an_unwritable_folder_is_an_io_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone");
        match EventWriter::create(&missing) {
            Err(Error::Io { path, .. }) => assert!(path.starts_with(&missing), "{}", path.display()),
            Err(e) => panic!("not an I/O error: {e}"),
            Ok(_) => panic!("created an event file in a folder that does not exist"),
        }
    }
}
