//! `engine bench peer`: our drain and another queue's benchmark command, alternating in
//! one sitting on the same server (ours, peer, peer, ours, ...), each after a
//! `CHECKPOINT` and a pause; the medians of each and their ratio, with the CPU and WAL
//! per task of each, measured the same way. Absolute rates move by a third from one hour
//! to the next on a shared machine; only such a ratio holds.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};
use diesel::connection::SimpleConnection;
use task_engine::Registry;

use super::drain::{self, Drained, Mode};
use super::meter::{Cost, Meter};
use crate::database::Database;

/// The peer's database, made anew for each of its runs.
const PEER_DATABASE: &str = "task_engine_peer";

pub(super) struct Options {
    /// The peer's command; it gets `DATABASE_URL`, `N` (tasks) and `C` (workers).
    pub command: Vec<String>,
    /// The key of the peer's rate in the last JSON line it prints.
    pub rate_key: String,
    pub pause: Duration,
    pub drain: drain::Options,
}

pub(super) fn run(db: &Database, registry: &Registry, options: &Options) -> anyhow::Result<()> {
    let Some((program, args)) = options.command.split_first() else {
        bail!(crate::UsageError("give the peer's command after `--`".into()));
    };
    let runs = options.drain.runs;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..runs {
        let peer_first = round % 2 == 1;
        for peer in [peer_first, !peer_first] {
            db.connect()?.batch_execute("CHECKPOINT")?;
            std::thread::sleep(options.pause);
            if peer {
                let drained = peer_once(db, program, args, options)?;
                println!("peer, run {}: {:.0} tasks/s; {}", round + 1, drained.rate, drained.cost);
                theirs.push(drained);
            } else {
                ours.push(drain::drain_once(db, registry, &options.drain, Mode::Batched, round + 1)?);
            }
        }
    }
    let (a, b) = (Summary::of(&ours), Summary::of(&theirs));
    println!(
        "peer: over {runs} run(s) each, medians: ours {:.0} tasks/s, the peer's {:.0}: ratio {:.2}; PostgreSQL CPU s/1000 \
         tasks: ours {}, the peer's {}; WAL bytes/task: ours {:.0}, the peer's {:.0}",
        a.rate,
        b.rate,
        a.rate / b.rate,
        a.server_cpu.map_or("unknown".into(), |c| format!("{c:.3}")),
        b.server_cpu.map_or("unknown".into(), |c| format!("{c:.3}")),
        a.wal,
        b.wal,
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "peer",
            "scenario": format!("{:?}", options.drain.scenario).to_lowercase(),
            "tasks": options.drain.tasks,
            "workers": options.drain.workers,
            "runs": runs,
            "ours_tasks_per_s": a.rate.round(),
            "peer_tasks_per_s": b.rate.round(),
            "ratio": super::round3(a.rate / b.rate),
            "ours_postgres_cpu_s_per_1000": a.server_cpu.map(super::round3),
            "peer_postgres_cpu_s_per_1000": b.server_cpu.map(super::round3),
            "ours_client_cpu_s_per_1000": super::round3(a.client_cpu),
            "peer_client_cpu_s_per_1000": super::round3(b.client_cpu),
            "ours_wal_bytes_per_task": a.wal.round(),
            "peer_wal_bytes_per_task": b.wal.round(),
            "ours_rates": ours.iter().map(|d| d.rate.round()).collect::<Vec<_>>(),
            "peer_rates": theirs.iter().map(|d| d.rate.round()).collect::<Vec<_>>(),
        })
    );
    Ok(())
}

/// One run of the peer's command, in a database of its own.
fn peer_once(db: &Database, program: &str, args: &[String], options: &Options) -> anyhow::Result<Drained> {
    let mut admin = db.connect()?;
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {PEER_DATABASE}"))?;
    admin.batch_execute(&format!("CREATE DATABASE {PEER_DATABASE}"))?;
    let meter = Meter::new(&mut admin)?;
    let before = meter.read(&mut admin)?;
    let output = Command::new(program)
        .args(args)
        .env("DATABASE_URL", with_database(db.url(), PEER_DATABASE))
        .env("N", options.drain.tasks.to_string())
        .env("C", options.drain.workers.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("could not run {program}"))?;
    let after = meter.read(&mut admin)?;
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {PEER_DATABASE}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!("{program} failed ({}): {stdout}", output.status);
    }
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).context("the peer printed no JSON")?;
    println!("{}", line.trim());
    let json: serde_json::Value = serde_json::from_str(line)?;
    let rate = json[&options.rate_key]
        .as_f64()
        .with_context(|| format!("the peer's JSON has no number {:?}", options.rate_key))?;
    Ok(Drained { rate, cost: Meter::cost(before, after, u64::from(options.drain.tasks)) })
}

/// `url` with its database replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..].find('/').map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{database}", &base[..path_start]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// The medians of one side's runs.
struct Summary {
    rate: f64,
    server_cpu: Option<f64>,
    client_cpu: f64,
    wal: f64,
}

impl Summary {
    fn of(runs: &[Drained]) -> Self {
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let costs: Vec<Cost> = runs.iter().map(|d| d.cost).collect();
        let server: Option<Vec<f64>> = costs.iter().map(|c| c.server_cpu_per_1000).collect();
        Self {
            rate: median(runs.iter().map(|d| d.rate).collect()),
            server_cpu: server.map(median),
            client_cpu: median(costs.iter().map(|c| c.process_cpu_per_1000).collect()),
            wal: median(costs.iter().map(|c| c.wal_bytes_per_task).collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn the_peer_gets_the_same_server_and_another_database() {
        assert_eq!(with_database("postgres://u@h:5/task_engine", "p"), "postgres://u@h:5/p");
        assert_eq!(with_database("postgres://u@h:5/db?sslmode=disable", "p"), "postgres://u@h:5/p?sslmode=disable");
        assert_eq!(with_database("postgres://u@h:5", "p"), "postgres://u@h:5/p");
    }
}
