//! The claim against real PostgreSQL: what it reads, in what order, and what it says
//! of what it left.

/// A claimer of the queue `default`.
pub(crate) fn lane<'a>(instance: &'a str, task_types: &'a [&'a str]) -> LaneClaim<'a> {
    LaneClaim { instance, queue: "default", task_types, after_key: "", fair: false }
}

use super::*;
use diesel::connection::SimpleConnection;

/// A line of `EXPLAIN`'s output.
#[derive(QueryableByName)]
pub(crate) struct PlanLine {
    #[diesel(sql_type = Text, column_name = "QUERY PLAN")]
    pub line: String,
}

/// The claim of a burst into a table analyzed while empty, behind a backlog of
/// another type at a higher priority, of tasks due tomorrow and of another queue's
/// tasks: a few hundred
/// buffers whatever the plan cache does, where walking the waiting tasks in
/// priority order reads every entry of the backlog (thousands of buffers), and
/// the plan the statistics suggest (a bitmap scan and a sort) reads all of them.
#[test]
fn the_claim_reads_what_it_claims_not_what_else_waits_whatever_the_statistics() {
    let db = test_db::TestDatabase::new();
    let mut conn = db.connect();
    conn.batch_execute(
        "ANALYZE tasks;
         INSERT INTO tasks (task_class, priority) SELECT 'unknown', 5 FROM generate_series(1, 100000);
         INSERT INTO tasks (task_class, priority, run_at)
             SELECT 'noop', 10, now() + interval '1 day' FROM generate_series(1, 50000);
         INSERT INTO tasks (task_class, priority, queue) SELECT 'noop', 10, 'other' FROM generate_series(1, 50000);
         INSERT INTO tasks (task_class, priority) SELECT 'noop', 0 FROM generate_series(1, 20000);
         INSERT INTO tasks (task_class, priority) SELECT 'noop', 1 FROM generate_series(1, 5)",
    )
    .unwrap();
    Session::Own.prepare(&mut conn, SETTINGS).unwrap();
    // Prepared as the producer's connection has it (diesel's bound statements are
    // one-shot: planned with their values).
    conn.batch_execute(&format!(
        "PREPARE claim_here (text[], bigint, text, bigint, text[], int, boolean, text, int) AS {CLAIM}"
    ))
    .unwrap();
    // With costs: without, EXPLAIN does not say whether the plan was compiled.
    let explain = |conn: &mut PgConnection, mode: &str| -> String {
        conn.batch_execute(&format!("BEGIN; SET LOCAL plan_cache_mode = {mode}")).unwrap();
        let plan: Vec<PlanLine> =
            diesel::sql_query("EXPLAIN (ANALYZE, BUFFERS) EXECUTE claim_here(ARRAY['noop', 'echo'], 10, 'i', 41, ARRAY['default'], NULL, false, '', NULL)")
                .load(conn)
                .unwrap();
        conn.batch_execute("ROLLBACK").unwrap();
        plan.into_iter().map(|p| p.line).collect::<Vec<_>>().join("\n")
    };
    for mode in ["force_custom_plan", "force_generic_plan"] {
        let plan = explain(&mut conn, mode);
        for bad in ["Seq Scan", "Bitmap"] {
            assert!(!plan.contains(bad), "{mode}: the claim's plan has a {bad}:\n{plan}");
        }
        let buffers: u64 = plan
            .lines()
            .take_while(|line| !line.starts_with("Planning"))
            .filter_map(|line| line.split("shared hit=").nth(1))
            .map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse::<u64>().unwrap())
            .max()
            .unwrap_or(0);
        assert!(buffers < 600, "{mode}: the claim of 10 tasks read {buffers} buffers:\n{plan}");
    }

    // With the statistics of the table as it now is, the generic plan's estimated
    // cost passes `jit_above_cost`: compiling it took longer than running it.
    conn.batch_execute("ANALYZE tasks").unwrap();
    let plan = explain(&mut conn, "force_generic_plan");
    assert!(!plan.contains("JIT"), "the claim was compiled:\n{plan}");

    let claimed = claim(&mut conn, Session::Own, &lane("i", &["noop", "echo"]), 10).unwrap();
    assert!(!claimed.more, "a claim alone was told that others held tasks");
    let ids: Vec<i64> = claimed.tasks.iter().map(|t| t.id).collect();
    // The five of priority 1 (the last inserted), then the oldest of priority 0.
    let first_of_priority_0 = 200_001;
    let expected: Vec<i64> = (220_001..=220_005).chain(first_of_priority_0..first_of_priority_0 + 5).collect();
    assert_eq!(ids, expected, "not claimed in priority, then due, then id order");
}

