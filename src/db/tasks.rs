//! The life of a task in SQL: insert, claim, complete, release, rescue, and what the
//! scheduler and the vacuum ask of the `tasks` table. Each state change is a single
//! statement (one implicit transaction), so a crash between two of them never leaves a
//! task half-claimed or half-finished. Claims and completions work on batches.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Double, Integer, Jsonb, Nullable, Text, Timestamptz};

use crate::db::prepared::Prepared;
use crate::db::{instances, micros};

/// The `worker` of a lost attempt's execution: the worker that ran it is not known.
pub(crate) const NOT_YET_TAKEN: i32 = -1;

/// A task claimed by this instance: its attempt runs from now on, and its execution is
/// written when it ends (or by the rescue, if its instance dies).
#[derive(Debug, Clone)]
pub(crate) struct ClaimedTask {
    pub id: i64,
    /// The task's type (`tasks.task_class`).
    pub task_type: String,
    /// The parameters as JSON text: each task's type parses its own, so that a row the
    /// engine cannot read fails that task only, not the claim of all its neighbours.
    pub task_parameters: String,
    /// This attempt's number, 1 for the first.
    pub attempt: i32,
    pub max_attempts: i32,
    /// The id its execution will have: taken from the sequence at the claim, written
    /// with the execution when the attempt ends.
    pub execution_id: i64,
    /// The claim's time on the server: the attempt's start, before its wait for a
    /// worker.
    pub claimed_at: DateTime<Utc>,
    /// Claimed under its queue's limit: its end frees a place, which the instances
    /// waiting for one must hear of.
    pub limited: bool,
    /// Its own time limit (`tasks.timeout_ms`); `None`: its type's, if any.
    pub timeout: Option<Duration>,
}

/// The levels of waiting tasks of the types `$types` in the queues `$queues`: one row per
/// (queue, type, priority, key) that has waiting tasks, at most `$depth` per (queue,
/// type), found by a walk of `tasks_claim_idx` of a few descents per level (a skip
/// scan). Priorities go from the highest down; within one, keys go round from the first
/// after `$after` (the key its claimer served last), wrapping to the first key, so that
/// claim after claim every key has its turn even when a claim reaches only `$depth`
/// of them. Their number is that of the types, priorities and keys in use, never that
/// of the tasks. `walk` starts from a sentinel row (depth 0, above every priority);
/// `levels` drops it, and `cut` says whether the walk stopped at `$depth` (more levels
/// may wait). Queues paused, and (unless `$locked`: the claim holds the queue's lock)
/// queues with a limit, have none: the claim of such a queue must go through
/// [`claim_limited`].
macro_rules! waiting_levels {
    ($types:literal, $queues:literal, $locked:literal, $after:literal, $depth:literal) => {
        concat!(
            "walk AS (
             SELECT qs.queue, ty.task_class, 1099511627776::bigint AS priority, ''::text AS fair_key, 1 AS lap,
                    0 AS depth
             FROM unnest(",
            $queues,
            "::text[]) AS qs(queue) CROSS JOIN unnest(",
            $types,
            "::text[]) AS ty(task_class)
             WHERE NOT EXISTS (
                 SELECT 1 FROM task_engine_queues s
                 WHERE s.name = qs.queue
                   AND (s.paused OR (NOT ",
            $locked,
            " AND (s.concurrency IS NOT NULL OR s.key_concurrency IS NOT NULL
                                                 OR s.rate_limit IS NOT NULL))))
             UNION ALL
             SELECT l.queue, l.task_class, n.priority, n.fair_key, n.lap, l.depth + 1
             FROM walk l CROSS JOIN LATERAL (
                 -- The next key at this priority, in this lap (lap 0: keys after `$after`;
                 -- lap 1: from the first key to `$after`).
                 (SELECT t.priority::bigint AS priority, t.fair_key, l.lap FROM tasks t
                  WHERE t.status = 'waiting' AND t.queue = l.queue AND t.task_class = l.task_class
                    AND t.priority = l.priority AND t.fair_key > l.fair_key
                    AND (l.lap = 0 OR t.fair_key <= ",
            $after,
            ")
                  ORDER BY t.fair_key LIMIT 1)
                 UNION ALL
                 -- Round the corner: the first key at this priority, up to `$after`.
                 (SELECT t.priority::bigint, t.fair_key, 1 FROM tasks t
                  WHERE l.lap = 0 AND t.status = 'waiting' AND t.queue = l.queue AND t.task_class = l.task_class
                    AND t.priority = l.priority AND t.fair_key <= ",
            $after,
            "
                  ORDER BY t.fair_key LIMIT 1)
                 UNION ALL
                 -- The next priority down (one descent finds it and its first key): its
                 -- first key after `$after`, else its first.
                 (SELECT np.priority, coalesce(past.fair_key, np.fair_key),
                         CASE WHEN past.fair_key IS NULL THEN 1 ELSE 0 END
                  FROM (SELECT t.priority::bigint AS priority, t.fair_key FROM tasks t
                        WHERE t.status = 'waiting' AND t.queue = l.queue AND t.task_class = l.task_class
                          AND t.priority < l.priority
                        ORDER BY t.priority DESC, t.fair_key LIMIT 1) np
                  LEFT JOIN LATERAL (
                      SELECT t.fair_key FROM tasks t
                      WHERE t.status = 'waiting' AND t.queue = l.queue AND t.task_class = l.task_class
                        AND t.priority = np.priority AND t.fair_key > ",
            $after,
            "
                      ORDER BY t.fair_key LIMIT 1) past ON true)
                 LIMIT 1) n
             WHERE l.depth < ",
            $depth,
            "
         ), levels AS (
             SELECT queue, task_class, priority::int AS priority, fair_key, depth FROM walk WHERE depth > 0
         ), cut AS (
             SELECT coalesce(max(depth), 0) >= ",
            $depth,
            " AS cut FROM walk
         )"
        )
    };
}

/// The end of the claim statements, from `candidates` (`ctid`, `id`, `ord`) on: `room`,
/// what a limit at once (`$9`) leaves of the `$2` asked for (claims of a queue with a
/// limit hold its lock, and the statement's snapshot follows the lock).
macro_rules! claim_room {
    () => {
        "     ), room AS (
         SELECT CASE WHEN $9::int IS NULL THEN $2
                     ELSE least($2, greatest(0, $9::int - (SELECT count(*) FROM tasks r
                                                         WHERE r.status = 'running' AND r.queue = ANY($5))))
                END AS n
"
    };
}

/// The fair claims' lock and update: the first `room` candidates in claim order, those
/// another claim holds passed over (a join in claim order, locking as it goes, cost a
/// quarter more per claim in a drain), and execution ids in claim order.
macro_rules! claim_in_order {
    () => {
        "     ), picked AS (
         SELECT t.ctid FROM tasks t
         WHERE t.ctid = ANY(ARRAY(SELECT ctid FROM candidates ORDER BY ord LIMIT (SELECT n FROM room)))
           AND t.status IS NOT DISTINCT FROM 'waiting' AND t.run_at <= now()
         FOR UPDATE SKIP LOCKED
     ), claimed AS (
         UPDATE tasks t
         SET status = 'running', instance = $3, attempts = t.attempts + 1, updated_at = now()
         WHERE t.ctid = ANY(ARRAY(SELECT ctid FROM picked))
         RETURNING t.id, t.task_class, t.task_parameters, t.attempts, t.max_attempts, t.fair_key, t.timeout_ms
     ), numbered AS (
         SELECT c.*, nextval('task_executions_id_seq') AS execution_id
         FROM (SELECT claimed.*, k.ord FROM claimed JOIN candidates k ON k.id = claimed.id ORDER BY k.ord) c
"
    };
}

/// The claims' result: the claimed tasks, and on every row whether the queue has a
/// limit, the room the limit left, whether more waits (`$levels_cut`: levels read only
/// in part; or levels left unwalked), and how many keys the walk met.
macro_rules! claim_result {
    ($levels_cut:literal) => {
        concat!(
            "     ), settings AS (
         SELECT bool_or(s.concurrency IS NOT NULL OR s.key_concurrency IS NOT NULL OR s.rate_limit IS NOT NULL)
                    AS limited
         FROM task_engine_queues s WHERE s.name = ANY($5)
     )
     SELECT c.id, c.task_class, c.task_parameters::text AS task_parameters, c.attempts AS attempt,
            c.max_attempts, c.fair_key, c.timeout_ms, c.execution_id, now() AS claimed_at, w.seen AS candidates,
            coalesce(s.limited, false) AS limited, (SELECT n FROM room) AS room,
            ",
            $levels_cut,
            " OR (SELECT cut FROM cut) AS unread,
            (SELECT count(DISTINCT fair_key) FROM levels) AS keys
     FROM (SELECT count(*) AS seen FROM candidates) w
     CROSS JOIN settings s
     LEFT JOIN numbered c ON true
     ORDER BY c.execution_id"
        )
    };
}

