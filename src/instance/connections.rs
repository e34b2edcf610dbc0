//! Where every part of an instance gets its connections, so that what an instance opens
//! is decided, and counted, in this one place. Whatever its workers and queues, an
//! instance holds (docs/operations.md, "Connections"):
//!
//! - the session, on the listen URL (`DATABASE_URL` unless told otherwise; none
//!   without a listener): the listener's raw `postgres` connection, which LISTENs and
//!   holds what lives in a session: the instance's name lock and the wake-up stripes;
//! - the heartbeat's, always open, which no slow work shares;
//! - the claims', always open, shared by the producers of every queue, the timer and
//!   cron (each statement short; lock waits bounded);
//! - the completer's, opened when attempts end, closed once they have stopped ending;
//! - a maintenance connection, opened when a vacuum is due (or an abandoned attempt
//!   is recorded) and closed after;
//! - beside those, the tasks' own pool (`ctx.connection()`), opened as tasks ask.
//!
//! So at most 3 while idle and 5 under load, beside the tasks'. With a listen URL of
//! its own, `DATABASE_URL` may be a transaction pooler: the connections on it keep no
//! session state ([`Session::Pooled`]).

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::PgConnection;

use crate::db::claim;
use crate::db::connect::{connect, lazy_pool, ping, redact_url, with_parameters, PgPool, Session, KEEPALIVES};
use crate::error::Error;
use crate::instance::lock;

/// Where the instance's session connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Listen {
    /// To `DATABASE_URL`, which is then taken to be PostgreSQL itself.
    Database,
    /// To this URL (PostgreSQL itself): `DATABASE_URL` may be a transaction pooler.
    Url(String),
    /// Nowhere: no notifications (the instance polls), no name lock, no stripes.
    None,
}

/// What an instance opens, as the runner decided it.
pub(crate) struct Plan<'a> {
    pub instance: &'a str,
    pub database_url: &'a str,
    pub listen: Listen,
    /// The tasks' pool, if the program gave one.
    pub tasks: Option<PgPool>,
    /// The size of the tasks' pool the instance opens otherwise.
    pub task_connections: usize,
}

/// An instance's way to its database.
#[derive(Clone)]
pub(crate) struct Connections {
    instance: Arc<str>,
    database_url: Arc<str>,
    listen_url: Option<Arc<str>>,
    session: Session,
    tasks: PgPool,
    claims: Arc<Mutex<Option<Counted>>>,
    open: Arc<Open>,
}

/// The connections open now, by role (the tasks' are their pool's).
#[derive(Debug, Default)]
struct Open {
    session: AtomicUsize,
    heartbeat: AtomicUsize,
    claims: AtomicUsize,
    completer: AtomicUsize,
    maintenance: AtomicUsize,
}

/// How many connections an instance has open, by role: what `engine status` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub(crate) struct OpenCount {
    /// Whether the instance has a listener (a session that holds its name).
    pub listener: bool,
    pub session: usize,
    pub heartbeat: usize,
    pub claims: usize,
    pub completer: usize,
    pub maintenance: usize,
    pub tasks: usize,
    pub tasks_max: usize,
}

/// A connection of one of the instance's parts, counted while it is open.
pub(crate) struct Counted {
    conn: PgConnection,
    count: Arc<Open>,
    role: fn(&Open) -> &AtomicUsize,
}

impl Deref for Counted {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl DerefMut for Counted {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        (self.role)(&self.count).fetch_sub(1, Ordering::SeqCst);
    }
}

impl Connections {
    /// Opens the tasks' pool (lazily: no connection yet) unless given one; fails on a
    /// listen URL the listener could not use, before any part starts.
    pub(crate) fn open(plan: Plan<'_>) -> Result<Self, Error> {
        let (listen_url, session) = match plan.listen {
            Listen::Database => (Some(plan.database_url.into()), Session::Own),
            Listen::Url(url) if url == plan.database_url => (Some(url.into()), Session::Own),
            Listen::Url(url) => (Some(url.into()), Session::Pooled),
            // Nothing says `DATABASE_URL` is PostgreSQL itself: keep no state there.
            Listen::None => (None, Session::Pooled),
        };
        let tasks = match plan.tasks {
            Some(pool) => pool,
            None => lazy_pool(plan.database_url, u32::try_from(plan.task_connections).unwrap_or(u32::MAX), session),
        };
        let connections = Self {
            instance: plan.instance.into(),
            database_url: plan.database_url.into(),
            listen_url,
            session,
            tasks,
            claims: Arc::default(),
            open: Arc::default(),
        };
        connections.listener()?;
        Ok(connections)
    }

    /// Where the settings of the parts' statements live.
    pub(crate) fn session(&self) -> Session {
        self.session
    }

    /// The tasks' own pool.
    pub(crate) fn tasks(&self) -> &PgPool {
        &self.tasks
    }

