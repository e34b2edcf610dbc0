//! Connections: the pool that workers and tasks share, the connections an instance
//! keeps for itself (outside the pool, where session state and locks stay theirs),
//! and connection strings as they may be printed.

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

/// Opens a connection to `database_url`; the error names the server without its
/// password.
pub fn connect(database_url: &str) -> Result<PgConnection, Error> {
    PgConnection::establish(database_url)
        .map_err(|source| Error::Connection { server: redact_url(database_url), source })
}

/// `database_url` asking for TCP keepalives (a peer that vanished without closing the
/// socket is noticed within about half a minute), as a URL or as `key=value` pairs.
pub(crate) fn with_keepalives(database_url: &str) -> String {
    const KEEPALIVES: [(&str, &str); 4] =
        [("keepalives", "1"), ("keepalives_idle", "10"), ("keepalives_interval", "5"), ("keepalives_count", "3")];
    if database_url.contains("://") {
        let mut url = database_url.to_owned();
        for (i, (key, value)) in KEEPALIVES.iter().enumerate() {
            let separator = if i == 0 && !database_url.contains('?') { '?' } else { '&' };
            url.push_str(&format!("{separator}{key}={value}"));
        }
        url
    } else {
        KEEPALIVES.iter().fold(database_url.to_owned(), |url, (key, value)| format!("{url} {key}={value}"))
    }
}

/// Checks that a connection of the engine's own still answers.
pub(crate) fn ping(conn: &mut PgConnection) -> diesel::QueryResult<()> {
    use diesel::RunQueryDsl;
    diesel::sql_query("SELECT 1").execute(conn).map(drop)
}

/// A connection string fit to print: the password, if any, replaced by `***`.
/// Handles URLs (`postgres://user:secret@host/db?password=secret`) and key=value
/// strings (`host=h password=secret`).
pub fn redact_url(url: &str) -> String {
    let url = url.trim();
    if let Some(scheme_end) = url.find("://") {
        let (scheme, rest) = url.split_at(scheme_end + 3);
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let authority = match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => format!("{}:***{}", &userinfo[..colon], &authority[at..]),
                    None => authority.to_owned(),
                }
            }
            None => authority.to_owned(),
        };
        let tail = match tail.find('?') {
            Some(q) => {
                let (path, query) = tail.split_at(q + 1);
                let query: Vec<String> = query
                    .split('&')
                    .map(|pair| match pair.split_once('=') {
                        Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                        _ => pair.to_owned(),
                    })
                    .collect();
                format!("{path}{}", query.join("&"))
            }
            None => tail.to_owned(),
        };
        return format!("{scheme}{authority}{tail}");
    }
    // key=value form; values may be quoted with single quotes.
    let mut out = String::new();
    let mut rest = url;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim();
        let after = rest[eq + 1..].trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('\'') {
            let mut end = quoted.len();
            let mut escaped = false;
            for (i, c) in quoted.char_indices() {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '\'' {
                    end = i;
                    break;
                }
            }
            (&after[..(end + 2).min(after.len())], &quoted[(end + 1).min(quoted.len())..])
        } else {
            let end = after.find(char::is_whitespace).unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        if !out.is_empty() {
            out.push(' ');
        }
        if key.eq_ignore_ascii_case("password") {
            out.push_str(&format!("{key}=***"));
        } else {
            out.push_str(&format!("{key}={value}"));
        }
        rest = remaining.trim_start();
    }
    out
}

/// How long the producer's and the completer's statements may wait for a row another
/// session holds locked: then the statement fails. The completer then sets aside the
/// attempts whose rows are locked ([`locked_by_others`](crate::db::completion::locked_by_others)) and records the others; a
/// give-back that fails leaves its tasks to the rescue.
pub(crate) const ROW_LOCK_WAIT: Duration = Duration::from_secs(1);

/// Bounds this session's lock waits by [`ROW_LOCK_WAIT`] (the producer's connection;
/// the completer's gets it from [`prepare_completer_session`](crate::db::completion::prepare_completer_session)).
pub(crate) fn bound_lock_waits(conn: &mut PgConnection) -> QueryResult<()> {
    conn.batch_execute(&format!("SET lock_timeout = {}", ROW_LOCK_WAIT.as_millis()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalives_are_asked_for_in_urls_and_key_value_strings() {
        assert_eq!(
            with_keepalives("postgres://h/db"),
            "postgres://h/db?keepalives=1&keepalives_idle=10&keepalives_interval=5&keepalives_count=3"
        );
        assert!(with_keepalives("postgres://h/db?sslmode=require")
            .starts_with("postgres://h/db?sslmode=require&keepalives=1&"));
        assert_eq!(
            with_keepalives("host=h"),
            "host=h keepalives=1 keepalives_idle=10 keepalives_interval=5 keepalives_count=3"
        );
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
}
