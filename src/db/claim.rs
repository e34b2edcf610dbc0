//! The claim: a walk of `tasks_claim_idx` level by level (queue, type, priority, key),
//! the three claim statements (one key, keys in turn, a limit per key), the claim of a
//! queue with limits under its row lock, and the look for due tasks that shares the
//! walk. A claim is one statement: it locks the tasks it takes, marks them `running`
//! and takes their execution ids.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Double, Integer, Nullable, Text, Timestamptz};

use crate::attempt::ClaimedTask;
use crate::db::connect::{Session, BOUNDED_LOCK_WAITS};
use crate::db::prepared::{is_missing_function, Prepared, ServerSide};
use crate::db::transitions::mark_running;

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
        concat!(
            "     ), picked AS (
         SELECT t.ctid FROM tasks t
         WHERE t.ctid = ANY(ARRAY(SELECT ctid FROM candidates ORDER BY ord LIMIT (SELECT n FROM room)))
           AND t.status IS NOT DISTINCT FROM 'waiting' AND t.run_at <= now()
         FOR UPDATE SKIP LOCKED
     ), claimed AS (
         UPDATE tasks t
         SET ",
            mark_running!("$3"),
            "
         WHERE t.ctid = ANY(ARRAY(SELECT ctid FROM picked))
         RETURNING t.id, t.task_class, t.task_parameters, t.attempts, t.max_attempts, t.fair_key, t.timeout_ms
     ), numbered AS (
         SELECT c.*, nextval('task_executions_id_seq') AS execution_id
         FROM (SELECT claimed.*, k.ord FROM claimed JOIN candidates k ON k.id = claimed.id ORDER BY k.ord) c
"
        )
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
pub(crate) const CLAIM: &str = concat!(
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
         SET ",
    mark_running!("$3"),
    "
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
pub(crate) const CLAIM_FAIR: &str = concat!(
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
/// keeps at most `$6 - running` of each key but `''` (`$6`, the queue's limit per key, null for
/// none) and the first `$4` in claim order: higher priority first, then keys in turn
/// (a key's first task comes after as many turns as it has tasks running: the key
/// with the fewest running goes first), then the one due first.
/// `picked` and `claimed` lock and update the first `$2` of them as in [`CLAIM`].
pub(crate) const CLAIM_CAPPED: &str = concat!(
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
                -- Tasks without a key (`''`) share no key to limit: the limit per key
                -- leaves them be.
                ($6::int IS NULL OR h.fair_key = '' OR h.turn <= $6::int - coalesce(b.running, 0)) AS fits
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
/// attempts' executions are written when they end, in one insert ([`complete`](crate::db::completion::complete)): an
/// execution opened here and closed there cost a second write of the row, most often
/// on another page, with two more index entries, per task. Claims nothing from a
/// paused queue or one with a limit, and says so.
///
/// Its cost follows the tasks it claims and the (type, priority, key) levels in use, not
/// the number of waiting tasks: it reads at most `2.5 * limit + 16` candidates (room for
/// the rows concurrent claims hold) through `tasks_claim_idx`, or a share of that per
/// level when levels are many. It runs with [`SETTINGS`] (on the `session`, or for its
/// transaction), so that the plan is the same whatever the table's statistics: a burst
/// into a table analyzed while empty would otherwise be claimed by a bitmap scan and a
/// sort of every waiting task.
pub(crate) fn claim(conn: &mut PgConnection, session: Session, lane: &LaneClaim<'_>, limit: i64) -> QueryResult<Claim> {
    match Way::of(conn, session) {
        Way::Plain(session) => session.with(conn, SETTINGS, |conn| {
            run_claim(conn, Way::Plain(session), lane, limit, QueueLimits::default(), false)
        }),
        Way::Planned => run_claim(conn, Way::Planned, lane, limit, QueueLimits::default(), false),
    }
}

/// How a claim goes: as it is (with its settings on the session, or set for its
/// transaction), or as a call of its statement's function ([`ServerSide`]), through a
/// pooler.
#[derive(Clone, Copy)]
enum Way {
    Plain(Session),
    Planned,
}

impl Way {
    /// Through a pooler, the functions of the three claims, if they can be made; found
    /// outside any transaction.
    fn of(conn: &mut PgConnection, session: Session) -> Self {
        match session {
            Session::Pooled if PLANNED.iter().all(|p| p.planned(conn)) => Self::Planned,
            _ => Self::Plain(session),
        }
    }
}

/// The parameters of the claims ([`CLAIM`], [`CLAIM_FAIR`], [`CLAIM_CAPPED`]), and
/// their columns, as their functions declare them.
const CLAIM_PARAMETERS: &[&str] =
    &["text[]", "bigint", "text", "bigint", "text[]", "integer", "boolean", "text", "integer"];
const CLAIM_COLUMNS: &str = "id bigint, task_class text, task_parameters text, attempt integer, max_attempts integer, \
     fair_key text, timeout_ms integer, execution_id bigint, claimed_at timestamptz, candidates bigint, \
     limited boolean, room bigint, unread boolean, keys bigint";

/// The claims kept planned on the server, for connections through a pooler.
static PLANNED: [ServerSide; 3] = [
    ServerSide::new(CLAIM, CLAIM_PARAMETERS, CLAIM_COLUMNS, SETTINGS),
    ServerSide::new(CLAIM_FAIR, CLAIM_PARAMETERS, CLAIM_COLUMNS, SETTINGS),
    ServerSide::new(CLAIM_CAPPED, CLAIM_PARAMETERS, CLAIM_COLUMNS, SETTINGS),
];

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
pub(crate) fn claim_limited(
    conn: &mut PgConnection,
    session: Session,
    lane: &LaneClaim<'_>,
    limit: i64,
) -> QueryResult<Claim> {
    let queue = lane.queue;
    let way = Way::of(conn, session);
    let transaction = |conn: &mut PgConnection, f: &mut dyn FnMut(&mut PgConnection) -> QueryResult<Claim>| match way {
        Way::Plain(Session::Pooled) => Session::Pooled.with(conn, SETTINGS, f),
        _ => conn.transaction(f),
    };
    transaction(conn, &mut |conn| {
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
            return run_claim(conn, way, lane, limit, QueueLimits::default(), true);
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
        let mut claim = run_claim(conn, way, lane, room, applied, true)?;
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
    way: Way,
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
    let which = match (key_cap, lane.fair) {
        (Some(_), _) => 2,
        (None, true) => 1,
        (None, false) => 0,
    };
    let statement = match way {
        Way::Plain(_) => PLANNED[which].statement.to_owned(),
        Way::Planned => PLANNED[which].call(),
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
    .load(conn)
    .inspect_err(|error| {
        if is_missing_function(error) {
            PLANNED.iter().for_each(ServerSide::missing);
        }
    })?;
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

/// The settings of the claims' statements ([`claim`], [`claim_limited`], [`due`]): with
/// sequential and bitmap scans off, they walk `tasks_claim_idx` level by level whatever
/// the statistics say (taken while the table was empty, they make a scan look
/// cheaper). On a session of the engine's own their generic plan is kept: planning the
/// claim anew, as a custom plan would, takes longer (about 1 ms) than running it;
/// through a pooler each is planned anew, by index all the same. JIT is off: once
/// statistics show a big table, the plan's estimated cost (which the disabled scans
/// inflate) passes `jit_above_cost`, and compiling it took 400 ms, every claim. Lock
/// waits are bounded ([`BOUNDED_LOCK_WAITS`]).
pub(crate) const SETTINGS: &[&str] = &[
    "enable_seqscan = off",
    "enable_bitmapscan = off",
    "plan_cache_mode = force_generic_plan",
    "jit = off",
    BOUNDED_LOCK_WAITS,
];

/// What the timer learns from [`due`].
#[derive(Debug, QueryableByName)]
pub(crate) struct Due {
    /// Waiting tasks due now, counted up to the limit asked for.
    #[diesel(sql_type = BigInt)]
    pub now: i64,
    /// Seconds until the next due time of a task not due yet.
    #[diesel(sql_type = Nullable<Double>)]
    pub next_in: Option<f64>,
}

/// Counts the waiting tasks of the given types in the given queues (paused ones
/// aside) due now (up to `limit`) and finds the next due time of those not due yet (a task due at 'infinity' is never due), level by
/// level as [`claim`] does: each level's due tasks are the head of its range of
/// `tasks_claim_idx`, and its next one the first entry after them. Locks and changes
/// nothing. Its plan is pinned as the claim's ([`SETTINGS`]).
pub(crate) fn due(
    conn: &mut PgConnection,
    session: Session,
    queues: &[&str],
    task_types: &[&str],
    limit: i64,
) -> QueryResult<Due> {
    session.with(conn, SETTINGS, |conn| {
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

#[cfg(test)]
#[path = "claim_tests.rs"]
pub(crate) mod tests;