/// The statement of [`claim`] and [`claim_limited`] while the queue's waiting tasks
/// have one key (none, most often): `candidates` reads the first `$4` tasks due now of
/// each level (each level's due tasks are the head of its range of `tasks_claim_idx`,
/// so tasks due later, other types and other queues are never read) and keeps the
/// first `$4` in claim order (higher priority first, then the one due first, then the
/// older); `picked` locks the first `$2` of them that no other claim holds, and
/// `claimed` updates those. Both find their rows by their physical address (`ctid`, a
/// TID scan) rather than by descending the primary key once per task; a row changed
/// since the candidates were read has moved, and is passed over (it was claimed, or is
/// no longer due). `IS NOT DISTINCT FROM` (status is never null: the same as `=`) keeps
/// the planner from proving `tasks_claim_idx`'s predicate and walking the whole index
/// for the candidates' addresses, which statistics taken on an empty table make look
/// cheap. Each row says whether the queue has a limit, whether more may wait, and how
/// many keys the walk met (more than one: the next claim is [`CLAIM_FAIR`]).
const CLAIM: &str = concat!(
    "WITH RECURSIVE ",
    waiting_levels!("$1", "$5", "$7", "$8", "16"),
    ", candidates AS (
         SELECT c.ctid FROM levels l CROSS JOIN LATERAL (
             SELECT t.ctid, t.id, t.priority, t.run_at FROM tasks t
             WHERE t.status = 'waiting' AND t.queue = l.queue AND t.task_class = l.task_class
               AND t.priority = l.priority AND t.fair_key = l.fair_key AND t.run_at <= now()
             ORDER BY t.run_at, t.id
             LIMIT $4) c
         ORDER BY c.priority DESC, c.run_at, c.id
         LIMIT $4
",
    claim_room!(),
    "     ), picked AS (
         SELECT t.ctid FROM tasks t
         WHERE t.ctid = ANY(ARRAY(SELECT ctid FROM candidates))
           AND t.status IS NOT DISTINCT FROM 'waiting' AND t.run_at <= now()
         ORDER BY t.priority DESC, t.run_at, t.id
         LIMIT (SELECT n FROM room)
         FOR UPDATE SKIP LOCKED
     ), claimed AS (
         UPDATE tasks t
         SET status = 'running', instance = $3, attempts = t.attempts + 1, updated_at = now()
         WHERE t.ctid = ANY(ARRAY(SELECT ctid FROM picked))
         RETURNING t.id, t.task_class, t.task_parameters, t.attempts, t.max_attempts, t.fair_key, t.priority,
                   t.run_at, t.timeout_ms
     ), numbered AS (
         -- Execution ids in claim order.
         SELECT c.*, nextval('task_executions_id_seq') AS execution_id
         FROM (SELECT * FROM claimed ORDER BY priority DESC, run_at, id) c
",
    claim_result!("false")
);

/// The statement of [`claim`] and [`claim_limited`] among several keys: as [`CLAIM`],
/// but each level gives an even share of the candidates, and they are taken in turns:
/// every level's first task (higher priority first; among equals, in the walk's order:
/// the keys after `$8`, the key this claimer served last, first), then every level's
/// second, and so on.
/// So one key's backlog never fills a claim while another key waits, and from one
/// claim to the next the keys take turns even for claims of one task.
const CLAIM_FAIR: &str = concat!(
    "WITH RECURSIVE ",
    waiting_levels!("$1", "$5", "$7", "$8", "16"),
    ", sizing AS (
         -- Each level's share of the candidates: an even share, at least 4.
         SELECT greatest(4, ($4 + count(*) - 1) / greatest(count(*), 1)) AS per_level FROM levels
     ), heads AS (
         -- `depth` orders the levels of one priority: keys from the one after `$8` round.
         SELECT c.ctid, c.id, l.priority, l.depth, c.turn, c.turn = z.per_level AS level_full
         FROM sizing z CROSS JOIN levels l CROSS JOIN LATERAL (
             SELECT x.ctid, x.id, row_number() OVER (ORDER BY x.run_at, x.id) AS turn
             FROM (
                 SELECT t.ctid, t.id, t.run_at FROM tasks t
                 WHERE t.status = 'waiting' AND t.queue = l.queue AND t.task_class = l.task_class
                   AND t.priority = l.priority AND t.fair_key = l.fair_key AND t.run_at <= now()
                 ORDER BY t.run_at, t.id
                 LIMIT z.per_level) x) c
     ), candidates AS (
         SELECT h.ctid, h.id, row_number() OVER (ORDER BY h.priority DESC, h.turn, h.depth) AS ord
         FROM heads h
         ORDER BY h.priority DESC, h.turn, h.depth
         LIMIT $4
",
    claim_room!(),
    claim_in_order!(),
    claim_result!("coalesce((SELECT bool_or(level_full) FROM heads), false)")
);

/// The statement of [`claim_limited`] under a limit per key. `candidates` reads the first `$4`
/// tasks due now of each level (each level's due tasks are the head of its range of
/// `tasks_claim_idx`, so tasks due later, other types and other keys are never read),
/// keeps at most `$6 - running` of each key (`$6`, the queue's limit per key, null for
/// none) and the first `$4` in claim order: higher priority first, then keys in turn
/// (a key's first task comes after as many turns as it has tasks running: the key
/// with the fewest running goes first), then the one due first.
/// `picked` locks the first `$2` of them that no other claim holds, and `claimed`
/// updates those. Both find their rows by their physical address (`ctid`, a TID scan)
/// rather than by descending the primary key once per task; a row changed since the
/// candidates were read has moved, and is passed over (it was claimed, or is no
/// longer due). `IS NOT DISTINCT FROM` (status is never null: the same as `=`) keeps
/// the planner from proving `tasks_claim_idx`'s predicate and walking the whole index
/// for the candidates' addresses, which statistics taken on an empty table make look
/// cheap. Each row says whether the queue has a limit.
const CLAIM_CAPPED: &str = concat!(
    "WITH RECURSIVE ",
    // At most 16 levels per (queue, type): a claim's cost stays that of a few levels
    // whatever the number of keys; the keys past them come in the next claims.
    waiting_levels!("$1", "$5", "$7", "$8", "16"),
    ", sizing AS (
         -- Each level's share of the candidates: all of them for one level, an even
         -- share for many (keys), at least 4.
         SELECT greatest(4, ($4 + count(*) - 1) / greatest(count(*), 1)) AS per_level FROM levels
     ), heads AS (
         SELECT c.ctid, l.priority, l.fair_key, c.run_at, c.id, c.level_rows = z.per_level AS level_full,
                row_number() OVER (PARTITION BY l.fair_key ORDER BY l.priority DESC, c.run_at, c.id) AS turn
         FROM sizing z CROSS JOIN levels l CROSS JOIN LATERAL (
             SELECT x.*, count(*) OVER () AS level_rows FROM (
                 SELECT t.ctid, t.id, t.run_at FROM tasks t
                 WHERE t.status = 'waiting' AND t.queue = l.queue AND t.task_class = l.task_class
                   AND t.priority = l.priority AND t.fair_key = l.fair_key AND t.run_at <= now()
                 ORDER BY t.run_at, t.id
                 LIMIT z.per_level) x) c
     ), busy AS (
         -- Under a limit per key, or among several keys: what runs of each key
         -- (tasks_running_idx), so that a key's turns come after its running tasks.
         SELECT r.fair_key, count(*) AS running FROM tasks r
         WHERE ($6::int IS NOT NULL OR (SELECT count(DISTINCT fair_key) FROM levels) > 1)
           AND r.status = 'running' AND r.queue = ANY($5) AND r.fair_key IN (SELECT fair_key FROM levels)
         GROUP BY r.fair_key
     ), allowed AS (
         SELECT h.*, h.turn + coalesce(b.running, 0) AS place,
                ($6::int IS NULL OR h.turn <= $6::int - coalesce(b.running, 0)) AS fits
         FROM heads h LEFT JOIN busy b ON b.fair_key = h.fair_key
     ), candidates AS (
         -- Among keys at the same place, those after `$8` (the key this claimer served
         -- last) first: round robin from one claim to the next.
         SELECT a.ctid, a.id, row_number() OVER (ORDER BY a.priority DESC, a.place, a.fair_key <= $8, a.fair_key,
                                                    a.run_at, a.id) AS ord
         FROM allowed a WHERE a.fits
         ORDER BY a.priority DESC, a.place, a.fair_key <= $8, a.fair_key, a.run_at, a.id
         LIMIT $4
",
    claim_room!(),
    claim_in_order!(),
    // Levels cut at their share count only for keys the limit per key did not cut.
    claim_result!(
        "coalesce((SELECT bool_or(a.level_full) FROM allowed a
                   WHERE NOT EXISTS (SELECT 1 FROM allowed x WHERE x.fair_key = a.fair_key AND NOT x.fits)),
                  false)"
    )
);

/// What a claim got.
#[derive(Debug, Default)]
pub(crate) struct Claim {
    pub tasks: Vec<ClaimedTask>,
    /// Whether tasks may wait that this claim did not reach: it came back short after
    /// finding as many candidates as it reads, other claims holding some of them, or
    /// it read only a share of a level (many keys). The claimer should claim again
    /// rather than take the queue for drained.
    pub more: bool,
    /// The queue has a limit: claim it with [`claim_limited`] (a plain [`claim`] of it
    /// claims nothing).
    pub limited: bool,
    /// The queue's rate limit is used up for this window: how long until the next one.
    pub rate_wait: Option<Duration>,
    /// The key of the last task claimed: where the next claim's round of keys starts.
    pub last_key: Option<String>,
    /// How many keys the claim's walk met among the waiting tasks: more than one, and
    /// the next claim should be fair ([`LaneClaim::fair`]).
    pub keys: i64,
}

