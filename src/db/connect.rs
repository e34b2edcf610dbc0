//! Connections: the pool that workers and tasks share, the connections an instance
//! keeps for itself (outside the pool, where session state and locks stay theirs),
//! and connection strings as they may be printed.

use std::ops::Range;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::{Connection, PgConnection, QueryResult};

use crate::error::Error;

/// The engine's pool of diesel connections.
pub type PgPool = Pool<ConnectionManager<PgConnection>>;

/// A connection taken from a [`PgPool`].
pub type PooledConnection = diesel::r2d2::PooledConnection<ConnectionManager<PgConnection>>;

/// Opens a pool of at most `max_size` connections to `database_url`, and fails at once
/// if the database cannot be reached.
pub fn connection_pool(database_url: &str, max_size: u32) -> Result<PgPool, Error> {
    Ok(Pool::builder()
        .max_size(max_size)
        .min_idle(Some(1))
        // A connection that died with the server (restart, failover) must be dropped,
        // not handed out: the test at checkout costs a round trip, and checkouts are
        // rare (the producer and the completer keep connections of their own).
        .test_on_check_out(true)
        .connection_timeout(Duration::from_secs(5))
        .build(ConnectionManager::new(database_url))?)
}

/// Opens no connection yet: a pool of at most `max_size` connections to
/// `database_url`, each opened when first asked for and closed after a minute unused
/// (the tasks' own, of an instance: tasks that never ask cost none).
pub(crate) fn lazy_pool(database_url: &str, max_size: u32, session: Session) -> PgPool {
    #[derive(Debug)]
    struct Ready(Session);
    impl diesel::r2d2::CustomizeConnection<PgConnection, diesel::r2d2::Error> for Ready {
        fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
            self.0.prepare(conn, &[]).map_err(diesel::r2d2::Error::QueryError)
        }
    }
    Pool::builder()
        .max_size(max_size.max(1))
        .min_idle(Some(0))
        .idle_timeout(Some(Duration::from_secs(60)))
        .test_on_check_out(true)
        .connection_timeout(Duration::from_secs(5))
        .connection_customizer(Box::new(Ready(session)))
        .build_unchecked(ConnectionManager::new(database_url))
}

/// Opens a connection to `database_url`; the error names the server without its
/// password.
pub fn connect(database_url: &str) -> Result<PgConnection, Error> {
    PgConnection::establish(database_url).map_err(|source| {
        // libpq quotes the part of a connection string it could not read.
        let source = match source {
            diesel::ConnectionError::BadConnection(message) => {
                diesel::ConnectionError::BadConnection(redact_message(message.trim_end(), database_url))
            }
            diesel::ConnectionError::InvalidConnectionUrl(message) => {
                diesel::ConnectionError::InvalidConnectionUrl(redact_message(message.trim_end(), database_url))
            }
            other => other,
        };
        Error::Connection { server: redact_url(database_url), source }
    })
}

/// TCP keepalives: a peer that vanished without closing the socket is noticed within
/// about half a minute.
pub(crate) const KEEPALIVES: [(&str, &str); 4] =
    [("keepalives", "1"), ("keepalives_idle", "10"), ("keepalives_interval", "5"), ("keepalives_count", "3")];

/// `database_url` with these connection parameters added (escaped), as a URL or as
/// `key=value` pairs.
pub(crate) fn with_parameters(database_url: &str, parameters: &[(&str, &str)]) -> String {
    if database_url.contains("://") {
        let mut url = database_url.to_owned();
        for (i, (key, value)) in parameters.iter().enumerate() {
            let separator = if i == 0 && !database_url.contains('?') { '?' } else { '&' };
            let value: String = value
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => char::from(b).to_string(),
                    _ => format!("%{b:02X}"),
                })
                .collect();
            url.push_str(&format!("{separator}{key}={value}"));
        }
        url
    } else {
        parameters.iter().fold(database_url.to_owned(), |url, (key, value)| {
            format!("{url} {key}='{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
        })
    }
}

/// Where the settings a part's statements rely on live (plans by index, bounded lock
/// waits): on the session, or in each transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Session {
    /// A connection straight to PostgreSQL, the part's own for as long as it lives: the
    /// settings are set once on it, and statements stay prepared (named) with their
    /// plans.
    Own,
    /// A connection that may go through a transaction pooler (PgBouncer in transaction
    /// mode), where a session is anyone's: nothing is left on it. A statement that
    /// needs settings runs in a transaction that sets them (`SET LOCAL`), and every
    /// statement is sent unnamed.
    Pooled,
}

impl Session {
    /// Readies a new connection: sets `settings` on an own session; on a pooled one,
    /// turns diesel's named statements off.
    pub(crate) fn prepare(self, conn: &mut PgConnection, settings: &[&str]) -> QueryResult<()> {
        match self {
            Self::Own if settings.is_empty() => Ok(()),
            Self::Own => conn.batch_execute(&sets("SET", settings)),
            Self::Pooled => {
                conn.set_prepared_statement_cache_size(diesel::connection::CacheSize::Disabled);
                Ok(())
            }
        }
    }