/// Through a transaction pooler the claim is planned anew each time (no named
/// statement, no session setting): its settings for its transaction keep the plan by
/// index on a table analyzed while empty, and it claims what it claims directly.
#[test]
fn through_a_transaction_pooler_the_claim_reads_by_index_all_the_same() {
    if let Some(why) = test_db::pooler_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let db = test_db::TestDatabase::new();
    db.connect()
        .batch_execute(
            "ANALYZE tasks;
             INSERT INTO tasks (task_class, priority) SELECT 'unknown', 5 FROM generate_series(1, 100000);
             INSERT INTO tasks (task_class, priority) SELECT 'noop', 0 FROM generate_series(1, 20000)",
        )
        .unwrap();
    let mut pooled = PgConnection::establish(&db.pooled_url()).unwrap();
    Session::Pooled.prepare(&mut pooled, SETTINGS).unwrap();
    let plan: Vec<PlanLine> = Session::Pooled
        .with(&mut pooled, SETTINGS, |conn| {
            diesel::sql_query(format!("EXPLAIN (ANALYZE, BUFFERS) {CLAIM}"))
                .bind::<Array<Text>, _>(&["noop", "echo"][..])
                .bind::<BigInt, _>(10)
                .bind::<Text, _>("i")
                .bind::<BigInt, _>(41)
                .bind::<Array<Text>, _>(&["default"][..])
                .bind::<Nullable<Integer>, _>(None::<i32>)
                .bind::<Bool, _>(false)
                .bind::<Text, _>("")
                .bind::<Nullable<Integer>, _>(None::<i32>)
                .load(conn)
        })
        .unwrap();
    let plan = plan.into_iter().map(|p| p.line).collect::<Vec<_>>().join("\n");
    for bad in ["Seq Scan", "Bitmap", "JIT"] {
        assert!(!plan.contains(bad), "through the pooler, the claim's plan has a {bad}:\n{plan}");
    }
    let claimed = claim(&mut pooled, Session::Pooled, &lane("i", &["noop"]), 10).unwrap();
    let ids: Vec<i64> = claimed.tasks.iter().map(|t| t.id).collect();
    // EXPLAIN ANALYZE ran the claim, and its transaction committed: ten were claimed.
    assert_eq!(ids, (100_011..=100_020).collect::<Vec<_>>());
    // That claim went as a call of its function, kept planned on the server, and its
    // completion as well.
    #[derive(QueryableByName)]
    struct Functions {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let functions: Functions =
        diesel::sql_query("SELECT count(*) AS n FROM pg_proc WHERE proname LIKE 'task_engine\\_planned\\_%'")
            .get_result(&mut pooled)
            .unwrap();
    assert_eq!(functions.n, 3, "the three claims' functions");
    let done: Vec<crate::attempt::Completion> = claimed
        .tasks
        .iter()
        .map(|t| crate::attempt::Completion {
            execution_id: t.execution_id,
            task_id: t.id,
            attempt: t.attempt,
            worker: 0,
            started_at: t.claimed_at,
            stopped_at: t.claimed_at,
            elapsed: Duration::ZERO,
            outcome: crate::attempt::Outcome::Succeeded(serde_json::Value::Null),
            frees_a_place: false,
        })
        .collect();
    assert_eq!(crate::db::completion::complete(&mut pooled, Session::Pooled, &done).unwrap(), 10);

    // The function plans its statement by index, with its settings: auto_explain shows
    // the plan of the statement it runs (where the server has it).
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut config: postgres::Config = db.url().parse().unwrap();
    let heard = std::sync::Arc::clone(&notices);
    config.notice_callback(move |notice| heard.lock().unwrap().push(notice.message().to_owned()));
    let mut client = config.connect(postgres::NoTls).unwrap();
    if client.batch_execute("LOAD 'auto_explain'").is_ok() {
        client
            .batch_execute(
                "SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on;
                 SET auto_explain.log_level = notice; SET client_min_messages = notice",
            )
            .unwrap();
        let call = PLANNED[0].call();
        let claimed = client
            .query(
                &call,
                &[
                    &vec!["noop".to_owned()],
                    &10i64,
                    &"i",
                    &41i64,
                    &vec!["default".to_owned()],
                    &None::<i32>,
                    &false,
                    &"",
                    &None::<i32>,
                ],
            )
            .unwrap();
        assert_eq!(claimed.len(), 10);
        let plans = notices.lock().unwrap().join("\n");
        assert!(plans.contains("tasks_claim_idx"), "no nested plan seen:\n{plans}");
        for bad in ["Seq Scan on tasks", "Bitmap"] {
            assert!(!plans.contains(bad), "the claim's function plans with a {bad}:\n{plans}");
        }
    } else {
        eprintln!("auto_explain is not installed: the function's plan is not checked");
    }
    #[derive(QueryableByName)]
    struct Setting {
        #[diesel(sql_type = Text)]
        setting: String,
    }
    // Nothing was left on the server's sessions, where the next client would find it.
    for _ in 0..20 {
        let seen: Setting =
            diesel::sql_query("SELECT current_setting('enable_seqscan') AS setting").get_result(&mut pooled).unwrap();
        assert_eq!(seen.setting, "on", "a setting of the claim stayed on a pooled session");
    }
    let prepared: i64 = diesel::select(diesel::dsl::sql::<BigInt>("count(*) FROM pg_prepared_statements"))
        .get_result(&mut pooled)
        .unwrap();
    assert_eq!(prepared, 0, "a named statement was left on a pooled session");
}

/// Among more keys than a claim walks, keys come in rounds from one claim to the
/// next: each of 40 keys has a task claimed within the first four claims of 16; a
/// claim cut short by its walk says more waits.
#[test]
fn claims_among_many_keys_serve_every_key_in_rounds() {
    let db = test_db::TestDatabase::new();
    let mut conn = db.connect();
    conn.batch_execute(
        "INSERT INTO tasks (task_class, fair_key)
         SELECT 'noop', 'k' || lpad((i % 40)::text, 2, '0') FROM generate_series(1, 400) i",
    )
    .unwrap();
    Session::Own.prepare(&mut conn, SETTINGS).unwrap();
    let mut after = String::new();
    let mut served = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let claimed =
            claim(&mut conn, Session::Own, &LaneClaim { after_key: &after, fair: true, ..lane("i", &["noop"]) }, 16)
                .unwrap();
        assert_eq!(claimed.tasks.len(), 16);
        let ids: Vec<i64> = claimed.tasks.iter().map(|t| t.id).collect();
        let keys: Vec<String> = diesel::sql_query("SELECT fair_key AS key FROM tasks WHERE id = ANY($1)")
            .bind::<Array<BigInt>, _>(ids)
            .load::<Key>(&mut conn)
            .unwrap()
            .into_iter()
            .map(|k| k.key)
            .collect();
        served.extend(keys);
        after = claimed.last_key.expect("a key");
    }
    assert_eq!(served.len(), 40, "keys served in four claims: {served:?}");
    // A claim that wants more than 16 keys hold comes back short, and says more waits.
    let big = claim(&mut conn, Session::Own, &LaneClaim { after_key: &after, fair: true, ..lane("i", &["noop"]) }, 300)
        .unwrap();
    assert!(big.tasks.len() < 300 && big.more, "{} claimed, more: {}", big.tasks.len(), big.more);
}