/// Claims up to `limit` runnable tasks of the given types in `queue` for `instance`:
/// locks them with `FOR UPDATE SKIP LOCKED` (rows other claimers hold are passed over,
/// not waited for), marks them `running` with one more attempt (while it runs,
/// `updated_at` is its start) and takes an execution id for each, all in one statement.
/// Highest priority first, then keys in turn, then earliest due, then oldest. The
/// attempts' executions are written when they end, in one insert ([`complete`]): an
/// execution opened here and closed there cost a second write of the row, most often
/// on another page, with two more index entries, per task. Claims nothing from a
/// paused queue or one with a limit, and says so.
///
/// Its cost follows the tasks it claims and the (type, priority, key) levels in use, not
/// the number of waiting tasks: it reads at most `2.5 * limit + 16` candidates (room for
/// the rows concurrent claims hold) through `tasks_claim_idx`, or a share of that per
/// level when levels are many. Run it on a connection set up by
/// [`prepare_claimer_session`], so that the plan is the same whatever the table's
/// statistics: a burst into a table analyzed while empty would otherwise be claimed by
/// a bitmap scan and a sort of every waiting task.
pub(crate) fn claim(conn: &mut PgConnection, lane: &LaneClaim<'_>, limit: i64) -> QueryResult<Claim> {
    run_claim(conn, lane, limit, QueueLimits::default(), false)
}

/// Who claims, from where: the same from one claim to the next, but `after_key`.
#[derive(Clone, Copy)]
pub(crate) struct LaneClaim<'a> {
    pub instance: &'a str,
    pub queue: &'a str,
    pub task_types: &'a [&'a str],
    /// The key this claimer served last (`last_key` of its last claim; `""` at first).
    pub after_key: &'a str,
    /// Whether keys take turns ([`CLAIM_FAIR`]): the last claim met more than one.
    pub fair: bool,
}

/// A queue's settings, as [`claim_limited`] reads them under the queue's row lock.
#[derive(QueryableByName)]
struct Limits {
    #[diesel(sql_type = Bool)]
    paused: bool,
    #[diesel(sql_type = Nullable<Integer>)]
    concurrency: Option<i32>,
    #[diesel(sql_type = Nullable<Integer>)]
    key_concurrency: Option<i32>,
    /// Claims left in the rate limit's window (a new window: all of them).
    #[diesel(sql_type = Nullable<BigInt>)]
    rate_left: Option<i64>,
    /// Seconds until the window ends.
    #[diesel(sql_type = Nullable<Double>)]
    window_left: Option<f64>,
}

/// Claims from a queue with limits ([`claim`] otherwise), in one transaction: locks the
/// queue's row in `task_engine_queues` (claims of this queue from every instance wait
/// for one another there, so that each counts what the others claimed: the limits are
/// never overshot), counts its running tasks (`tasks_running_idx`), claims no
/// more than its concurrency, its rate limit's window and its limit per key leave, and
/// counts the claims in the window. A queue without a row, or without limits, is
/// claimed as by [`claim`]; a paused one not at all. Changes the queue's row and the
/// claimed tasks.
pub(crate) fn claim_limited(conn: &mut PgConnection, lane: &LaneClaim<'_>, limit: i64) -> QueryResult<Claim> {
    let queue = lane.queue;
    conn.transaction(|conn| {
        let limits: Option<Limits> = Prepared(
            diesel::sql_query(
                "SELECT paused, concurrency, key_concurrency,
                        CASE WHEN rate_limit IS NULL THEN NULL
                             WHEN window_start IS NULL OR now() >= window_start + rate_period THEN rate_limit::bigint
                             ELSE rate_limit - window_count END AS rate_left,
                        extract(epoch FROM window_start + rate_period - now())::float8 AS window_left
                 FROM task_engine_queues WHERE name = $1
                 FOR UPDATE",
            )
            .bind::<Text, _>(queue),
        )
        .get_result(conn)
        .optional()?;
        let Some(limits) = limits else {
            return run_claim(conn, lane, limit, QueueLimits::default(), true);
        };
        if limits.paused {
            return Ok(Claim { limited: true, ..Claim::default() });
        }
        // What runs is counted by the claim itself: a statement after the lock, whose
        // snapshot sees every claim of this queue committed before.
        let mut room = limit;
        let mut rate_wait = None;
        if let Some(left) = limits.rate_left {
            room = room.min(left);
            if left <= 0 {
                rate_wait = Some(Duration::from_secs_f64(limits.window_left.unwrap_or(0.0).max(0.001)));
            }
        }
        let limited = limits.concurrency.is_some() || limits.key_concurrency.is_some() || limits.rate_left.is_some();
        if room <= 0 {
            return Ok(Claim { limited, rate_wait, ..Claim::default() });
        }
        let applied = QueueLimits { concurrency: limits.concurrency, key_cap: limits.key_concurrency };
        let mut claim = run_claim(conn, lane, room, applied, true)?;
        if limits.rate_left.is_some() && !claim.tasks.is_empty() {
            let claimed = i32::try_from(claim.tasks.len()).unwrap_or(i32::MAX);
            Prepared(
                diesel::sql_query(
                    "UPDATE task_engine_queues
                     SET window_count = CASE WHEN window_start IS NULL OR now() >= window_start + rate_period
                                             THEN $2 ELSE window_count + $2 END,
                         window_start = CASE WHEN window_start IS NULL OR now() >= window_start + rate_period
                                             THEN now() ELSE window_start END
                     WHERE name = $1",
                )
                .bind::<Text, _>(queue)
                .bind::<Integer, _>(claimed),
            )
            .execute(conn)?;
        }
        claim.limited = limited;
        Ok(claim)
    })
}

/// A queue's limits as one claim applies them.
#[derive(Debug, Clone, Copy, Default)]
struct QueueLimits {
    /// At most this many running at once (the claim counts them).
    concurrency: Option<i32>,
    /// At most this many of one key running at once.
    key_cap: Option<i32>,
}

/// Runs [`CLAIM`] (or a fair one) for one queue under `limits`; `locked` says the
/// caller holds the queue's row lock (and may claim from a queue with limits).
fn run_claim(
    conn: &mut PgConnection,
    lane: &LaneClaim<'_>,
    limit: i64,
    limits: QueueLimits,
    locked: bool,
) -> QueryResult<Claim> {
    let QueueLimits { concurrency, key_cap } = limits;
    let LaneClaim { instance, queue, task_types, after_key, .. } = *lane;
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Nullable<BigInt>)]
        id: Option<i64>,
        #[diesel(sql_type = Nullable<Text>)]
        task_class: Option<String>,
        #[diesel(sql_type = Nullable<Text>)]
        task_parameters: Option<String>,
        #[diesel(sql_type = Nullable<Integer>)]
        attempt: Option<i32>,
        #[diesel(sql_type = Nullable<Integer>)]
        max_attempts: Option<i32>,
        #[diesel(sql_type = Nullable<Text>)]
        fair_key: Option<String>,
        #[diesel(sql_type = Nullable<Integer>)]
        timeout_ms: Option<i32>,
        #[diesel(sql_type = Nullable<BigInt>)]
        execution_id: Option<i64>,
        #[diesel(sql_type = Timestamptz)]
        claimed_at: DateTime<Utc>,
        #[diesel(sql_type = BigInt)]
        candidates: i64,
        #[diesel(sql_type = Bool)]
        limited: bool,
        #[diesel(sql_type = BigInt)]
        room: i64,
        #[diesel(sql_type = Bool)]
        unread: bool,
        #[diesel(sql_type = BigInt)]
        keys: i64,
    }
    // 2.5 x the limit: with three instances claiming at once, 1.5 x left a claim short
    // (other claims holding its candidates) one time in two, and 4 x read more than
    // it saved (20,000-task drains, medians of 3: 22,000, 27,300 and 23,300 tasks/s).
    let window = limit.saturating_mul(5) / 2 + 16;
    // The fair statements cost more than the simple one: only where keys take turns.
    let statement = match (key_cap, lane.fair) {
        (Some(_), _) => CLAIM_CAPPED,
        (None, true) => CLAIM_FAIR,
        (None, false) => CLAIM,
    };
    let rows: Vec<Row> = Prepared(
        diesel::sql_query(statement)
            .bind::<Array<Text>, _>(task_types)
            .bind::<BigInt, _>(limit)
            .bind::<Text, _>(instance)
            .bind::<BigInt, _>(window)
            .bind::<Array<Text>, _>(&[queue][..])
            .bind::<Nullable<Integer>, _>(key_cap)
            .bind::<Bool, _>(locked)
            .bind::<Text, _>(after_key)
            .bind::<Nullable<Integer>, _>(concurrency),
    )
    .load(conn)?;
    let Some(first) = rows.first() else { return Ok(Claim::default()) };
    let (candidates, limited, unread, keys, room) =
        (first.candidates, first.limited, first.unread, first.keys, first.room);
    let last_key = rows.last().and_then(|r| r.fair_key.clone());
    let tasks: Vec<ClaimedTask> = rows
        .into_iter()
        .filter_map(|r| {
            Some(ClaimedTask {
                id: r.id?,
                task_type: r.task_class?,
                task_parameters: r.task_parameters?,
                attempt: r.attempt?,
                max_attempts: r.max_attempts?,
                execution_id: r.execution_id?,
                claimed_at: r.claimed_at,
                limited: locked && limited,
                timeout: r.timeout_ms.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(1))),
            })
        })
        .collect();
    let more = (candidates >= window || unread) && (tasks.len() as i64) < room;
    Ok(Claim { tasks, more, limited, rate_wait: None, last_key, keys })
}

/// Sets up a connection that claims (the producer's) or looks for due tasks: with
/// sequential and bitmap scans off, [`claim`] and [`due`] walk `tasks_claim_idx` level
/// by level whatever the statistics say (taken while the table was empty, they make a
/// scan look cheaper). Their generic plan is kept: planning the claim anew, as a
/// custom plan would, takes longer (about 1 ms) than running it. JIT is off: once
/// statistics show a big table, the plan's estimated cost (which the disabled scans
/// inflate) passes `jit_above_cost`, and compiling it took 400 ms, every claim. Lock
/// waits are bounded by [`ROW_LOCK_WAIT`]. Changes this session's settings only.
pub(crate) fn prepare_claimer_session(conn: &mut PgConnection) -> QueryResult<()> {
    conn.batch_execute(PLAN_BY_INDEX)?;
    bound_lock_waits(conn)
}

