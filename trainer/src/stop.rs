//! Stopping a run gracefully on SIGTERM, SIGINT and SIGUSR1 (what Slurm sends before a time
//! limit or a preemption, Ctrl-C, and the signal `mpirun` forwards to every rank).
//!
//! The first signal only sets a flag (and says so on stderr): the optimizer step in progress
//! finishes, then every rank agrees on the stop (`agree`: one f64 all-reduce per step on several
//! ranks, since a scheduler may signal one rank only, or all of them at slightly different
//! times), so all ranks stop after the *same* step; the trainer writes a checkpoint, marks
//! `summary.json` "interrupted" and the process exits with 128 + the signal's number, as a shell
//! expects (143, 130, 138). A second signal exits at once with that status, removing a
//! checkpoint's temporary file if one is being written (`PartialWrite`): the previous
//! checkpoint stays intact.
//!
//! The handler does only async-signal-safe things: atomics, write(2), unlink(2), _exit(2).

use crate::error::{Error, Result};
use kutta_collectives::Communicator;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicI32, AtomicPtr, Ordering::SeqCst};

/// The signals that stop a run, in the order of precedence when ranks received different ones.
pub const SIGNALS: [(i32, &str); 3] =
    [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT"), (libc::SIGUSR1, "SIGUSR1")];

/// The first stop signal this process received (0: none).
static PENDING: AtomicI32 = AtomicI32::new(0);
/// The temporary file being written, if any (a leaked `CString`; see `PartialWrite`).
static PARTIAL: AtomicPtr<libc::c_char> = AtomicPtr::new(null_mut());

/// Install the handlers (once per process; `kutta train` calls it after joining its MPI world,
/// so that they replace whatever the MPI library installed). Also ignores SIGXFSZ, so that a
/// write past a file-size limit (`ulimit -f`, RLIMIT_FSIZE) fails with an error the trainer
/// reports instead of killing the process.
pub fn install() -> Result<()> {
    for (sig, _) in SIGNALS {
        // SAFETY: the action only touches atomics and calls async-signal-safe functions.
        unsafe { signal_hook::low_level::register(sig, move || on_signal(sig)) }
            .map_err(|e| Error::Signal(format!("cannot install the {} handler: {e}", name(sig))))?;
    }
    // SAFETY: setting a signal's disposition to SIG_IGN.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    Ok(())
}

fn on_signal(sig: i32) {
    let first = PENDING.compare_exchange(0, sig, SeqCst, SeqCst).is_ok();
    if first {
        let msg: &[u8] = match sig {
            libc::SIGTERM => b"\nkutta: SIGTERM received: stopping after the step in progress and writing a checkpoint (a second signal exits at once)\n",
            libc::SIGINT => b"\nkutta: SIGINT received: stopping after the step in progress and writing a checkpoint (a second signal exits at once)\n",
            _ => b"\nkutta: SIGUSR1 received: stopping after the step in progress and writing a checkpoint (a second signal exits at once)\n",
        };
        // SAFETY: write(2) on stderr is async-signal-safe; a short write only shortens the note.
        unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
        return;
    }
    let say = |msg: &[u8]| {
        // SAFETY: write(2) on stderr is async-signal-safe.
        unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    };
    say(b"\nkutta: second signal: exiting at once");
    let partial = PARTIAL.swap(null_mut(), SeqCst);
    if !partial.is_null() {
        // SAFETY: a NUL-terminated path that `PartialWrite` leaked and no longer frees (swapped
        // out), so it stays valid; unlink(2) is async-signal-safe, and so is reading its bytes.
        let path = unsafe {
            libc::unlink(partial);
            std::slice::from_raw_parts(partial.cast::<u8>(), libc::strlen(partial))
        };
        say(b"; removed the partial write ");
        say(path);
    }
    say(b"; the last complete checkpoint is intact\n");
    signal_hook::low_level::exit(128 + sig);
}

/// The stop signal this process received, if any.
pub fn pending() -> Option<i32> {
    Some(PENDING.load(SeqCst)).filter(|&s| s != 0)
}

/// Act as if `sig` had been received (for tests of the training loop).
pub fn request(sig: i32) {
    let _ = PENDING.compare_exchange(0, sig, SeqCst, SeqCst);
}

/// "SIGTERM" for 15, and so on.
pub fn name(sig: i32) -> &'static str {
    SIGNALS.iter().find(|(s, _)| *s == sig).map_or("signal", |(_, n)| n)
}

/// 15 for "SIGTERM", and so on.
pub fn number(name: &str) -> Option<i32> {
    SIGNALS.iter().find(|(_, n)| *n == name).map(|(s, _)| *s)
}

/// The exit status of a process stopped by `sig`, as a shell reports it.
pub fn exit_status(sig: i32) -> i32 {
    128 + sig
}

/// The stop signal every rank agrees on after this step: `None` when no rank received one,
/// else the received signal of highest precedence (`SIGNALS`). Collective on several ranks
/// (one f64 all-reduce); free on one.
pub fn agree(comm: &dyn Communicator) -> Result<Option<i32>> {
    let mine = pending();
    if comm.world_size() == 1 {
        return Ok(mine);
    }
    // Count, per signal, the ranks that received it: digit k (base N+1) counts SIGNALS[k].
    let base = comm.world_size() as f64 + 1.0;
    Ok(decode(comm.all_reduce_sum_f64(encode(mine, base))?, base))
}

