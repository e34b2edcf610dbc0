//! Statements kept prepared on their connection.

use diesel::pg::Pg;
use diesel::pg::PgConnection;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::Untyped;
use diesel::{QueryResult, RunQueryDsl};

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
