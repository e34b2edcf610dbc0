//! `engine bench sustained`: a million tasks queued, then drained by one instance; the
//! rate of each tenth, and the claim's buffers as the queue drains.

use std::time::{Duration, Instant};

use anyhow::bail;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use task_engine::{NewTask, Registry};

use super::tasks::Noop;
use super::{drop_schema, exactly_once, fresh_schema, round3, start};
use crate::database::Database;

pub(super) fn run(db: &Database, registry: &Registry, tasks: u32, workers: usize) -> anyhow::Result<()> {
    if tasks < 10 || workers == 0 {
        bail!(crate::UsageError("--tasks must be at least 10 and --workers at least 1".into()));
    }
    let url = fresh_schema(db)?;
    let mut conn = PgConnection::establish(&url)?;
    let chunk = 100_000;
    let mut left = tasks;
    while left > 0 {
        let n = left.min(chunk);
        NewTask::new(&Noop {})?.insert_copies(&mut conn, n)?;
        left -= n;
    }
    conn.batch_execute("VACUUM ANALYZE tasks")?;
    let mut probe = PgConnection::establish(&url)?;
    let started = Instant::now();
    let engine = start(&url, registry, "sustained".into(), workers)?;
    let total = u64::from(tasks);
    let tenth = total / 10;
    let (mut first_tenth, mut last_tenth_start) = (None, None);
    let mut samples: Vec<(u64, u64)> = Vec::new(); // (done, claim buffers)
    let mut next_sample = 0;
    // When each tenth was done.
    let mut tenths: Vec<Duration> = Vec::with_capacity(10);
    loop {
        let done = engine.stats().completions;
        while tenths.len() < 10 && done >= tenth * (tenths.len() as u64 + 1) {
            tenths.push(started.elapsed());
        }
        if first_tenth.is_none() && done >= tenth {
            first_tenth = Some(started.elapsed());
        }
        if last_tenth_start.is_none() && done >= total - tenth {
            last_tenth_start = Some(started.elapsed());
        }
        if done >= next_sample && done < total {
            samples.push((done, claim_buffers(&mut probe)?));
            next_sample = done + tenth;
        }
        if done >= total {
            break;
        }
        if started.elapsed() > Duration::from_secs(3600) {
            bail!("the sustained drain did not finish in an hour");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    let stats = engine.stats();
    engine.shutdown();
    let check = exactly_once(&mut conn)?;
    drop_schema(db)?;

    let first = tenth as f64 / first_tenth.unwrap_or(elapsed).as_secs_f64();
    let last = tenth as f64 / (elapsed - last_tenth_start.unwrap_or_default()).as_secs_f64();
    println!(
        "sustained: {tasks} tasks, {workers} workers, {:.1} s ({:.0} tasks/s overall); first tenth {first:.0} tasks/s, \
         last tenth {last:.0} tasks/s ({:.0}%); {} claims; {check}",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        last / first * 100.0,
        stats.claims
    );
    let tenth_rates: Vec<f64> = tenths
        .iter()
        .scan(Duration::ZERO, |previous, &t| {
            let rate = tenth as f64 / (t - *previous).as_secs_f64();
            *previous = t;
            Some(rate.round())
        })
        .collect();
    println!(
        "sustained: tasks/s by tenth: {}",
        tenth_rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ")
    );
    println!(
        "sustained: claim buffers (EXPLAIN ANALYZE of a 100-task claim walk) at tasks done: {}",
        samples.iter().map(|(done, b)| format!("{done}: {b}")).collect::<Vec<_>>().join(", ")
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "sustained", "tasks": tasks, "workers": workers,
            "seconds": round3(elapsed.as_secs_f64()),
            "tasks_per_s": (total as f64 / elapsed.as_secs_f64()).round(),
            "first_tenth_tasks_per_s": first.round(), "last_tenth_tasks_per_s": last.round(),
            "last_over_first": round3(last / first),
            "tasks_per_s_by_tenth": tenth_rates,
            "claim_buffers": samples.iter().map(|(d, b)| serde_json::json!([d, b])).collect::<Vec<_>>(),
            "ran_exactly_once": check.ok(),
        })
    );
    if !check.ok() {
        bail!("the sustained drain's tasks did not all run exactly once ({check})");
    }
    Ok(())
}

/// Buffers the claim's walk of the waiting-tasks index reads for 100 tasks, now
/// (without locking or claiming anything).
fn claim_buffers(conn: &mut PgConnection) -> anyhow::Result<u64> {
    #[derive(QueryableByName)]
    struct Plan {
        #[diesel(sql_type = diesel::sql_types::Text, column_name = "QUERY PLAN")]
        line: String,
    }
    let plan: Vec<Plan> = diesel::sql_query(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT TEXT) SELECT id FROM tasks
         WHERE status = 'waiting' AND run_at <= now() AND task_class = ANY(ARRAY['bench_noop'])
         ORDER BY priority DESC, run_at, id LIMIT 100",
    )
    .load(conn)?;
    let number_after = |line: &str, key: &str| -> u64 {
        line.split(key).nth(1).and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()).unwrap_or(0)
    };
    Ok(plan
        .iter()
        .take_while(|p| !p.line.starts_with("Planning"))
        .filter(|p| p.line.contains("Buffers: shared"))
        .map(|p| number_after(&p.line, "hit=") + number_after(&p.line, "read="))
        .max()
        .unwrap_or(0))
}