/// The settings of [`prepare_claimer_session`].
const PLAN_BY_INDEX: &str =
    "SET enable_seqscan = off; SET enable_bitmapscan = off; SET plan_cache_mode = force_generic_plan; SET jit = off";

/// How an attempt ended, as the task row will show it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// Ran to completion with this result: the task becomes `stopped`.
    Succeeded(serde_json::Value),
    /// Failed for good: the task becomes `failed`.
    Failed(String),
    /// Failed, to be tried again after `delay` (from the server's clock): the task goes
    /// back to `waiting`.
    Retry { error: String, delay: Duration },
    /// Asked to run again after `delay`, without using an attempt: the task goes back
    /// to `waiting` with one more attempt allowed.
    Snoozed { delay: Duration },
}

/// A finished attempt, waiting to be recorded.
#[derive(Debug, Clone)]
pub(crate) struct Completion {
    pub execution_id: i64,
    pub task_id: i64,
    pub attempt: i32,
    pub worker: i32,
    /// The claim's time on the server ([`ClaimedTask::claimed_at`]).
    pub claimed_at: DateTime<Utc>,
    /// How long the task waited in the instance between its claim and its start: the
    /// execution's `started_at` is the claim's time plus this.
    pub queued: Duration,
    /// How long the attempt ran, measured by the worker: `stopped_at` is the corrected
    /// `started_at` plus this, so that both come from the server's clock.
    pub elapsed: Duration,
    pub outcome: Outcome,
    /// The task ran under its queue's limit: once recorded, its place is free, and the
    /// instances waiting for one must be told.
    pub frees_a_place: bool,
}

/// The statement of [`complete`].
const COMPLETE: &str = "WITH moved AS (
             UPDATE tasks t
             SET status = CASE WHEN t.cancel_requested_at IS NOT NULL AND d.status <> 'stopped' THEN 'cancelled'
                               WHEN d.status = 'snoozed' THEN 'waiting' ELSE d.status END,
                 -- A snooze uses no attempt: one more is allowed.
                 max_attempts = t.max_attempts + CASE WHEN d.status = 'snoozed' THEN 1 ELSE 0 END,
                 -- Back to waiting, a task that held its key only while waiting lets it go:
                 -- a newer task may hold it now (migration 16).
                 unique_scope = CASE WHEN d.status IN ('waiting', 'snoozed') AND t.unique_key IS NOT NULL
                                      AND t.unique_scope = 'waiting' THEN 'released' ELSE t.unique_scope END,
                 run_at = CASE WHEN d.delay_us IS NULL THEN t.run_at
                               ELSE now() + d.delay_us * interval '1 microsecond' END,
                 updated_at = now()
             FROM unnest($2::bigint[], $3::int[], $6::text[], $9::bigint[]) AS d(task_id, attempt, status, delay_us)
             -- `IS NOT DISTINCT FROM` (status is never null: the same as `=`) does not let
             -- the planner prove the predicate of tasks_running_idx: statistics taken while
             -- nothing ran make that index look empty, and a walk of every running task,
             -- each checked against the whole batch, costs the square of the batch.
             WHERE t.id = ANY($2) AND t.id = d.task_id AND t.attempts = d.attempt
               AND t.status IS NOT DISTINCT FROM 'running'
             RETURNING t.id, t.instance, t.run_at
         ), notified AS (
             -- Under a queue's limit (`$12`), each recorded attempt freed a place: wake the
             -- instances that found the queue full, in this statement's commit.
             SELECT pg_notify(task_engine_channel(), json_build_object('ready', count(*))::text)
             FROM moved WHERE $12 HAVING count(*) > 0
         )
         INSERT INTO task_executions (id, task_id, attempt, started_at, stopped_at, result, error, instance, worker,
                                      snoozed_until)
         SELECT d.execution_id, d.task_id, d.attempt,
                d.claimed_at + d.queued_us * interval '1 microsecond',
                d.claimed_at + (d.queued_us + d.elapsed_us) * interval '1 microsecond',
                d.result, d.error, m.instance, d.worker,
                CASE WHEN d.status = 'snoozed' THEN m.run_at END
         FROM unnest($1::bigint[], $2::bigint[], $3::int[], $4::int[], $5::bigint[], $7::jsonb[], $8::text[],
                     $10::bigint[], $11::timestamptz[], $6::text[])
              AS d(execution_id, task_id, attempt, worker, elapsed_us, result, error, queued_us, claimed_at, status)
         JOIN moved m ON m.id = d.task_id
         -- Reading `notified` is what runs its pg_notify (once, before the first row).
         WHERE (SELECT count(*) FROM notified) >= 0";

/// Records finished attempts, in one statement: moves each task still running that
/// attempt to the outcome's state, and writes the attempt's execution (start, end,
/// result or error, instance, worker); a task an operator cancelled while it ran ends
/// `cancelled` unless the attempt succeeded; under a queue's limit, notifies the
/// instances that a place is free. Locks the batch's task rows. An attempt
/// whose task is no longer running it (the rescue took it, and wrote its execution as
/// lost, in one statement) changes nothing and writes nothing, so each attempt has one
/// execution. Returns how many attempts were recorded.
///
/// Run it on a connection set up by [`prepare_completer_session`]: there the plan finds
/// the batch's tasks by primary key and joins by hash (or merge) whatever the
/// statistics and the batch's size, so the statement can stay prepared, with a generic
/// plan, and is not planned again for every batch.
pub(crate) fn complete(conn: &mut PgConnection, completions: &[Completion]) -> QueryResult<usize> {
    let n = completions.len();
    let mut queued_us = Vec::with_capacity(n);
    let claimed_at: Vec<DateTime<Utc>> = completions.iter().map(|c| c.claimed_at).collect();
    let (mut execution_ids, mut task_ids, mut attempts, mut workers, mut elapsed_us) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut statuses, mut results, mut errors, mut delays_us) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for c in completions {
        execution_ids.push(c.execution_id);
        task_ids.push(c.task_id);
        attempts.push(c.attempt);
        workers.push(c.worker);
        elapsed_us.push(micros(c.elapsed));
        queued_us.push(micros(c.queued));
        let (status, result, error, delay) = match &c.outcome {
            Outcome::Succeeded(result) => ("stopped", Some(result), None, None),
            Outcome::Failed(error) => ("failed", None, Some(error.as_str()), None),
            Outcome::Retry { error, delay } => ("waiting", None, Some(error.as_str()), Some(micros(*delay))),
            Outcome::Snoozed { delay } => ("snoozed", None, None, Some(micros(*delay))),
        };
        statuses.push(status);
        results.push(result);
        errors.push(error);
        delays_us.push(delay);
    }
    Prepared(
        diesel::sql_query(COMPLETE)
            .bind::<Array<BigInt>, _>(execution_ids)
            .bind::<Array<BigInt>, _>(task_ids)
            .bind::<Array<Integer>, _>(attempts)
            .bind::<Array<Integer>, _>(workers)
            .bind::<Array<BigInt>, _>(elapsed_us)
            .bind::<Array<Text>, _>(statuses)
            .bind::<Array<Nullable<Jsonb>>, _>(results)
            .bind::<Array<Nullable<Text>>, _>(errors)
            .bind::<Array<Nullable<BigInt>>, _>(delays_us)
            .bind::<Array<BigInt>, _>(queued_us)
            .bind::<Array<Timestamptz>, _>(claimed_at)
            .bind::<Bool, _>(completions.iter().any(|c| c.frees_a_place)),
    )
    .execute(conn)
}

/// How long the producer's and the completer's statements may wait for a row another
/// session holds locked: then the statement fails. The completer then sets aside the
/// attempts whose rows are locked ([`locked_by_others`]) and records the others; a
/// give-back that fails leaves its tasks to the rescue.
pub(crate) const ROW_LOCK_WAIT: Duration = Duration::from_secs(1);

/// Bounds this session's lock waits by [`ROW_LOCK_WAIT`] (the producer's connection;
/// the completer's gets it from [`prepare_completer_session`]).
pub(crate) fn bound_lock_waits(conn: &mut PgConnection) -> QueryResult<()> {
    conn.batch_execute(&format!("SET lock_timeout = {}", ROW_LOCK_WAIT.as_millis()))
}

/// Sets up the completer's own connection for [`complete`]: with sequential scans and
/// nested loops off (and JIT, as for the claim), the planner finds the batch's rows through the primary keys
/// (`id = ANY(...)`) and joins them by hash even while stale statistics make a scan of
/// the whole table look cheap; its lock waits are bounded by [`ROW_LOCK_WAIT`]. Changes
/// this session's settings only.
pub(crate) fn prepare_completer_session(conn: &mut PgConnection) -> QueryResult<()> {
    conn.batch_execute("SET enable_seqscan = off; SET enable_nestloop = off; SET jit = off")?;
    bound_lock_waits(conn)
}

