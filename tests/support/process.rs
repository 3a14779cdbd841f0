//! squire as a child process: the release of a limit (`ulimit -n`), its
//! CPU time, its log.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The squire binary running `run -c config`, killed when dropped.
pub struct Squire {
    child: Child,
    log: PathBuf,
}

impl Squire {
    /// Starts it with at most `open_files` file descriptors (`ulimit -n`),
    /// its log (RUST_LOG=info) in `log`.
    pub fn spawn(config: &Path, open_files: Option<u32>, log: PathBuf) -> Squire {
        let limit = open_files.map_or(String::new(), |n| format!("ulimit -n {n} && "));
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("{limit}exec \"$0\" run -c \"$1\""));
        Squire::start(command, config, &[], log)
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
        Squire::start(command, config, &[&hosts, &resolv], log)
    }

    fn start(mut command: Command, config: &Path, more: &[&Path], log: PathBuf) -> Squire {
        let child = command
            .arg(env!("CARGO_BIN_EXE_squire"))
            .arg(config)
            .args(more)
            .env("RUST_LOG", "info")
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
}

impl Drop for Squire {
    fn drop(&mut self) {
        // Already gone is fine.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
