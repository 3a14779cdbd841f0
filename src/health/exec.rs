//! `exec`: run a program (no shell unless configured); exit 0 passes, 1 is a
//! warning, anything else is critical. The program runs in its own process
//! group, and the whole group is killed when the probe is dropped (timeout or
//! shutdown), so a script's children cannot outlive it.

use std::process::Stdio;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use super::probe::{ProbeResult, OUTPUT_MAX};
use super::threshold::Outcome;

pub struct ExecProbe {
    program: String,
    args: Vec<String>,
}

impl ExecProbe {
    pub fn new(program: String, args: Vec<String>) -> Self {
        ExecProbe { program, args }
    }

    pub async fn run(&self) -> ProbeResult {
        let mut child = match Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
        {
            Ok(child) => child,
            Err(e) => return ProbeResult::critical(format!("cannot run {}: {e}", self.program)),
        };
        let mut group = ProcessGroup(child.id());
        // Read both pipes while waiting, bounded, so a chatty program can
        // neither block on a full pipe nor fill our memory.
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let (status, out, err) = tokio::join!(
            child.wait(),
            read_bounded(&mut stdout),
            read_bounded(&mut stderr)
        );
        // Exited and its pipes closed: nothing left to kill, and the id may
        // soon belong to someone else.
        group.0 = None;
        let mut output = String::from_utf8_lossy(&out).into_owned();
        output.push_str(&String::from_utf8_lossy(&err));
        match status {
            Ok(status) => match status.code() {
                Some(0) => ProbeResult::new(Outcome::Passing, output),
                Some(1) => ProbeResult::new(Outcome::Warning, output),
                Some(code) => ProbeResult::critical(format!("exit {code}: {output}")),
                None => ProbeResult::critical(format!("killed by a signal: {output}")),
            },
            Err(e) => ProbeResult::critical(format!("waiting for {}: {e}", self.program)),
        }
    }
}

async fn read_bounded<R: tokio::io::AsyncRead + Unpin>(pipe: &mut Option<R>) -> Vec<u8> {
    let mut kept = Vec::new();
    let Some(pipe) = pipe else { return kept };
    let mut chunk = [0u8; 4096];
    // Keep the first OUTPUT_MAX bytes, drain the rest.
    while let Ok(n) = pipe.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        let room = OUTPUT_MAX.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..n.min(room)]);
    }
    kept
}

/// Kills the probe's process group if dropped before the probe finished
/// (timeout or shutdown). While any member runs, the group id stays taken,
/// so the signal cannot reach anyone else.
struct ProcessGroup(Option<u32>);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.and_then(|id| libc::pid_t::try_from(id).ok()) {
            // SAFETY: killpg only sends a signal; a group that is already
            // gone makes it return ESRCH, which is fine to ignore here.
            unsafe {
                libc::killpg(pgid, libc::SIGKILL);
            }
        }
    }
}