#[derive(QueryableByName)]
struct Key {
    #[diesel(sql_type = Text)]
    key: String,
}

/// A claim that finds only tasks another claim holds comes back empty, and says
/// that more may wait: the claimer must not take the queue for drained.
#[test]
fn a_claim_among_tasks_other_claims_hold_says_more_may_wait() {
    let db = test_db::TestDatabase::new();
    let (mut first, mut second) = (db.connect(), db.connect());
    first.batch_execute("INSERT INTO tasks (task_class) SELECT 'noop' FROM generate_series(1, 100)").unwrap();
    first.batch_execute("BEGIN").unwrap();
    let held = claim(&mut first, Session::Own, &lane("first", &["noop"]), 40).unwrap();
    assert_eq!(held.tasks.len(), 40);
    assert!(!held.more);

    // Its 28 candidates are the first 40's first 28: all held.
    let blocked = claim(&mut second, Session::Own, &lane("second", &["noop"]), 5).unwrap();
    assert!(blocked.tasks.is_empty(), "claimed tasks another claim holds");
    assert!(blocked.more, "an empty claim among held tasks took the queue for drained");

    first.batch_execute("COMMIT").unwrap();
    let after = claim(&mut second, Session::Own, &lane("second", &["noop"]), 5).unwrap();
    let ids: Vec<i64> = after.tasks.iter().map(|t| t.id).collect();
    assert_eq!(ids, vec![41, 42, 43, 44, 45]);
    assert!(!after.more);
}
