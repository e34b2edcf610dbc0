//! CPU seconds of the engine's process and of the PostgreSQL server, from `/proc`
//! (Linux; zero elsewhere).

/// CPU seconds (user + system) a process has used, with its waited-for children.
pub(super) fn process_cpu(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let fields: Vec<f64> = rest.split_whitespace().map(|f| f.parse().unwrap_or(0.0)).collect();
    // utime, stime, cutime, cstime are fields 14-17, i.e. 11-14 after the state.
    let ticks: f64 = fields.get(11..15).map(|f| f.iter().sum()).unwrap_or(0.0);
    ticks / 100.0 // USER_HZ is 100 on Linux
}

/// CPU seconds of the PostgreSQL server: the postmaster (with the backends it has
/// reaped) and its live children.
pub(super) fn server_cpu(postmaster: u32) -> f64 {
    let mut total = process_cpu(postmaster);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let parent = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
        if parent == Some(postmaster) {
            let fields: Vec<f64> = stat
                .rsplit_once(')')
                .map(|(_, r)| r.split_whitespace().map(|f| f.parse().unwrap_or(0.0)).collect())
                .unwrap_or_default();
            total += fields.get(11..13).map(|f| f.iter().sum::<f64>()).unwrap_or(0.0) / 100.0;
        }
    }
    total
}
