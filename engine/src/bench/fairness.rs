//! `engine bench fairness`: one key's backlog against another key's few tasks. A big
//! key's tasks wait by the hundred thousand; while one instance drains them, a small
//! key's tasks arrive one at a time. Reports the small key's pickup (from the insert's
//! start to the attempt's start): with keys served in turn it is that of an idle
//! engine plus a claim's turn, not the time to drain the backlog ahead of it.

use std::time::{Duration, Instant};

use anyhow::bail;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::Double;
use task_engine::{NewTask, Registry};

use super::tasks::Noop;
use super::{drop_schema, fresh_schema, percentile, round3, start};
use crate::database::Database;

pub(super) fn run(
    db: &Database,
    registry: &Registry,
    backlog: u32,
    small: usize,
    workers: usize,
    gap: Duration,
) -> anyhow::Result<()> {
    if backlog == 0 || small == 0 || workers == 0 {
        bail!(crate::UsageError("--backlog, --small and --workers must be at least 1".into()));
    }
    let url = fresh_schema(db)?;
    let mut conn = PgConnection::establish(&url)?;
    conn.batch_execute("ANALYZE tasks")?;
    let filled = Instant::now();
    let mut left = backlog;
    while left > 0 {
        let n = left.min(100_000);
        NewTask::new(&Noop {})?.key("big").insert_copies(&mut conn, n)?;
        left -= n;
    }
    let filled = filled.elapsed();
    let engine = start(&url, registry, "fairness".into(), workers)?;
    // Draining at full speed before the small key's tasks come.
    let deadline = Instant::now() + Duration::from_secs(60);
    while engine.stats().completions < 10_000.min(u64::from(backlog) / 2) {
        if Instant::now() > deadline {
            bail!("the backlog did not start draining");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let task = NewTask::new(&Noop {})?.key("small");
    for _ in 0..small {
        task.insert(&mut conn)?;
        std::thread::sleep(gap);
    }
    #[derive(QueryableByName)]
    struct Waited {
        #[diesel(sql_type = Double)]
        ms: f64,
    }
    let query = "SELECT extract(epoch FROM e.started_at - t.created_at)::float8 * 1000 AS ms
                 FROM tasks t JOIN task_executions e ON e.task_id = t.id WHERE t.fair_key = 'small'";
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut waited: Vec<Waited> = Vec::new();
    while waited.len() < small {
        if Instant::now() > deadline {
            bail!("the small key's tasks did not all run in 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(50));
        waited = diesel::sql_query(query).load(&mut conn)?;
    }
    let drained = engine.stats().completions;
    engine.shutdown();
    drop_schema(db)?;

    let mut ms: Vec<f64> = waited.into_iter().map(|w| w.ms).collect();
    ms.sort_by(f64::total_cmp);
    let p = |q: f64| percentile(&ms, q);
    println!(
        "fairness: {backlog} tasks of one key (inserted in {filled:.1?}), {small} of another arriving one every \
         {gap:?} while {workers} workers drain: the second key's pickup from the insert's start p50 {:.2} ms, \
         p99 {:.2} ms, max {:.2} ms ({drained} tasks drained meanwhile)",
        p(0.5),
        p(0.99),
        p(1.0)
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "fairness",
            "backlog": backlog,
            "small": small,
            "workers": workers,
            "gap_ms": gap.as_secs_f64() * 1000.0,
            "p50_ms": round3(p(0.5)),
            "p99_ms": round3(p(0.99)),
            "max_ms": round3(p(1.0)),
            "drained_meanwhile": drained,
        })
    );
    Ok(())
}
