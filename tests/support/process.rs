//! squire as a child process: the release of a limit (`ulimit -n`), its
//! CPU time, its log, a graceful stop.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// The squire binary running `run -c config`, killed when dropped.
pub struct Squire {
    child: Child,
    log: PathBuf,
}

impl Squire {
    /// Starts it with at most `open_files` file descriptors (`ulimit -n`),
    /// its log (RUST_LOG=info) in `log`.
    pub fn spawn(config: &Path, open_files: Option<u32>, log: PathBuf) -> Squire {
        Squire::spawn_logging(config, open_files, "info", log)
    }

    /// [`Squire::spawn`] with `RUST_LOG` set to `filter`.
    pub fn spawn_logging(
        config: &Path,
        open_files: Option<u32>,
        filter: &str,
        log: PathBuf,
    ) -> Squire {
        let limit = open_files.map_or(String::new(), |n| format!("ulimit -n {n} && "));
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("{limit}exec \"$0\" run -c \"$1\""));
        Squire::start(command, config, &[], filter, log)
    }

    /// Starts it in a mount namespace of its own (needs root, as the tests
    /// run) where `dir/hosts` is `/etc/hosts` and `/etc/resolv.conf` names
    /// a DNS server on loopback that is not there: its host names resolve
    /// as the test writes them, any other name fails at once without a
    /// packet leaving loopback, and nothing else on the machine sees them.
    pub fn spawn_with_hosts(config: &Path, dir: &Path, log: PathBuf) -> Squire {
        let resolv = dir.join("resolv.conf");
        std::fs::write(
            &resolv,
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        )
        .expect("resolv.conf");
        let mut command = Command::new("unshare");
        command.arg("--mount").arg("sh").arg("-c").arg(
            "mount --make-rprivate / && mount --bind \"$2\" /etc/hosts \
             && mount --bind \"$3\" /etc/resolv.conf && exec \"$0\" run -c \"$1\"",
        );
        let hosts = dir.join("hosts");
        Squire::start(command, config, &[&hosts, &resolv], "info", log)
    }

    fn start(
        mut command: Command,
        config: &Path,
        more: &[&Path],
        filter: &str,
        log: PathBuf,
    ) -> Squire {
        let child = command
            .arg(env!("CARGO_BIN_EXE_squire"))
            .arg(config)
            .args(more)
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log file"))
            .spawn()
            .expect("squire starts");
        Squire { child, log }
    }

    /// User + system CPU time so far, in seconds (`/proc/PID/stat`).
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).expect("proc stat");
        // After the parenthesised command name, utime and stime are the
        // 12th and 13th fields (14th and 15th of the line), in clock ticks.
        let after = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = after.split(' ').collect();
        let ticks =
            fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        // SAFETY: sysconf has no preconditions.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        ticks as f64 / per_second
    }

    /// Open file descriptors now (`/proc/PID/fd`).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it has exited (and how).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// SIGHUP: reload the configuration file.
    pub fn hangup(&self) {
        // SAFETY: kill has no memory preconditions; the pid is our child's.
        let sent = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGHUP) };
        assert_eq!(sent, 0, "SIGHUP sent");
    }

    /// SIGTERM, then waits up to `limit` for the exit.
    pub async fn stop(&mut self, limit: Duration) -> ExitStatus {
        // SAFETY: kill has no memory preconditions; the pid is our child's.
        let sent = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(sent, 0, "SIGTERM sent");
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "squire did not exit within {limit:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Squire {
    fn drop(&mut self) {
        // Already gone is fine.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
