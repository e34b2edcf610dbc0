//! Statements kept prepared on their connection.

use diesel::pg::Pg;
use diesel::pg::PgConnection;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::Untyped;
use diesel::{QueryResult, RunQueryDsl};
use std::sync::atomic::{AtomicU8, Ordering};

/// A raw SQL statement whose text never changes, kept prepared on its connection.
///
/// Diesel never caches `sql_query` statements (their text could be built at run time),
/// so each would be parsed and planned anew, which for the claim cost as much as
/// running it. The statements wrapped here are constants with fixed bind types, so
/// they are safe to cache: the connection prepares each once, and PostgreSQL's plan
/// cache does the rest.
#[derive(Debug, Clone)]
#[must_use = "queries are only executed when loaded or executed"]
pub(crate) struct Prepared<Q>(pub Q);

impl<Q: QueryFragment<Pg>> QueryFragment<Pg> for Prepared<Q> {
    fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.0.walk_ast(out)
    }

    /// The cache key is the statement's text and bind types, which identify it.
    fn is_safe_to_cache_prepared(&self, _backend: &Pg) -> QueryResult<bool> {
        Ok(true)
    }
}

impl<Q> QueryId for Prepared<Q> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q> Query for Prepared<Q> {
    type SqlType = Untyped;
}

impl<Q> RunQueryDsl<PgConnection> for Prepared<Q> {}

/// A statement kept planned on the server, for connections through a transaction
/// pooler, where no statement can stay prepared: the statement is the body of a
/// PL/pgSQL function of the engine's schema, which each server session that calls it
/// plans once, generically, with the statement's settings (`SET` clauses of the
/// function, in force for the call alone), and keeps. A call is one unnamed statement,
/// planned in no time. The function is named for a hash of its whole definition, so
/// that each version of the engine has its own, and is created when a call finds it
/// missing ([`ServerSide::create`]); an older version's functions may be dropped at
/// will (`task_engine_planned_*`): an instance makes its own again.
#[derive(Debug)]
pub(crate) struct ServerSide {
    /// The statement, with its parameters `$1`, `$2`, ...
    pub statement: &'static str,
    /// Their SQL types, in order.
    pub parameters: &'static [&'static str],
    /// The statement's output columns, with their SQL types (`id bigint, ...`).
    pub columns: &'static str,
    /// The settings it is planned and run with.
    pub settings: &'static [&'static str],
    /// Whether this process made sure the function exists: [`UNKNOWN`], [`CREATED`], or
    /// [`REFUSED`] (the role may not create functions: the statement goes as it is).
    pub state: AtomicU8,
}

const UNKNOWN: u8 = 0;
const CREATED: u8 = 1;
const REFUSED: u8 = 2;

impl ServerSide {
    pub(crate) const fn new(
        statement: &'static str,
        parameters: &'static [&'static str],
        columns: &'static str,
        settings: &'static [&'static str],
    ) -> Self {
        Self { statement, parameters, columns, settings, state: AtomicU8::new(UNKNOWN) }
    }

    /// The function's name: a hash of its definition.
    pub(crate) fn name(&self) -> String {
        // FNV-1a: stable across builds and platforms, unlike std's hasher.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let parts = [self.statement, &self.parameters.join(","), self.columns, &self.settings.join(";")];
        for byte in parts.iter().flat_map(|part| part.bytes().chain([0])) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        format!("task_engine_planned_{hash:016x}")
    }

    /// The call, one unnamed statement with the same parameters.
    pub(crate) fn call(&self) -> String {
        let arguments: Vec<String> = (1..=self.parameters.len()).map(|i| format!("${i}")).collect();
        format!("SELECT * FROM {}({})", self.name(), arguments.join(", "))
    }

    /// Whether the statement goes through a pooler as a call of its function (else as it
    /// is, in a transaction with its settings: the function could not be made); on
    /// `conn`, outside any transaction, makes the function first if this process has
    /// not yet.
    pub(crate) fn planned(&self, conn: &mut PgConnection) -> bool {
        if self.state.load(Ordering::Relaxed) == UNKNOWN {
            match self.create(conn) {
                Ok(()) => self.state.store(CREATED, Ordering::Relaxed),
                Err(error) => {
                    log::warn!(
                        "could not create {} ({error}): through the pooler this statement is planned for each call",
                        self.name()
                    );
                    self.state.store(REFUSED, Ordering::Relaxed);
                }
            }
        }
        self.state.load(Ordering::Relaxed) == CREATED
    }

    /// A call found the function missing (dropped since): make it again next time.
    pub(crate) fn missing(&self) {
        self.state.store(UNKNOWN, Ordering::Relaxed);
    }

    /// Creates the function (again, if another session did meanwhile: it is the same),
    /// in a transaction of its own, under a transaction-scoped advisory lock on its
    /// name (two sessions replacing one function at once would fail). Changes only the
    /// schema's functions.
    pub(crate) fn create(&self, conn: &mut PgConnection) -> QueryResult<()> {
        use diesel::connection::SimpleConnection;
        let name = self.name();
        let settings: String = self
            .settings
            .iter()
            .filter(|setting| !setting.starts_with("plan_cache_mode"))
            .map(|setting| {
                let (key, value) = setting.split_once('=').expect("a setting is key = value");
                format!(" SET {} = '{}'", key.trim(), value.trim().replace('\'', "''"))
            })
            .collect();
        conn.batch_execute(&format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock(hashtext('{name}'));
             CREATE OR REPLACE FUNCTION {name}({parameters})
             RETURNS TABLE ({columns}) LANGUAGE plpgsql VOLATILE SET plan_cache_mode = 'force_generic_plan'{settings}
             AS $planned$
             #variable_conflict use_column
             BEGIN
             RETURN QUERY {statement};
             END
             $planned$;
             COMMIT;",
            parameters = self.parameters.join(", "),
            columns = self.columns,
            statement = self.statement,
        ))
        .inspect_err(|_| {
            let _ = conn.batch_execute("ROLLBACK");
        })
    }
}

/// Whether `error` says that a function called does not exist (`undefined_function`).
pub(crate) fn is_missing_function(error: &diesel::result::Error) -> bool {
    matches!(error, diesel::result::Error::DatabaseError(_, info) if info.message().contains("does not exist")
        && info.message().contains("task_engine_planned_"))
}
