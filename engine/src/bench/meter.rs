//! What a run costs: CPU seconds of this process (with the children it waited for) and
//! of the PostgreSQL server, from `/proc` (Linux; zero elsewhere), and the WAL the
//! server wrote. The server must run on this machine for its CPU to be read.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer};

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

/// The parent of a process.
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// CPU seconds of the PostgreSQL server: the postmaster (with the backends it has
/// reaped) and its live children.
pub(super) fn server_cpu(postmaster: u32) -> f64 {
    let mut total = process_cpu(postmaster);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if parent(pid) == Some(postmaster) {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            let fields: Vec<f64> = stat
                .rsplit_once(')')
                .map(|(_, r)| r.split_whitespace().map(|f| f.parse().unwrap_or(0.0)).collect())
                .unwrap_or_default();
            total += fields.get(11..13).map(|f| f.iter().sum::<f64>()).unwrap_or(0.0) / 100.0;
        }
    }
    total
}

/// A reading of the costs, to subtract from a later one.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reading {
    process_cpu: f64,
    server_cpu: Option<f64>,
    wal: i64,
}

/// What a run cost, per task.
#[derive(Debug, Clone, Copy)]
pub(super) struct Cost {
    /// CPU seconds of this process (and the children it waited for) per 1,000 tasks.
    pub process_cpu_per_1000: f64,
    /// CPU seconds of the server per 1,000 tasks, when it runs here.
    pub server_cpu_per_1000: Option<f64>,
    /// WAL bytes per task (the whole server's).
    pub wal_bytes_per_task: f64,
}

/// Reads the costs on `conn`'s server.
pub(super) struct Meter {
    postmaster: Option<u32>,
}

impl Meter {
    /// Finds the server's postmaster: the parent of `conn`'s backend, when it runs here.
    pub fn new(conn: &mut PgConnection) -> anyhow::Result<Self> {
        #[derive(QueryableByName)]
        struct Backend {
            #[diesel(sql_type = Integer)]
            pid: i32,
        }
        let backend: Backend = diesel::sql_query("SELECT pg_backend_pid() AS pid").get_result(conn)?;
        let postmaster = u32::try_from(backend.pid).ok().and_then(parent).filter(|&p| p > 1);
        Ok(Self { postmaster })
    }

    pub fn read(&self, conn: &mut PgConnection) -> anyhow::Result<Reading> {
        #[derive(QueryableByName)]
        struct Wal {
            #[diesel(sql_type = BigInt)]
            bytes: i64,
        }
        let wal: Wal = diesel::sql_query("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint AS bytes")
            .get_result(conn)?;
        Ok(Reading {
            process_cpu: process_cpu(std::process::id()),
            server_cpu: self.postmaster.map(server_cpu),
            wal: wal.bytes,
        })
    }

    /// The cost of `tasks` tasks between two readings.
    pub fn cost(before: Reading, after: Reading, tasks: u64) -> Cost {
        let per_1000 = |seconds: f64| seconds / tasks as f64 * 1000.0;
        Cost {
            process_cpu_per_1000: per_1000(after.process_cpu - before.process_cpu),
            server_cpu_per_1000: before.server_cpu.zip(after.server_cpu).map(|(b, a)| per_1000(a - b)),
            wal_bytes_per_task: (after.wal - before.wal) as f64 / tasks as f64,
        }
    }
}

impl Cost {
    pub fn json(&self, process: &str) -> serde_json::Value {
        let round3 = super::round3;
        serde_json::json!({
            format!("{process}_cpu_s_per_1000"): round3(self.process_cpu_per_1000),
            "postgres_cpu_s_per_1000": self.server_cpu_per_1000.map(round3),
            "wal_bytes_per_task": self.wal_bytes_per_task.round(),
        })
    }
}

impl std::fmt::Display for Cost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "client CPU {:.3} s/1000 tasks", self.process_cpu_per_1000)?;
        if let Some(server) = self.server_cpu_per_1000 {
            write!(f, ", PostgreSQL CPU {server:.3} s/1000 tasks")?;
        }
        write!(f, ", WAL {:.0} bytes/task", self.wal_bytes_per_task)
    }
}
