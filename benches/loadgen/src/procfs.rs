//! CPU time and memory of the proxies under test, from `/proc`.

/// utime + stime of the processes, all their threads, in seconds.
pub fn cpu_seconds(pids: &[u32]) -> Result<f64, String> {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut ticks = 0u64;
    for pid in pids {
        let path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        // Fields after the command name (which may hold spaces), from field 3:
        // utime is field 14, stime field 15.
        let rest = stat.rsplit_once(')').ok_or(format!("{path}: no ')'"))?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        for i in [11, 12] {
            ticks += fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .ok_or(format!("{path}: field {}", i + 3))?;
        }
    }
    Ok(ticks as f64 / ticks_per_second)
}

/// Resident set size of the processes, summed, in KiB.
pub fn rss_kib(pids: &[u32]) -> Result<u64, String> {
    let mut total = 0;
    for pid in pids {
        let path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or(format!("{path}: no VmRSS"))?;
    }
    Ok(total)
}

/// Whether the process has exited (a zombie waiting for its parent, or
/// gone): its descriptors, listening sockets included, are closed by then.
pub fn exited(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    matches!(state, Some('Z' | 'X') | None)
}
