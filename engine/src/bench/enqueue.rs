//! `engine bench enqueue`: bulk rates, then concurrent clients inserting single tasks
//! by plain SQL, with and without the notifying trigger, an idle and a busy engine.

use std::time::{Duration, Instant};

use anyhow::bail;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use task_engine::{NewTask, Registry, Runner, Task};

use super::meter::Meter;
use super::tasks::{Hold, Noop};
use super::{drop_schema, exactly_once, fresh_schema, start, wait_idle, MISSED_AFTER};
use crate::database::Database;

pub(super) fn run(
    db: &Database,
    registry: &Registry,
    bulk: u32,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<()> {
    if bulk == 0 || clients == 0 || duration.is_zero() {
        bail!(crate::UsageError("--bulk and --clients must be at least 1, --duration more than 0".into()));
    }
    // Bulk: one statement whatever the number, one notification.
    let url = fresh_schema(db)?;
    let mut conn = PgConnection::establish(&url)?;
    let meter = Meter::new(&mut conn)?;
    let before = meter.read(&mut conn)?;
    let started = Instant::now();
    NewTask::new(&Noop {})?.insert_copies(&mut conn, bulk)?;
    let copies = f64::from(bulk) / started.elapsed().as_secs_f64();
    let copies_cost = Meter::cost(before, meter.read(&mut conn)?, u64::from(bulk));
    let batch: Vec<NewTask> = (0..bulk).map(|_| NewTask::new(&Noop {})).collect::<Result<_, _>>()?;
    let started = Instant::now();
    task_engine::enqueue_many(&mut conn, &batch)?;
    let many = f64::from(bulk) / started.elapsed().as_secs_f64();
    // The same with a unique key each: new keys, then the same keys again (each held).
    let unique: Vec<NewTask> =
        (0..bulk).map(|i| Ok(NewTask::new(&Noop {})?.unique_key(format!("u{i}")))).collect::<anyhow::Result<_>>()?;
    let started = Instant::now();
    task_engine::enqueue_many(&mut conn, &unique)?;
    let unique_new = f64::from(bulk) / started.elapsed().as_secs_f64();
    let started = Instant::now();
    task_engine::enqueue_many(&mut conn, &unique)?;
    let unique_held = f64::from(bulk) / started.elapsed().as_secs_f64();
    drop_schema(db)?;
    println!(
        "enqueue, bulk of {bulk}: insert_copies (--count) {copies:.0} tasks/s ({copies_cost}), enqueue_many (arrays) \
         {many:.0} tasks/s; with a unique key each {unique_new:.0} tasks/s ({:.2}x), the same keys again (kept) \
         {unique_held:.0} tasks/s ({:.2}x)",
        unique_new / many,
        unique_held / many
    );
    let mut json = serde_json::json!({"bench": "enqueue_bulk", "tasks": bulk, "copies_tasks_per_s": copies.round(),
                                      "enqueue_many_tasks_per_s": many.round(),
                                      "unique_new_tasks_per_s": unique_new.round(),
                                      "unique_held_tasks_per_s": unique_held.round()});
    json.as_object_mut().expect("an object").extend(copies_cost.json("client").as_object().expect("an object").clone());
    println!("{json}");

    // Concurrent single inserts, four ways. The engine runs `noop` tasks; the other
    // type is one no instance runs.
    let mut rates = Vec::new();
    for phase in [
        "no trigger",
        "no trigger, engine polling every ms",
        "engine idle",
        "engine idle, tasks it does not run",
        "engine busy",
    ] {
        let url = fresh_schema(db)?;
        let mut conn = PgConnection::establish(&url)?;
        let mut engine = None;
        match phase {
            "no trigger" => conn.batch_execute("DROP TRIGGER tasks_notify_insert ON tasks")?,
            "no trigger, engine polling every ms" => {
                // The same work as "engine idle" (the engine runs what is inserted),
                // found by polling instead of notifications.
                conn.batch_execute("DROP TRIGGER tasks_notify_insert ON tasks")?;
                let e = Runner::new(&url, registry.clone())
                    .instance("bench-polling")
                    .workers(8)
                    .poll_interval(Duration::from_millis(1))
                    .start()?;
                engine = Some(e);
            }
            "engine idle" | "engine idle, tasks it does not run" => {
                // An instance with nothing to do. With tasks it runs, it wakes for the
                // first ones and stays awake while they stream in; with tasks it does
                // not run, every insert finds it asleep and notifies.
                let e = start(&url, registry, "bench-idle".into(), 8)?;
                if !wait_idle(std::slice::from_ref(&e), 8, 0, Duration::from_secs(30)) {
                    bail!("the engine did not become idle");
                }
                engine = Some(e);
            }
            _ => {
                // Every worker on a long task, no room: the instance is busy.
                let e = Runner::new(&url, registry.clone())
                    .instance("bench-busy")
                    .workers(8)
                    .claim_buffer(0)
                    .poll_interval(Duration::from_secs(3600))
                    .start()?;
                NewTask::new(&Hold {})?.insert_copies(&mut conn, 8)?;
                let deadline = Instant::now() + Duration::from_secs(30);
                while e.stats().marked_idle || e.stats().claims == 0 || running(&mut conn)? < 8 {
                    if Instant::now() > deadline {
                        bail!("the engine did not become busy");
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                engine = Some(e);
            }
        }
        let before = engine.as_ref().map(|e| e.stats().notifications).unwrap_or(0);
        let runs_them = phase == "engine idle" || phase == "no trigger, engine polling every ms";
        let class = if runs_them { Noop::NAME } else { "bench_nobody_runs_this" };
        let meter = Meter::new(&mut conn)?;
        let reading = meter.read(&mut conn)?;
        let total = concurrent_inserts(&url, class, clients, duration)?;
        let rate = total as f64 / duration.as_secs_f64();
        let cost = Meter::cost(reading, meter.read(&mut conn)?, total.max(1));
        let notifications = engine.as_ref().map(|e| e.stats().notifications - before);
        let mut check = None;
        if runs_them {
            // No wake-up missed: every inserted task runs, once, without the
            // fallback poll (an hour).
            let deadline = Instant::now() + MISSED_AFTER;
            let mut c = exactly_once(&mut conn)?;
            while c.not_stopped > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
                c = exactly_once(&mut conn)?;
            }
            check = Some((c.not_stopped, c));
        }
        if let Some(engine) = engine {
            // The held tasks end with the stop.
            engine.shutdown();
        }
        drop_schema(db)?;
        println!(
            "enqueue, {clients} clients x single plain-SQL inserts, {phase}: {rate:.0} tasks/s{}; {cost}{}",
            notifications.map(|n| format!(" ({n} notifications)")).unwrap_or_default(),
            check.as_ref().map(|(left, c)| format!("; {left} missed; {c}")).unwrap_or_default()
        );
        let mut json = serde_json::json!({"bench": "enqueue_concurrent", "phase": phase, "clients": clients,
                           "tasks": total, "tasks_per_s": rate.round(), "notifications": notifications,
                           "missed": check.as_ref().map(|(left, _)| left),
                           "ran_exactly_once": check.as_ref().map(|(_, c)| c.ok())});
        json.as_object_mut().expect("an object").extend(cost.json("client").as_object().expect("an object").clone());
        println!("{json}");
        if let Some((left, c)) = &check {
            if *left > 0 || !c.ok() {
                bail!("the inserted tasks did not all run exactly once ({c}, {left} missed)");
            }
        }
        rates.push(rate);
    }
    println!(
        "enqueue: idle engine {:.0}% of the rate without the trigger with an engine polling for the same tasks \
         ({:.0}% of the rate without trigger nor engine; with tasks it does not run {:.0}%); \
         busy engine {:.0}% of the rate without the trigger",
        rates[2] / rates[1] * 100.0,
        rates[2] / rates[0] * 100.0,
        rates[3] / rates[0] * 100.0,
        rates[4] / rates[0] * 100.0
    );
    Ok(())
}

fn running(conn: &mut PgConnection) -> anyhow::Result<i64> {
    use task_engine::schema::tasks::dsl;
    Ok(dsl::tasks.filter(dsl::status.eq("running")).count().get_result(conn)?)
}

/// `clients` threads insert single tasks of type `class` (a plain SQL literal) for
/// `duration`; returns how many went in.
fn concurrent_inserts(url: &str, class: &'static str, clients: usize, duration: Duration) -> anyhow::Result<u64> {
    let deadline = Instant::now() + duration;
    let handles: Vec<std::thread::JoinHandle<anyhow::Result<u64>>> = (0..clients)
        .map(|_| {
            let url = url.to_owned();
            std::thread::spawn(move || {
                let mut conn = PgConnection::establish(&url)?;
                let mut n = 0;
                while Instant::now() < deadline {
                    conn.batch_execute(&format!("INSERT INTO tasks (task_class) VALUES ('{class}')"))?;
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    let mut total = 0;
    for handle in handles {
        total += handle.join().map_err(|_| anyhow::anyhow!("an inserting client panicked"))??;
    }
    Ok(total)
}
