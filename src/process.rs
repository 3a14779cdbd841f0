//! This process as the kernel accounts it, for the `process_*` metric
//! families: CPU time, memory, descriptors, start time, from `/proc/self`.

use std::fs;

/// Each field is `None` where its source cannot be read (not Linux, a
/// locked-down `/proc`).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Process {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

impl Process {
    pub fn read() -> Process {
        let mut process = Process::default();
        // SAFETY: sysconf only reads a system constant.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if let Some(stat) = fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|text| Stat::parse(&text))
        {
            if ticks > 0 {
                let ticks = ticks as f64;
                process.cpu_seconds = Some((stat.utime + stat.stime) as f64 / ticks);
                process.start_time_seconds =
                    boot_time().map(|boot| boot as f64 + stat.starttime as f64 / ticks);
            }
            process.virtual_bytes = Some(stat.vsize);
            if page > 0 {
                process.resident_bytes = Some(stat.rss_pages * page as u64);
            }
        }
        process.open_fds = fs::read_dir("/proc/self/fd")
            .ok()
            // The directory's own descriptor is one of the entries.
            .map(|entries| entries.count().saturating_sub(1) as u64);
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes only into `limit`.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            process.max_fds = Some(limit.rlim_cur);
        }
        process
    }
}

/// The fields of `/proc/self/stat` used here.
struct Stat {
    utime: u64,
    stime: u64,
    starttime: u64,
    vsize: u64,
    rss_pages: u64,
}

impl Stat {
    /// Fields are counted after the `(comm)`, which may hold spaces and
    /// parentheses: from its last `)`.
    fn parse(text: &str) -> Option<Stat> {
        let rest = &text[text.rfind(')')? + 1..];
        // Field 3 (state) is the first after `)`.
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(Stat {
            utime: field(14)?,
            stime: field(15)?,
            starttime: field(22)?,
            vsize: field(23)?,
            rss_pages: field(24)?,
        })
    }
}

/// Seconds since the epoch at boot, `btime` of `/proc/stat`.
fn boot_time() -> Option<u64> {
    fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("btime ")?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let text = "4242 (squire (x) y) S 1 4242 4242 0 -1 4194560 1 0 0 0 150 30 0 0 20 0 4 0 12345 98765432 2500 18446744073709551615";
        let stat = Stat::parse(text).expect("parses");
        assert_eq!((stat.utime, stat.stime), (150, 30));
        assert_eq!(stat.starttime, 12345);
        assert_eq!(stat.vsize, 98_765_432);
        assert_eq!(stat.rss_pages, 2500);
    }

    #[test]
    fn this_process_is_read() {
        let process = Process::read();
        assert!(process.cpu_seconds.is_some_and(|s| s >= 0.0));
        assert!(process.resident_bytes.is_some_and(|b| b > 0));
        assert!(process.open_fds.is_some_and(|n| n >= 3), "{process:?}");
        assert!(process
            .max_fds
            .is_some_and(|n| n >= process.open_fds.unwrap_or(0)));
        let started = process.start_time_seconds.expect("start time");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after the epoch")
            .as_secs_f64();
        assert!(started <= now + 1.0 && started > now - 86_400.0 * 365.0);
    }
}