    /// Runs `f` with `settings` in force: as the session has them, or in a transaction
    /// that sets them (begun with them, in one round trip) and commits if `f`
    /// succeeds.
    pub(crate) fn with<T, E: From<diesel::result::Error>>(
        self,
        conn: &mut PgConnection,
        settings: &[&str],
        f: impl FnOnce(&mut PgConnection) -> Result<T, E>,
    ) -> Result<T, E> {
        use diesel::connection::{AnsiTransactionManager, TransactionManager};
        if self == Self::Own || settings.is_empty() {
            return f(conn);
        }
        AnsiTransactionManager::begin_transaction_sql(conn, &format!("BEGIN; {}", sets("SET LOCAL", settings)))?;
        match f(conn) {
            Ok(value) => {
                AnsiTransactionManager::commit_transaction(conn)?;
                Ok(value)
            }
            Err(error) => {
                // A connection that cannot roll back is dropped by its owner.
                let _ = AnsiTransactionManager::rollback_transaction(conn);
                Err(error)
            }
        }
    }
}

/// `settings` as `SET` (or `SET LOCAL`) statements.
fn sets(set: &str, settings: &[&str]) -> String {
    settings.iter().map(|s| format!("{set} {s}")).collect::<Vec<_>>().join("; ")
}

/// Checks that a connection of the engine's own still answers.
pub(crate) fn ping(conn: &mut PgConnection) -> diesel::QueryResult<()> {
    use diesel::RunQueryDsl;
    diesel::sql_query("SELECT 1").execute(conn).map(drop)
}

/// A connection string fit to print: each password in it replaced by `***`.
/// Handles URLs (`postgres://user:secret@host/db?password=secret`), key=value strings
/// (`host=h password=secret`), and strings that are neither, such as a mistyped URL
/// (`postgres//user:secret@host/db`: its `user:secret@` is hidden the same way).
pub fn redact_url(url: &str) -> String {
    let url = url.trim();
    let mut out = String::with_capacity(url.len());
    let mut at = 0;
    for span in secrets(url) {
        out.push_str(&url[at..span.start]);
        out.push_str("***");
        at = span.end;
    }
    out.push_str(&url[at..]);
    out
}

/// `message` (the driver's, which may quote the connection string it could not
/// read) with every password of `url` in it replaced by `***`.
fn redact_message(message: &str, url: &str) -> String {
    let url = url.trim();
    secrets(url)
        .into_iter()
        .map(|span| &url[span])
        .filter(|secret| !secret.is_empty())
        .fold(message.to_owned(), |message, secret| message.replace(secret, "***"))
}

/// Where the passwords are in a trimmed connection string: sorted, not overlapping.
fn secrets(url: &str) -> Vec<Range<usize>> {
    if let Some(scheme_end) = url.find("://") {
        return url_secrets(url, scheme_end + 3);
    }
    // Neither form for sure: a key=value string, or a URL mistyped. Both readings are
    // hidden; at worst a little more than the password is.
    let mut spans = key_value_secrets(url);
    spans.extend(mistyped_url_secret(url));
    spans.sort_by_key(|span| span.start);
    let mut merged: Vec<Range<usize>> = Vec::new();
    for span in spans {
        match merged.last_mut() {
            Some(last) if span.start <= last.end => last.end = last.end.max(span.end),
            _ => merged.push(span),
        }
    }
    merged
}

/// The password of a URL's user (`user:secret@`), and the values of its `password`
/// query parameters; `start` is where the authority starts.
fn url_secrets(url: &str, start: usize) -> Vec<Range<usize>> {
    let mut spans = Vec::new();
    let authority_end = start + url[start..].find(['/', '?']).unwrap_or(url.len() - start);
    if let Some(at) = url[start..authority_end].rfind('@') {
        if let Some(colon) = url[start..start + at].find(':') {
            spans.push(start + colon + 1..start + at);
        }
    }
    if let Some(q) = url[authority_end..].find('?') {
        let mut pos = authority_end + q + 1;
        for pair in url[pos..].split('&') {
            if let Some((key, _)) = pair.split_once('=') {
                if key.eq_ignore_ascii_case("password") {
                    spans.push(pos + key.len() + 1..pos + pair.len());
                }
            }
            pos += pair.len() + 1;
        }
    }
    spans
}

/// The values of the `password` keys of a key=value string; values may be quoted with
/// single quotes (a backslash escapes a quote), and spaces may surround `=`.
fn key_value_secrets(text: &str) -> Vec<Range<usize>> {
    let mut spans = Vec::new();
    let mut pos = 0;
    while let Some(eq) = text[pos..].find('=') {
        // The key is the last word before `=` (`?` and `&` count as spaces, for a URL
        // mistyped into this reading).
        let key = text[pos..pos + eq].trim_end().rsplit([' ', '\t', '\n', '?', '&']).next().unwrap_or("");
        let after_eq = &text[pos + eq + 1..];
        let value_start = pos + eq + 1 + (after_eq.len() - after_eq.trim_start().len());
        let value = &text[value_start..];
        let value_len = match value.strip_prefix('\'') {
            Some(quoted) => {
                let mut escaped = false;
                let mut len = value.len();
                for (i, c) in quoted.char_indices() {
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '\'' {
                        len = i + 2;
                        break;
                    }
                }
                len
            }
            None => value.find(char::is_whitespace).unwrap_or(value.len()),
        };
        if key.eq_ignore_ascii_case("password") {
            spans.push(value_start..value_start + value_len);
        }
        pos = value_start + value_len;
    }
    spans
}