    /// A new connection for the heartbeat, on which a vanished server or network is
    /// noticed within about half a minute (TCP keepalives).
    pub(crate) fn heartbeat(&self) -> Result<Counted, Error> {
        self.connect("heartbeat", &KEEPALIVES, |open| &open.heartbeat, &[])
    }

    /// A new connection for the completer, with `settings` on its session if it is
    /// its own.
    pub(crate) fn completer(&self, settings: &[&str]) -> Result<Counted, Error> {
        self.connect("completer", &[], |open| &open.completer, settings)
    }

    /// A new connection for maintenance (a vacuum, the record of an abandoned attempt),
    /// to close once done.
    pub(crate) fn maintenance(&self) -> Result<Counted, Error> {
        self.connect("maintenance", &[], |open| &open.maintenance, &[])
    }

    /// Runs `f` on the claims' connection (connecting it, with the claims' settings on
    /// its session if it is its own), which the producers, the timer and cron share,
    /// one at a time. A connection that no longer answers after a failure is closed.
    pub(crate) fn claims<T>(&self, f: impl FnOnce(&mut PgConnection) -> Result<T, Error>) -> Result<T, Error> {
        let mut claims = lock(&self.claims);
        if claims.is_none() {
            *claims = Some(self.connect("claims", &[], |open| &open.claims, claim::SETTINGS)?);
        }
        let conn = claims.as_mut().expect("just connected");
        let result = f(conn);
        if result.is_err() && ping(conn).is_err() {
            *claims = None;
        }
        result
    }

    fn connect(
        &self,
        role: &str,
        parameters: &[(&str, &str)],
        count: fn(&Open) -> &AtomicUsize,
        settings: &[&str],
    ) -> Result<Counted, Error> {
        let name = format!("task_engine {role} {}", self.instance);
        // A server that does not answer fails the part's step within seconds.
        let mut all = vec![("application_name", name.as_str()), ("connect_timeout", "5")];
        all.extend_from_slice(parameters);
        let mut conn = connect(&with_parameters(&self.database_url, &all))?;
        self.session.prepare(&mut conn, settings)?;
        count(&self.open).fetch_add(1, Ordering::SeqCst);
        Ok(Counted { conn, count: Arc::clone(&self.open), role: count })
    }

    /// The settings of the session's connection (named in `pg_stat_activity`, with TCP
    /// keepalives), or `None` without a listener; fails if the URL cannot be read.
    pub(crate) fn listener(&self) -> Result<Option<postgres::Config>, Error> {
        let Some(url) = &self.listen_url else { return Ok(None) };
        let mut config: postgres::Config =
            url.parse().map_err(|e| Error::Config(format!("bad listen URL {}: {e}", redact_url(url))))?;
        config
            .application_name(&format!("task_engine session {}", self.instance))
            .connect_timeout(Duration::from_secs(5))
            // A server or network that vanishes without closing the socket is noticed
            // within about half a minute.
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3);
        Ok(Some(config))
    }

    /// Whether the instance has a session (a listener).
    pub(crate) fn listens(&self) -> bool {
        self.listen_url.is_some()
    }

    /// The session is open (`true`) or closed.
    pub(crate) fn session_open(&self, open: bool) {
        self.open.session.store(usize::from(open), Ordering::SeqCst);
    }

    /// The listen URL's server, as messages may name it: without a password.
    pub(crate) fn listen_server(&self) -> String {
        self.listen_url.as_deref().map_or_else(|| "none".to_owned(), redact_url)
    }

    /// The connections open now.
    pub(crate) fn open_now(&self) -> OpenCount {
        let open = &self.open;
        let state = self.tasks.state();
        OpenCount {
            listener: self.listen_url.is_some(),
            session: open.session.load(Ordering::SeqCst),
            heartbeat: open.heartbeat.load(Ordering::SeqCst),
            claims: open.claims.load(Ordering::SeqCst),
            completer: open.completer.load(Ordering::SeqCst),
            maintenance: open.maintenance.load(Ordering::SeqCst),
            tasks: state.connections as usize,
            tasks_max: self.tasks.max_size() as usize,
        }
    }

    /// The most connections the instance opens, as `engine run` logs it.
    pub(crate) fn budget(&self) -> String {
        let tasks = self.tasks.max_size();
        let (session, pooled) = match (&self.listen_url, self.session) {
            (None, _) => ("no session (no listener: the instance polls)".to_owned(), ""),
            (Some(_), Session::Own) => ("1 session (LISTEN, name, stripes)".to_owned(), ""),
            (Some(url), Session::Pooled) => {
                (format!("1 session on {} (LISTEN, name, stripes)", redact_url(url)), ", none keeping session state")
            }
        };
        format!(
            "{session}; on DATABASE_URL at most 4{pooled}: heartbeat 1, claims 1, completer 1 (while attempts end), \
             maintenance 1 (while a vacuum runs); tasks' own up to {tasks}, as they ask"
        )
    }
}