/// A rank's contribution: base^k for SIGNALS[k], 0 for none.
fn encode(sig: Option<i32>, base: f64) -> f64 {
    sig.and_then(|s| SIGNALS.iter().position(|(x, _)| *x == s)).map_or(0.0, |k| base.powi(k as i32))
}

/// The signal of highest precedence whose digit (base `base`) in `total` is not zero.
fn decode(total: f64, base: f64) -> Option<i32> {
    let mut total = total.round();
    for (sig, _) in SIGNALS {
        if total % base != 0.0 {
            return Some(sig);
        }
        total = (total / base).floor();
    }
    None
}

/// The first stop signal `kutta launch` received and passed on (0: none); see `forward_to`.
static FORWARDED: AtomicI32 = AtomicI32::new(0);

/// For a launcher (`kutta launch`): from now on SIGTERM, SIGINT and SIGUSR1 to this process are
/// passed to `pid` (mpirun) as SIGUSR1, which mpirun forwards to every rank: the first stops the
/// run gracefully, a second makes the ranks exit at once. (SIGTERM or SIGINT to mpirun itself
/// would make Open MPI kill the ranks after a short grace period.) `launcher_exit_status` turns
/// mpirun's status into that of the signal that came first.
pub fn forward_to(pid: u32) -> Result<()> {
    let pid = pid as libc::pid_t;
    for (sig, _) in SIGNALS {
        // SAFETY: atomics and kill(2), which is async-signal-safe.
        unsafe {
            signal_hook::low_level::register(sig, move || {
                let _ = FORWARDED.compare_exchange(0, sig, SeqCst, SeqCst);
                libc::kill(pid, libc::SIGUSR1);
            })
        }
        .map_err(|e| Error::Signal(format!("cannot install the {} handler: {e}", name(sig))))?;
    }
    Ok(())
}

/// The exit status a launcher reports for mpirun's `code`: a job that `forward_to` stopped (its
/// ranks exit with SIGUSR1's status) exits as a process stopped by the signal the launcher
/// received (130 for Ctrl-C); anything else as mpirun did.
pub fn launcher_exit_status(code: i32) -> i32 {
    match FORWARDED.load(SeqCst) {
        0 => code,
        sig if code == exit_status(libc::SIGUSR1) => exit_status(sig),
        _ => code,
    }
}

/// While alive, a second signal removes `path` (a temporary file being written) before exiting.
pub struct PartialWrite(());

impl PartialWrite {
    pub fn new(path: &Path) -> Self {
        if let Ok(c) = CString::new(path.as_os_str().as_bytes()) {
            let old = PARTIAL.swap(c.into_raw(), SeqCst);
            if !old.is_null() {
                // SAFETY: swapped out of PARTIAL, so the handler can no longer see it.
                drop(unsafe { CString::from_raw(old) });
            }
        }
        PartialWrite(())
    }
}

impl Drop for PartialWrite {
    fn drop(&mut self) {
        let p = PARTIAL.swap(null_mut(), SeqCst);
        if !p.is_null() {
            // SAFETY: as in `new`.
            drop(unsafe { CString::from_raw(p) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kutta_collectives::LocalGroup;

    #[test]
    fn names_and_statuses() {
        assert_eq!(exit_status(number("SIGTERM").unwrap()), 143);
        assert_eq!(exit_status(number("SIGINT").unwrap()), 130);
        assert_eq!(exit_status(number("SIGUSR1").unwrap()), 138);
        assert_eq!(name(libc::SIGUSR1), "SIGUSR1");
        assert_eq!(number("SIGKILL"), None);
    }

    /// Ranks that received different signals (or none) all agree on the same one.
    #[test]
    fn ranks_agree_on_one_signal() {
        for (signals, want) in [
            (vec![0, 0, 0], None),
            (vec![0, libc::SIGUSR1, 0], Some(libc::SIGUSR1)),
            (vec![libc::SIGUSR1, libc::SIGINT, libc::SIGUSR1], Some(libc::SIGINT)),
            (vec![libc::SIGINT, libc::SIGTERM, libc::SIGUSR1], Some(libc::SIGTERM)),
            (vec![libc::SIGINT, libc::SIGINT, libc::SIGINT], Some(libc::SIGINT)),
        ] {
            let handles: Vec<_> = LocalGroup::new(signals.len())
                .into_iter()
                .map(|comm| {
                    let s = signals[comm.rank()];
                    // Thread ranks share the process's flag, so each encodes its own signal here.
                    std::thread::spawn(move || {
                        let base = comm.world_size() as f64 + 1.0;
                        decode(comm.all_reduce_sum_f64(encode(Some(s).filter(|&s| s != 0), base)).unwrap(), base)
                    })
                })
                .collect();
            let got: Vec<Option<i32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            assert!(got.iter().all(|g| *g == want), "{signals:?}: {got:?}");
        }
    }
}