/// The password of a URL mistyped (`postgres//user:secret@host`, `postgres:/...`): what
/// follows the first `:` of the word before the last `@`.
fn mistyped_url_secret(text: &str) -> Option<Range<usize>> {
    let at = text.rfind('@')?;
    let word = text[..at].rfind(['/', ' ']).map_or(0, |i| i + 1);
    let colon = text[word..at].find(':')?;
    Some(word + colon + 1..at)
}

/// The setting that bounds how long the claims' and the completer's statements wait
/// for a row another session holds locked (a second): then the statement fails. The
/// completer then sets aside the attempts whose rows are locked
/// ([`locked_by_others`](crate::db::completion::locked_by_others)) and records the
/// others; a give-back that fails leaves its tasks to the rescue.
pub(crate) const BOUNDED_LOCK_WAITS: &str = "lock_timeout = 1000";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalives_are_asked_for_in_urls_and_key_value_strings() {
        assert_eq!(
            with_parameters("postgres://h/db", &KEEPALIVES),
            "postgres://h/db?keepalives=1&keepalives_idle=10&keepalives_interval=5&keepalives_count=3"
        );
        assert!(with_parameters("postgres://h/db?sslmode=require", &KEEPALIVES)
            .starts_with("postgres://h/db?sslmode=require&keepalives=1&"));
        assert_eq!(
            with_parameters("host=h", &KEEPALIVES),
            "host=h keepalives='1' keepalives_idle='10' keepalives_interval='5' keepalives_count='3'"
        );
    }

    #[test]
    fn a_parameter_with_spaces_and_quotes_is_escaped_in_either_form() {
        let name = [("application_name", "task_engine it's a/b")];
        assert_eq!(
            with_parameters("postgres://h/db", &name),
            "postgres://h/db?application_name=task_engine%20it%27s%20a%2Fb"
        );
        assert_eq!(with_parameters("host=h", &name), "host=h application_name='task_engine it\\'s a/b'");
    }

    #[test]
    fn redacts_url_passwords() {
        assert_eq!(redact_url("postgres://bob:s3cret@db.example:5432/app"), "postgres://bob:***@db.example:5432/app");
        assert_eq!(redact_url("postgresql://bob@db/app"), "postgresql://bob@db/app");
        assert_eq!(
            redact_url("postgres://bob:p%40ss@db/app?password=x&sslmode=require"),
            "postgres://bob:***@db/app?password=***&sslmode=require"
        );
        assert_eq!(redact_url("postgres://db/app?sslmode=require"), "postgres://db/app?sslmode=require");
    }

    #[test]
    fn redacts_key_value_passwords() {
        assert_eq!(
            redact_url("host=db user=bob password=s3cret dbname=app"),
            "host=db user=bob password=*** dbname=app"
        );
        assert_eq!(redact_url("host=db password='a b\\' c' dbname=app"), "host=db password=*** dbname=app");
    }

    #[test]
    fn never_prints_the_secret() {
        for url in [
            "postgres://u:topsecret@h/d",
            "password=topsecret",
            "postgres://h/d?password=topsecret",
            "user=u password = 'topsecret'",
        ] {
            assert!(!redact_url(url).contains("topsecret"), "{url} -> {}", redact_url(url));
        }
    }

    #[test]
    fn a_string_that_is_neither_a_url_nor_key_value_pairs_is_shown_with_its_password_hidden() {
        assert_eq!(redact_url("postgres//bob:s3cret@db/app"), "postgres//bob:***@db/app");
        assert_eq!(redact_url("postgres:/bob:s3cret@db/app"), "postgres:/bob:***@db/app");
        assert_eq!(redact_url("notaurl"), "notaurl");
        assert_eq!(redact_url("junk password=s3cret host=db"), "junk password=*** host=db");
        assert_eq!(redact_url("postgres:/bob@db/app?password=s3cret"), "postgres:/bob@db/app?password=***");
        assert_eq!(redact_url("user=bob@corp host=db"), "user=bob@corp host=db");
    }

    #[test]
    fn the_drivers_message_is_shown_without_the_password() {
        let url = "postgres//bob:s3cret@db/app";
        let said = r#"missing "=" after "postgres//bob:s3cret@db/app" in connection info string"#;
        assert_eq!(
            redact_message(said, url),
            r#"missing "=" after "postgres//bob:***@db/app" in connection info string"#
        );
    }
}