/// The tasks of `completions` whose row another session holds locked now. Tries to
/// lock each with `SKIP LOCKED` for this statement only (its locks end with it), and
/// waits for none.
pub(crate) fn locked_by_others(conn: &mut PgConnection, completions: &[Completion]) -> QueryResult<Vec<i64>> {
    #[derive(QueryableByName)]
    struct Locked {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    let task_ids: Vec<i64> = completions.iter().map(|c| c.task_id).collect();
    let locked: Vec<Locked> = diesel::sql_query(
        "WITH t AS (SELECT id FROM tasks WHERE id = ANY($1) FOR UPDATE SKIP LOCKED)
         SELECT x.id FROM tasks x WHERE x.id = ANY($1) AND x.id NOT IN (SELECT id FROM t)",
    )
    .bind::<Array<BigInt>, _>(task_ids)
    .load(conn)?;
    Ok(locked.into_iter().map(|l| l.id).collect())
}

/// Undoes the claims of tasks that never started (the instance is stopping, or they
/// waited too long for a worker): puts the tasks `instance` still runs that attempt of
/// back to waiting with the attempt given back (or `cancelled`, if a cancel came
/// meanwhile), locking those task rows; no execution was written for them. Notifies
/// the engine's channel, so that sleeping instances wake (an update fires no insert
/// trigger). Returns how many tasks wait again.
pub(crate) fn release(conn: &mut PgConnection, instance: &str, claimed: &[ClaimedTask]) -> QueryResult<usize> {
    #[derive(QueryableByName)]
    struct Released {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let ids: Vec<i64> = claimed.iter().map(|t| t.id).collect();
    let attempts: Vec<i32> = claimed.iter().map(|t| t.attempt).collect();
    let released: Released = diesel::sql_query(
        "WITH moved AS (
             UPDATE tasks t
             SET status = CASE WHEN t.cancel_requested_at IS NOT NULL THEN 'cancelled' ELSE 'waiting' END,
                 attempts = t.attempts - 1, updated_at = now(),
                 -- A newer task may hold the key it held only while waiting.
                 unique_scope = CASE WHEN t.unique_key IS NOT NULL AND t.unique_scope = 'waiting' THEN 'released'
                                     ELSE t.unique_scope END
             FROM unnest($1::bigint[], $2::int[]) AS g(id, attempt)
             WHERE t.id = ANY($1) AND t.id = g.id
               AND t.status = 'running' AND t.attempts = g.attempt AND t.instance = $3
             RETURNING t.id
         ), counted AS (
             SELECT count(*) AS n FROM moved
         ), notified AS (
             SELECT pg_notify(task_engine_channel(), json_build_object('ready', n)::text) FROM counted WHERE n > 0
         )
         -- Reading `notified` (in the select list, where no join removal drops it) is
         -- what runs its pg_notify.
         SELECT n, (SELECT count(*) FROM notified) AS notifications FROM counted",
    )
    .bind::<Array<BigInt>, _>(ids)
    .bind::<Array<Integer>, _>(attempts)
    .bind::<Text, _>(instance)
    .get_result(conn)?;
    Ok(usize::try_from(released.n).unwrap_or(0))
}

/// Records an attempt that passed its time limit and grace without returning (its
/// worker abandoned): writes its execution, with `completion`'s error, if `instance`
/// still runs that attempt and it has none yet. The task stays `running` here: it must
/// not run again while the abandoned thread may still run it. Locks nothing (it reads
/// the task's row; the execution's id, taken at the claim, makes a second write a
/// no-op).
pub(crate) fn record_timed_out(conn: &mut PgConnection, instance: &str, completion: &Completion) -> QueryResult<bool> {
    let error = match &completion.outcome {
        Outcome::Failed(error) | Outcome::Retry { error, .. } => error.as_str(),
        _ => "timed out",
    };
    let written = diesel::sql_query(
        "INSERT INTO task_executions (id, task_id, attempt, started_at, stopped_at, error, instance, worker)
         SELECT $1, t.id, t.attempts, $4 + $5 * interval '1 microsecond', now(), $6, t.instance, $7
         FROM tasks t
         WHERE t.id = $2 AND t.attempts = $3 AND t.status = 'running' AND t.instance = $8
         ON CONFLICT (id) DO NOTHING",
    )
    .bind::<BigInt, _>(completion.execution_id)
    .bind::<BigInt, _>(completion.task_id)
    .bind::<Integer, _>(completion.attempt)
    .bind::<Timestamptz, _>(completion.claimed_at)
    .bind::<BigInt, _>(micros(completion.queued))
    .bind::<Text, _>(error)
    .bind::<Integer, _>(completion.worker)
    .bind::<Text, _>(instance)
    .execute(conn)?;
    Ok(written == 1)
}

/// Moves on a task whose abandoned attempt ([`record_timed_out`]) has returned at
/// last: back to waiting after `retry` (a newer task may hold a key it held while
/// waiting), `failed` without one, `cancelled` if an operator asked; writes the
/// attempt's execution first if the watchdog could not. Notifies the engine's channel.
/// In one transaction; locks the task's row.
pub(crate) fn release_abandoned(
    conn: &mut PgConnection,
    instance: &str,
    completion: &Completion,
    retry: Option<Duration>,
) -> QueryResult<()> {
    conn.transaction(|conn| {
        record_timed_out(conn, instance, completion)?;
        diesel::sql_query(
            "WITH moved AS (
                 UPDATE tasks t
                 SET status = CASE WHEN t.cancel_requested_at IS NOT NULL THEN 'cancelled'
                                   WHEN $4::bigint IS NULL THEN 'failed' ELSE 'waiting' END,
                     run_at = CASE WHEN $4::bigint IS NULL THEN t.run_at
                                   ELSE now() + $4 * interval '1 microsecond' END,
                     unique_scope = CASE WHEN t.unique_key IS NOT NULL AND t.unique_scope = 'waiting'
                                         THEN 'released' ELSE t.unique_scope END,
                     updated_at = now()
                 WHERE t.id = $1 AND t.attempts = $2 AND t.status = 'running' AND t.instance = $3
                 RETURNING t.status, t.run_at
             )
             SELECT pg_notify(task_engine_channel(), json_build_object(
                        'ready', count(*),
                        'next_in', extract(epoch FROM min(run_at) FILTER (WHERE status = 'waiting') - now())
                    )::text)::text AS sent
             FROM moved HAVING count(*) > 0",
        )
        .bind::<BigInt, _>(completion.task_id)
        .bind::<Integer, _>(completion.attempt)
        .bind::<Text, _>(instance)
        .bind::<Nullable<BigInt>, _>(retry.map(micros))
        .execute(conn)
        .map(drop)
    })
}

/// A task to insert: see [`crate::NewTask`].
pub(crate) struct TaskInsert<'a> {
    pub task_type: &'a str,
    pub parameters: &'a serde_json::Value,
    pub priority: i32,
    pub run_at: Option<DateTime<Utc>>,
    /// Without `run_at`: due this long after the insert, on the server's clock.
    pub delay_us: i64,
    pub max_attempts: i32,
    pub queue: &'a str,
    /// For fair dispatch; `""` for none.
    pub key: &'a str,
    /// The unique key ([`crate::db::unique`]): a task with one is inserted by those
    /// statements, not [`insert_tasks`].
    pub unique_key: Option<&'a str>,
    /// While when it holds its key: `waiting` or `running`.
    pub unique_scope: &'a str,
    /// Its own time limit, in milliseconds (`None`: its type's).
    pub timeout_ms: Option<i32>,
}

#[derive(QueryableByName)]
struct InsertedId {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

/// Inserts tasks in one statement, whatever their number, and returns their ids in the
/// order given. A task without a run-at time is due after its delay (`now()` plus the
/// delay, usually none). Takes no lock beyond the new rows; the insert trigger may
/// notify.
pub(crate) fn insert_tasks(conn: &mut PgConnection, tasks: &[TaskInsert<'_>]) -> QueryResult<Vec<i64>> {
    let types: Vec<&str> = tasks.iter().map(|t| t.task_type).collect();
    let parameters: Vec<&serde_json::Value> = tasks.iter().map(|t| t.parameters).collect();
    let priorities: Vec<i32> = tasks.iter().map(|t| t.priority).collect();
    let run_ats: Vec<Option<DateTime<Utc>>> = tasks.iter().map(|t| t.run_at).collect();
    let max_attempts: Vec<i32> = tasks.iter().map(|t| t.max_attempts).collect();
    let delays_us: Vec<i64> = tasks.iter().map(|t| t.delay_us).collect();
    let queues: Vec<&str> = tasks.iter().map(|t| t.queue).collect();
    let keys: Vec<&str> = tasks.iter().map(|t| t.key).collect();
    let timeouts: Vec<Option<i32>> = tasks.iter().map(|t| t.timeout_ms).collect();
    // WITH ORDINALITY and the ORDER BY make the ids come back in input order.
    let rows: Vec<InsertedId> = Prepared(
        diesel::sql_query(
            "WITH inserted AS (
             INSERT INTO tasks (task_class, task_parameters, priority, run_at, max_attempts, queue, fair_key,
                                timeout_ms)
             SELECT c, p, pr, COALESCE(r, now() + d * interval '1 microsecond'), m, q, k, tm
             FROM unnest($1::text[], $2::jsonb[], $3::int[], $4::timestamptz[], $5::int[], $6::bigint[],
                         $7::text[], $8::text[], $9::int[])
                  WITH ORDINALITY AS n(c, p, pr, r, m, d, q, k, tm, ord)
             ORDER BY ord
             RETURNING id
         )
         SELECT id FROM inserted ORDER BY id",
        )
        .bind::<Array<Text>, _>(types)
        .bind::<Array<Jsonb>, _>(parameters)
        .bind::<Array<Integer>, _>(priorities)
        .bind::<Array<Nullable<Timestamptz>>, _>(run_ats)
        .bind::<Array<Integer>, _>(max_attempts)
        .bind::<Array<BigInt>, _>(delays_us)
        .bind::<Array<Text>, _>(queues)
        .bind::<Array<Text>, _>(keys)
        .bind::<Array<Nullable<Integer>>, _>(timeouts),
    )
    .load(conn)?;
    Ok(rows.into_iter().map(|r| r.id).collect())
}

/// Inserts `count` copies of one task in one statement (the parameters cross the wire
/// once) and returns their ids, ascending. Like [`insert_tasks`], locks nothing else.
pub(crate) fn insert_copies(conn: &mut PgConnection, task: &TaskInsert<'_>, count: i64) -> QueryResult<Vec<i64>> {
    let rows: Vec<InsertedId> = diesel::sql_query(
        "WITH inserted AS (
             INSERT INTO tasks (task_class, task_parameters, priority, run_at, max_attempts, queue, fair_key,
                                timeout_ms)
             SELECT $1, $2, $3, COALESCE($4, now() + $7 * interval '1 microsecond'), $5, $8, $9, $10
             FROM generate_series(1, $6)
             RETURNING id
         )
         SELECT id FROM inserted ORDER BY id",
    )
    .bind::<Text, _>(task.task_type)
    .bind::<Jsonb, _>(task.parameters)
    .bind::<Integer, _>(task.priority)
    .bind::<Nullable<Timestamptz>, _>(task.run_at)
    .bind::<Integer, _>(task.max_attempts)
    .bind::<BigInt, _>(count)
    .bind::<BigInt, _>(task.delay_us)
    .bind::<Text, _>(task.queue)
    .bind::<Text, _>(task.key)
    .bind::<Nullable<Integer>, _>(task.timeout_ms)
    .load(conn)?;
    Ok(rows.into_iter().map(|r| r.id).collect())
}

/// Writes what a running attempt says of itself: its progress (percent and message)
/// and its checkpoint, each only if given, for the task `task_id` while it still runs
/// attempt `attempt` (a rescued attempt writes nothing). Locks and changes the task's
/// row, but not `updated_at` (a running task's attempt start). Returns whether the task
/// was still running that attempt.
pub(crate) fn record_progress(
    conn: &mut PgConnection,
    task_id: i64,
    attempt: i32,
    progress: Option<(i16, &str)>,
    checkpoint: Option<&serde_json::Value>,
) -> QueryResult<bool> {
    let n = Prepared(
        diesel::sql_query(
            "UPDATE tasks SET progress = coalesce($3, progress), progress_message = coalesce($4, progress_message),
                              checkpoint = coalesce($5, checkpoint)
             WHERE id = $1 AND attempts = $2 AND status = 'running'",
        )
        .bind::<BigInt, _>(task_id)
        .bind::<Integer, _>(attempt)
        .bind::<Nullable<diesel::sql_types::SmallInt>, _>(progress.map(|p| p.0))
        .bind::<Nullable<Text>, _>(progress.map(|p| p.1))
        .bind::<Nullable<Jsonb>, _>(checkpoint),
    )
    .execute(conn)?;
    Ok(n == 1)
}

/// The checkpoint a task saved (by any of its attempts), if any. Locks nothing.
pub(crate) fn checkpoint(conn: &mut PgConnection, task_id: i64) -> QueryResult<Option<serde_json::Value>> {
    use crate::db::schema::tasks;
    Ok(tasks::table.find(task_id).select(tasks::checkpoint).first(conn).optional()?.flatten())
}

/// Whose running tasks a rescue takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lost {
    /// Those of a previous instance of this name (taken at start, under the name lock).
    PreviousSelf,
    /// Tasks marked running here that no worker here runs, claimed over a lease ago.
    OwnGhosts,
    /// Those of instances whose own lease expired, or that have no row and do not
    /// hold their name.
    Dead,
}

/// The rescue statement for running tasks matching `$lost`; its parameters: $1 this
/// instance, $2 its lease in microseconds, $3 the tasks in flight here, $4 why, $5 the
/// first key of the name locks, $6 the worker a lost attempt is recorded with (which
/// worker ran it died with its instance).
macro_rules! rescue_statement {
    ($lost:literal) => {
        concat!(
            "WITH lost AS (
                 SELECT t.id, t.attempts, t.instance, t.updated_at FROM tasks t
                 WHERE t.status = 'running' AND ",
            $lost,
            "
                 FOR UPDATE OF t SKIP LOCKED
             ), closed AS (
                 -- Versions before migration 12 opened the execution at the claim.
                 UPDATE task_executions e
                 SET stopped_at = now(), updated_at = now(),
                     error = format('lost: %s (instance %s, attempt %s)', $4::text, e.instance, e.attempt)
                 FROM lost
                 WHERE e.task_id = ANY(ARRAY(SELECT id FROM lost)) AND e.task_id = lost.id
                   AND e.attempt = lost.attempts AND e.stopped_at IS NULL
                 RETURNING e.task_id
             ), recorded AS (
                 -- A running task's `updated_at` is its attempt's start (the claim).
                 INSERT INTO task_executions (task_id, attempt, started_at, stopped_at, error, instance, worker)
                 SELECT l.id, l.attempts, l.updated_at, now(),
                        format('lost: %s (instance %s, attempt %s)', $4::text, l.instance, l.attempts),
                        l.instance, $6
                 FROM lost l
                 WHERE l.id NOT IN (SELECT task_id FROM closed)
                   -- An attempt whose worker was abandoned past its time limit is recorded.
                   AND NOT EXISTS (SELECT 1 FROM task_executions e WHERE e.task_id = l.id AND e.attempt = l.attempts)
             ), moved AS (
                 UPDATE tasks t
                 SET status = CASE WHEN t.cancel_requested_at IS NOT NULL THEN 'cancelled'
                                   WHEN t.attempts >= t.max_attempts THEN 'failed'
                                   ELSE 'waiting' END,
                     -- The default retry delay (attempt^4 + 3 s, give or take 10%): a
                     -- task that takes its instance down does not crash-loop the fleet.
                     run_at = now() + (power(least(t.attempts, 100), 4) + 3) * (0.9 + 0.2 * random())
                                      * interval '1 second',
                     -- A newer task may hold the key it held only while waiting.
                     unique_scope = CASE WHEN t.unique_key IS NOT NULL AND t.unique_scope = 'waiting'
                                         THEN 'released' ELSE t.unique_scope END,
                     updated_at = now()
                 WHERE t.id = ANY(ARRAY(SELECT id FROM lost))
                 RETURNING t.status, t.run_at
             ), notified AS (
                 -- Instances that run these types, not only this one, arm their timers;
                 -- and each rescued task freed a place under its queue's limit, if any.
                 SELECT pg_notify(task_engine_channel(), json_build_object(
                            'ready', count(*),
                            'next_in', extract(epoch FROM min(run_at) FILTER (WHERE status = 'waiting') - now())
                        )::text)
                 FROM moved HAVING count(*) > 0
             )
             SELECT count(*) FILTER (WHERE status = 'waiting') AS waiting,
                    (SELECT count(*) FROM notified) AS notifications
             FROM moved"
        )
    };
}

const RESCUE_PREVIOUS_SELF: &str = rescue_statement!("t.instance = $1");
const RESCUE_OWN_GHOSTS: &str = rescue_statement!(
    "t.instance = $1 AND NOT (t.id = ANY($3)) AND t.updated_at < now() - $2 * interval '1 microsecond'"
);
// An instance with a row is judged by the lease it recorded; one without a row (an
// operator deleted it, or it was paused for ten leases) only if it does not hold its
// name lock either: a live heartbeat holds it, and registers again.
const RESCUE_DEAD: &str = rescue_statement!(
    "t.instance <> $1
     AND NOT EXISTS (
         SELECT FROM task_engine_instances i
         WHERE i.name = t.instance
           AND i.last_seen_at >= now() - coalesce(i.lease, $2 * interval '1 microsecond'))
     AND (EXISTS (SELECT FROM task_engine_instances i WHERE i.name = t.instance)
          OR NOT EXISTS (
              SELECT FROM pg_locks l
              WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND l.classid = $5::int4::oid AND l.objid = hashtext(task_engine_channel() || '/' || t.instance)::oid))"
);

/// Records the lost attempts of the running tasks `lost` names (an execution from the
/// claim to now, with an error saying why and where), and puts their tasks back to waiting, due after the
/// default retry delay of their attempt (or `failed` after their last attempt,
/// `cancelled` if cancelled), in one statement; notifies when the first is due.
/// Locks those task rows, passing over rows another session holds (they are taken at a
/// later pass). `in_flight` are the tasks this instance is running; `lease` is how long
/// a ghost or a silent instance is given. Returns how many tasks wait again.
pub(crate) fn rescue(
    conn: &mut PgConnection,
    lost: Lost,
    instance: &str,
    lease: Duration,
    in_flight: &[i64],
) -> QueryResult<usize> {
    #[derive(QueryableByName)]
    struct Rescued {
        #[diesel(sql_type = BigInt)]
        waiting: i64,
    }
    let (statement, why) = match lost {
        Lost::PreviousSelf => (RESCUE_PREVIOUS_SELF, "its instance restarted"),
        Lost::OwnGhosts => (RESCUE_OWN_GHOSTS, "its outcome never reached the database"),
        Lost::Dead => (RESCUE_DEAD, "its instance stopped sending heartbeats"),
    };
    let rescued: Rescued = diesel::sql_query(statement)
        .bind::<Text, _>(instance)
        .bind::<BigInt, _>(micros(lease))
        .bind::<Array<BigInt>, _>(in_flight)
        .bind::<Text, _>(why)
        .bind::<Integer, _>(instances::NAME_LOCK)
        .bind::<Integer, _>(NOT_YET_TAKEN)
        .get_result(conn)?;
    Ok(usize::try_from(rescued.waiting).unwrap_or(0))
}

/// What the scheduler learns from [`due`].
#[derive(Debug, QueryableByName)]
pub(crate) struct Due {
    /// Waiting tasks due now, counted up to the limit asked for.
    #[diesel(sql_type = BigInt)]
    pub now: i64,
    /// Seconds until the next scheduled task is due.
    #[diesel(sql_type = Nullable<Double>)]
    pub next_in: Option<f64>,
}

/// Counts the waiting tasks of the given types in the given queues (paused ones
/// aside) due now (up to `limit`) and finds when the next scheduled one is due (a task due at 'infinity' is never due), level by
/// level as [`claim`] does: each level's due tasks are the head of its range of
/// `tasks_claim_idx`, and its next one the first entry after them. Locks and changes
/// nothing. Its plan is pinned as the claim's, for this statement's transaction only
/// (the connection comes from the pool).
pub(crate) fn due(conn: &mut PgConnection, queues: &[&str], task_types: &[&str], limit: i64) -> QueryResult<Due> {
    conn.transaction(|conn| {
        conn.batch_execute(&PLAN_BY_INDEX.replace("SET ", "SET LOCAL "))?;
        diesel::sql_query(concat!(
            "WITH RECURSIVE ",
            waiting_levels!("$1", "$3", "true", "''", "1000000"),
            " SELECT
                 (SELECT count(*) FROM (
                      SELECT 1 FROM levels l CROSS JOIN LATERAL (
                          SELECT 1 FROM tasks t
                          WHERE t.status = 'waiting' AND t.queue = l.queue AND t.task_class = l.task_class
                            AND t.priority = l.priority AND t.fair_key = l.fair_key AND t.run_at <= now()
                          LIMIT $2) c
                      LIMIT $2) d) AS now,
                 (SELECT extract(epoch FROM min(n.run_at) - now())::float8
                  FROM levels l CROSS JOIN LATERAL (
                      SELECT t.run_at FROM tasks t
                      WHERE t.status = 'waiting' AND t.queue = l.queue AND t.task_class = l.task_class
                        AND t.priority = l.priority AND t.fair_key = l.fair_key
                        AND t.run_at > now() AND t.run_at < 'infinity'
                      ORDER BY t.run_at LIMIT 1) n) AS next_in"
        ))
        .bind::<Array<Text>, _>(task_types)
        .bind::<BigInt, _>(limit)
        .bind::<Array<Text>, _>(queues)
        .get_result(conn)
    })
}

/// The advisory lock that lets one instance at a time vacuum ("vacu" in ASCII).
const VACUUM_LOCK: i64 = 0x7661_6375;

/// Runs `VACUUM tasks` unless another instance is at it (a session advisory lock,
/// released after): it removes the dead index entries claims leave behind, and blocks
/// no claim, insert or completion. Returns false when another instance holds the lock.
pub(crate) fn vacuum(conn: &mut PgConnection) -> QueryResult<bool> {
    #[derive(QueryableByName)]
    struct Locked {
        #[diesel(sql_type = Bool)]
        locked: bool,
    }
    let locked: Locked = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS locked")
        .bind::<BigInt, _>(VACUUM_LOCK)
        .get_result(conn)?;
    if !locked.locked {
        return Ok(false);
    }
    let vacuumed = conn.batch_execute("VACUUM tasks");
    diesel::sql_query("SELECT pg_advisory_unlock($1)").bind::<BigInt, _>(VACUUM_LOCK).execute(conn)?;
    vacuumed.map(|_| true)
}

#[cfg(test)]
mod tests {
    /// A claimer of the queue `default`.
    fn lane<'a>(instance: &'a str, task_types: &'a [&'a str]) -> LaneClaim<'a> {
        LaneClaim { instance, queue: "default", task_types, after_key: "", fair: false }
    }

    use super::*;

    #[derive(QueryableByName)]
    struct PlanLine {
        #[diesel(sql_type = Text, column_name = "QUERY PLAN")]
        line: String,
    }

    /// The completion's plan stays linear in its batch with the statistics a queue
    /// has: taken while every task waited and no attempt ran.
    #[test]
    fn the_completion_finds_its_rows_by_key_and_joins_them_by_hash_whatever_the_statistics() {
        let db = test_db::TestDatabase::new();
        let mut conn = db.connect();
        conn.batch_execute(
            "INSERT INTO tasks (task_class, status) SELECT 'noop', 'stopped' FROM generate_series(1, 20000);
             INSERT INTO task_executions (task_id, attempt, started_at, stopped_at, instance, worker)
                 SELECT id, 1, now(), now(), 'old', 0 FROM tasks;
             INSERT INTO tasks (task_class) SELECT 'noop' FROM generate_series(1, 5000);
             ANALYZE tasks; ANALYZE task_executions;",
        )
        .unwrap();
        let claimed = claim(&mut conn, &lane("i", &["noop"]), 300).unwrap().tasks;
        assert_eq!(claimed.len(), 300);

        let mut session = db.connect();
        prepare_completer_session(&mut session).unwrap();
        let n = claimed.len();
        for mode in ["force_custom_plan", "force_generic_plan"] {
            session.batch_execute(&format!("BEGIN; SET LOCAL plan_cache_mode = {mode}")).unwrap();
            let plan: Vec<PlanLine> = diesel::sql_query(format!("EXPLAIN (ANALYZE, COSTS OFF) {COMPLETE}"))
                .bind::<Array<BigInt>, _>(claimed.iter().map(|t| t.execution_id).collect::<Vec<_>>())
                .bind::<Array<BigInt>, _>(claimed.iter().map(|t| t.id).collect::<Vec<_>>())
                .bind::<Array<Integer>, _>(vec![1; n])
                .bind::<Array<Integer>, _>(vec![0; n])
                .bind::<Array<BigInt>, _>(vec![10i64; n])
                .bind::<Array<Text>, _>(vec!["stopped"; n])
                .bind::<Array<Nullable<Jsonb>>, _>(vec![Some(serde_json::Value::Null); n])
                .bind::<Array<Nullable<Text>>, _>(vec![None::<String>; n])
                .bind::<Array<Nullable<BigInt>>, _>(vec![None::<i64>; n])
                .bind::<Array<BigInt>, _>(vec![5i64; n])
                .bind::<Array<Timestamptz>, _>(claimed.iter().map(|t| t.claimed_at).collect::<Vec<_>>())
                .bind::<Bool, _>(false)
                .load(&mut session)
                .unwrap();
            session.batch_execute("ROLLBACK").unwrap();
            let plan = plan.into_iter().map(|p| p.line).collect::<Vec<_>>().join("\n");
            for bad in ["Seq Scan", "Nested Loop", "Rows Removed by Join Filter", "tasks_running_idx"] {
                assert!(!plan.contains(bad), "{mode}: the completion's plan has a {bad}:\n{plan}");
            }
            assert!(plan.contains("tasks_pkey"), "{mode}:\n{plan}");
        }
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
        prepare_claimer_session(&mut conn).unwrap();
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

        let claimed = claim(&mut conn, &lane("i", &["noop", "echo"]), 10).unwrap();
        assert!(!claimed.more, "a claim alone was told that others held tasks");
        let ids: Vec<i64> = claimed.tasks.iter().map(|t| t.id).collect();
        // The five of priority 1 (the last inserted), then the oldest of priority 0.
        let first_of_priority_0 = 200_001;
        let expected: Vec<i64> = (220_001..=220_005).chain(first_of_priority_0..first_of_priority_0 + 5).collect();
        assert_eq!(ids, expected, "not claimed in priority, then due, then id order");
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
        prepare_claimer_session(&mut conn).unwrap();
        let mut after = String::new();
        let mut served = std::collections::BTreeSet::new();
        for _ in 0..4 {
            let claimed =
                claim(&mut conn, &LaneClaim { after_key: &after, fair: true, ..lane("i", &["noop"]) }, 16).unwrap();
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
        let big = claim(&mut conn, &LaneClaim { after_key: &after, fair: true, ..lane("i", &["noop"]) }, 300).unwrap();
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
        let held = claim(&mut first, &lane("first", &["noop"]), 40).unwrap();
        assert_eq!(held.tasks.len(), 40);
        assert!(!held.more);

        // Its 28 candidates are the first 40's first 28: all held.
        let blocked = claim(&mut second, &lane("second", &["noop"]), 5).unwrap();
        assert!(blocked.tasks.is_empty(), "claimed tasks another claim holds");
        assert!(blocked.more, "an empty claim among held tasks took the queue for drained");

        first.batch_execute("COMMIT").unwrap();
        let after = claim(&mut second, &lane("second", &["noop"]), 5).unwrap();
        let ids: Vec<i64> = after.tasks.iter().map(|t| t.id).collect();
        assert_eq!(ids, vec![41, 42, 43, 44, 45]);
        assert!(!after.more);
    }

    /// A task running on `instance`, with its open execution.
    fn running_on(conn: &mut PgConnection, id: i64, instance: &str) {
        for statement in [
            "INSERT INTO tasks (id, task_class, status, instance, attempts) VALUES ($1, 'noop', 'running', $2, 1)",
            "INSERT INTO task_executions (task_id, attempt, started_at, instance, worker) VALUES ($1, 1, now(), $2, 0)",
        ] {
            diesel::sql_query(statement).bind::<BigInt, _>(id).bind::<Text, _>(instance).execute(conn).unwrap();
        }
    }

    #[derive(QueryableByName, Debug, PartialEq)]
    struct Recorded {
        #[diesel(sql_type = BigInt)]
        task_id: i64,
        #[diesel(sql_type = Integer)]
        attempt: i32,
        /// Started at the claim, a minute ago.
        #[diesel(sql_type = Bool)]
        from_claim: bool,
        #[diesel(sql_type = Nullable<Text>)]
        error: Option<String>,
    }

    fn recorded(conn: &mut PgConnection) -> Vec<Recorded> {
        diesel::sql_query(
            "SELECT task_id, attempt, started_at < now() - interval '59 seconds' AS from_claim, error
             FROM task_executions WHERE stopped_at IS NOT NULL ORDER BY task_id, attempt",
        )
        .load(conn)
        .unwrap()
    }

    /// A lost attempt is recorded once, from its claim to its rescue; an attempt an
    /// older version claimed (it opened the execution at the claim) by closing that one.
    #[test]
    fn a_lost_attempt_is_recorded_once_from_its_claim_to_its_rescue() {
        let db = test_db::TestDatabase::new();
        let mut conn = db.connect();
        conn.batch_execute(
            "INSERT INTO tasks (id, task_class, status, instance, attempts, updated_at) VALUES
                 (1, 'noop', 'running', 'gone', 2, now() - interval '1 minute'),
                 (2, 'noop', 'running', 'gone', 1, now() - interval '1 minute');
             INSERT INTO task_executions (task_id, attempt, started_at, stopped_at, instance, worker)
                 VALUES (1, 1, now() - interval '2 minutes', now() - interval '90 seconds', 'gone', 0),
                        (2, 1, now() - interval '1 minute', NULL, 'gone', 0)",
        )
        .unwrap();
        assert_eq!(rescue(&mut conn, Lost::Dead, "judge", Duration::from_secs(1), &[]).unwrap(), 2);
        let lost = |task_id, attempt| Recorded {
            task_id,
            attempt,
            from_claim: true,
            error: Some(format!("lost: its instance stopped sending heartbeats (instance gone, attempt {attempt})")),
        };
        let first = Recorded { task_id: 1, attempt: 1, from_claim: true, error: None };
        assert_eq!(recorded(&mut conn), vec![first, lost(1, 2), lost(2, 1)]);
        let open: Vec<Recorded> = diesel::sql_query(
            "SELECT task_id, attempt, true AS from_claim, error FROM task_executions WHERE stopped_at IS NULL",
        )
        .load(&mut conn)
        .unwrap();
        assert_eq!(open, vec![], "an execution was left open");
    }

    /// The attempt's outcome, arriving after the rescue took its task, writes nothing:
    /// the attempt keeps the one execution the rescue wrote.
    #[test]
    fn an_outcome_after_the_rescue_writes_no_second_execution() {
        let db = test_db::TestDatabase::new();
        let mut conn = db.connect();
        conn.batch_execute("INSERT INTO tasks (task_class) VALUES ('noop')").unwrap();
        let task = claim(&mut conn, &lane("me", &["noop"]), 1).unwrap().tasks.remove(0);
        assert!(recorded(&mut conn).is_empty(), "an execution was written before the attempt ended");
        assert_eq!(rescue(&mut conn, Lost::PreviousSelf, "me", Duration::from_secs(1), &[]).unwrap(), 1);
        let outcome = Completion {
            execution_id: task.execution_id,
            task_id: task.id,
            attempt: task.attempt,
            worker: 0,
            claimed_at: task.claimed_at,
            queued: Duration::ZERO,
            elapsed: Duration::from_millis(5),
            outcome: Outcome::Succeeded(serde_json::Value::Null),
            frees_a_place: false,
        };
        assert_eq!(complete(&mut conn, &[outcome]).unwrap(), 0);
        let errors: Vec<Option<String>> = recorded(&mut conn).into_iter().map(|r| r.error).collect();
        assert_eq!(errors, vec![Some("lost: its instance restarted (instance me, attempt 1)".to_string())]);
    }

    fn status_of(conn: &mut PgConnection, id: i64) -> String {
        crate::db::operator::lock_status(conn, id).unwrap().unwrap()
    }

    #[test]
    fn an_instance_is_judged_dead_by_the_lease_it_recorded_not_by_the_judges() {
        let db = test_db::TestDatabase::new();
        let mut conn = db.connect();
        running_on(&mut conn, 1, "slow");
        running_on(&mut conn, 2, "gone");
        running_on(&mut conn, 3, "legacy");
        conn.batch_execute(
            "INSERT INTO task_engine_instances (name, host, pid, lease, last_seen_at) VALUES
                 ('slow', 'h', 1, interval '10 seconds', now() - interval '3 seconds'),
                 ('gone', 'h', 2, interval '10 seconds', now() - interval '11 seconds'),
                 ('legacy', 'h', 3, NULL, now() - interval '3 seconds')",
        )
        .unwrap();
        // The judge's own lease is a second: by it, all three would be dead; it judges
        // only the row that records no lease (an older engine's) by it.
        assert_eq!(rescue(&mut conn, Lost::Dead, "judge", Duration::from_secs(1), &[]).unwrap(), 2);
        assert_eq!(status_of(&mut conn, 1), "running", "an instance within its own lease was robbed");
        assert_eq!(status_of(&mut conn, 2), "waiting");
        assert_eq!(status_of(&mut conn, 3), "waiting");
    }

    #[test]
    fn an_instance_without_a_row_is_dead_only_once_it_no_longer_holds_its_name() {
        let db = test_db::TestDatabase::new();
        let mut conn = db.connect();
        running_on(&mut conn, 1, "rowless");
        let mut holder = db.connect();
        assert!(crate::db::instances::take_name(&mut holder, "rowless").unwrap());
        let lease = Duration::from_secs(1);
        assert_eq!(rescue(&mut conn, Lost::Dead, "judge", lease, &[]).unwrap(), 0, "a live instance was robbed");
        assert_eq!(status_of(&mut conn, 1), "running");
        drop(holder); // its session ends, and the name lock with it (soon: the server notices)
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while rescue(&mut conn, Lost::Dead, "judge", lease, &[]).unwrap() == 0 {
            assert!(std::time::Instant::now() < deadline, "the task of an instance gone without a row stayed running");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(status_of(&mut conn, 1), "waiting");
    }

    #[test]
    fn a_rescued_attempt_waits_like_a_failed_one_before_the_task_runs_again() {
        let db = test_db::TestDatabase::new();
        let mut conn = db.connect();
        running_on(&mut conn, 1, "crashed");
        running_on(&mut conn, 2, "crashed");
        conn.batch_execute("UPDATE tasks SET attempts = 3 WHERE id = 2").unwrap();
        assert_eq!(rescue(&mut conn, Lost::PreviousSelf, "crashed", Duration::from_secs(1), &[]).unwrap(), 2);
        #[derive(QueryableByName)]
        struct Wait {
            #[diesel(sql_type = BigInt)]
            id: i64,
            #[diesel(sql_type = Double)]
            seconds: f64,
        }
        let waits: Vec<Wait> = diesel::sql_query(
            // From the rescue's own time (its `updated_at`): a later `now()` would have the
            // time between the two statements taken off (3.59 s once, for 3.6 at least).
            "SELECT id, extract(epoch FROM run_at - updated_at)::float8 AS seconds FROM tasks ORDER BY id",
        )
        .load(&mut conn)
        .unwrap();
        let seconds: Vec<(i64, f64)> = waits.iter().map(|w| (w.id, w.seconds)).collect();
        // attempt 1: 4 s, attempt 3: 84 s, give or take 10%.
        assert!((3.6..=4.4).contains(&seconds[0].1) && (75.6..=92.4).contains(&seconds[1].1), "{seconds:?}");
    }

    #[test]
    fn a_rescue_keeps_the_record_of_an_attempt_timed_out_and_writes_one_for_an_attempt_lost() {
        let db = test_db::TestDatabase::new();
        let mut conn = db.connect();
        conn.batch_execute(
            "INSERT INTO tasks (id, task_class, status, instance, attempts)
             VALUES (1, 'noop', 'running', 'crashed', 1), (2, 'noop', 'running', 'crashed', 1)",
        )
        .unwrap();
        let timed_out = Completion {
            execution_id: 100,
            task_id: 1,
            attempt: 1,
            worker: 0,
            claimed_at: Utc::now(),
            queued: Duration::ZERO,
            elapsed: Duration::from_secs(2),
            outcome: Outcome::Failed("timed out".into()),
            frees_a_place: false,
        };
        assert!(record_timed_out(&mut conn, "crashed", &timed_out).unwrap());
        assert!(!record_timed_out(&mut conn, "crashed", &timed_out).unwrap(), "recorded twice");
        // The instance died while the abandoned thread still ran task 1.
        assert_eq!(rescue(&mut conn, Lost::PreviousSelf, "crashed", Duration::from_secs(1), &[]).unwrap(), 2);
        #[derive(QueryableByName, Debug, PartialEq)]
        struct Execution {
            #[diesel(sql_type = BigInt)]
            task_id: i64,
            #[diesel(sql_type = Text)]
            error: String,
        }
        let executions: Vec<Execution> =
            diesel::sql_query("SELECT task_id, left(error, 9) AS error FROM task_executions ORDER BY task_id, id")
                .load(&mut conn)
                .unwrap();
        let expected =
            [(1, "timed out"), (2, "lost: its")].map(|(task_id, error)| Execution { task_id, error: error.into() });
        assert_eq!(executions, expected);
    }
}
