//! A private PostgreSQL cluster: created with `initdb` in a directory of ours, started
//! on a free loopback port, stopped when asked. It is the embedded default of the
//! `engine` command (no `DATABASE_URL`) and the server of the test harness; the engine
//! library does not use it, so programs that link the library never compile it.
//!
//! The server binaries are the machine's own (`TASK_ENGINE_PG_BIN`, `PATH`,
//! `pg_config --bindir`, `/usr/lib/postgresql/*/bin`). PostgreSQL refuses to run as
//! root, so when we are root the cluster belongs to, and runs as, the `postgres` user.
//! Authentication is `trust` and the server listens on 127.0.0.1 only, with no Unix
//! socket: it is for development and tests on this machine, not for production.
//!
//! [`Bouncer`] puts a PgBouncer in transaction pool mode in front of a cluster, for the
//! tests that run through one.

mod bouncer;

pub use bouncer::{Bouncer, POOL_SIZE};

use std::ffi::OsString;
use std::fs;
use std::net::TcpListener;
#[cfg(unix)]
use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
#[cfg(unix)]
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use diesel::{sql_query, Connection, PgConnection, RunQueryDsl};

/// The superuser `initdb` creates, and the user the server runs as when we are root.
const SUPERUSER: &str = "postgres";

/// How a cluster is set up.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// `false` turns off `fsync`, `synchronous_commit` and `full_page_writes`: for
    /// throwaway test clusters only (a crash of the machine can corrupt them).
    pub fsync: bool,
    /// More server settings, passed as `-c name=value` at every start.
    pub settings: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self { fsync: true, settings: Vec::new() }
    }
}

/// What can go wrong with a private cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No PostgreSQL server binaries on this machine.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; looked in: {searched}.\n\
         Install them (Debian/Ubuntu: `apt-get install postgresql`; Fedora: `dnf install postgresql-server`; \
         macOS: `brew install postgresql`), point TASK_ENGINE_PG_BIN at their directory, \
         or set DATABASE_URL to use a server of yours"
    )]
    BinariesNotFound {
        /// The places looked at, for the message.
        searched: String,
    },

    /// A PostgreSQL program failed.
    #[error("`{command}` failed ({status}):\n{output}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed (and the end of the server log, for a failed start).
        output: String,
    },

    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },

    /// We are root and there is no `postgres` user to run the server as.
    #[error("running as root, and PostgreSQL will not: create a `postgres` user, or set DATABASE_URL")]
    NoUnprivilegedUser,

    /// We are root and the `postgres` user cannot reach the data directory.
    #[error(
        "the server runs as user `postgres`, which cannot enter {blocking} (on the way to {data_dir}); \
         choose a data directory elsewhere (e.g. under /var/tmp) or make {blocking} searchable (chmod o+x)"
    )]
    Unreachable {
        /// The data directory.
        data_dir: PathBuf,
        /// The first directory on its path that `postgres` may not enter.
        blocking: PathBuf,
    },

    /// A query on the cluster failed.
    #[error("{context}: {message}")]
    Database {
        /// What was being done.
        context: String,
        /// The error.
        message: String,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let context = context.into();
    move |source| ClusterError::Io { context, source }
}

/// A PostgreSQL cluster in a directory of ours.
#[derive(Debug)]
pub struct Cluster {
    bin_dir: PathBuf,
    data_dir: PathBuf,
    options: ClusterOptions,
    /// The user and group the server runs as, when we are root.
    run_as: Option<(u32, u32)>,
    /// The port it listens on (known once started, or found running).
    port: u16,
}

impl Cluster {
    /// Finds the directory of `initdb`, `pg_ctl` and `postgres`.
    pub fn find_bin_dir() -> Result<PathBuf, ClusterError> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(dir) = std::env::var_os("TASK_ENGINE_PG_BIN") {
            candidates.push(dir.into());
        }
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path));
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").stderr(Stdio::null()).output() {
            if out.status.success() {
                candidates.push(String::from_utf8_lossy(&out.stdout).trim().into());
            }
        }
        // Debian and Ubuntu keep server binaries out of PATH, one directory per major
        // version: prefer the newest.
        let mut versioned: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path().join("bin"))))
            .collect();
        versioned.sort_by_key(|v| std::cmp::Reverse(v.0));
        candidates.extend(versioned.into_iter().map(|(_, p)| p));
        candidates.extend(["/usr/local/pgsql/bin", "/opt/homebrew/bin", "/usr/local/bin"].map(PathBuf::from));

        let found =
            candidates.iter().find(|dir| ["initdb", "pg_ctl", "postgres"].iter().all(|b| is_executable(&dir.join(b))));
        match found {
            Some(dir) => Ok(fs::canonicalize(dir.join("pg_ctl"))
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .unwrap_or_else(|| dir.clone())),
            None => {
                let mut searched: Vec<String> = Vec::new();
                for c in &candidates {
                    let s = c.display().to_string();
                    if !s.is_empty() && !searched.contains(&s) {
                        searched.push(s);
                    }
                }
                Err(ClusterError::BinariesNotFound { searched: searched.join(", ") })
            }
        }
    }

    /// Opens the cluster in `data_dir`, creating it with `initdb` if the directory has
    /// none. It is not started.
    pub fn init_or_open(data_dir: &Path, options: ClusterOptions) -> Result<Self, ClusterError> {
        let bin_dir = Self::find_bin_dir()?;
        let run_as = if effective_uid() == Some(0) { Some(postgres_user()?) } else { None };
        let mut cluster = Self { bin_dir, data_dir: data_dir.to_path_buf(), options, run_as, port: 0 };
        if !data_dir.join("PG_VERSION").exists() {
            cluster.initdb()?;
        }
        if let Some(port) = cluster.running_port() {
            cluster.port = port;
        }
        Ok(cluster)
    }

    fn initdb(&self) -> Result<(), ClusterError> {
        let dir = &self.data_dir;
        self.make_data_dir(dir)?;
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(dir).args(["--auth=trust", "--encoding=UTF8", "--locale=C", "-U", SUPERUSER]);
        if !self.options.fsync {
            cmd.arg("--no-sync");
        }
        run(cmd)?;
        Ok(())
    }

    /// Creates a data directory as PostgreSQL wants it: private, and the server's user's
    /// (which must be able to reach it) when we are root.
    fn make_data_dir(&self, dir: &Path) -> Result<(), ClusterError> {
        fs::create_dir_all(dir).map_err(io(format!("could not create {}", dir.display())))?;
        #[cfg(unix)]
        {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(io(format!("could not set the mode of {}", dir.display())))?;
            if let Some((uid, gid)) = self.run_as {
                chown(dir, Some(uid), Some(gid))
                    .map_err(io(format!("could not give {} to postgres", dir.display())))?;
                check_reachable(dir, uid, gid)?;
            }
        }
        Ok(())
    }

    /// Whether a server is running on this data directory.
    pub fn is_running(&self) -> bool {
        self.running_port().is_some()
    }

    /// The port of the server running on this directory, if one is.
    fn running_port(&self) -> Option<u16> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("status").arg("-D").arg(&self.data_dir).stdout(Stdio::null()).stderr(Stdio::null());
        if !cmd.status().ok()?.success() {
            return None;
        }
        // postmaster.pid: pid, data directory, start time, port, ...
        let pid_file = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        pid_file.lines().nth(3)?.trim().parse().ok()
    }

    /// Starts the server (on its previous port if it had one, else on a free loopback
    /// port), or adopts the one already running.
    pub fn start(&mut self) -> Result<(), ClusterError> {
        if let Some(port) = self.running_port() {
            self.port = port;
            return Ok(());
        }
        // A restart keeps the port it had, so that clients reconnect.
        if self.port != 0 && self.start_on(self.port).is_ok() {
            return Ok(());
        }
        // Another process may take the port between our probe and the server's bind:
        // try a few.
        let mut last_error = None;
        for _ in 0..5 {
            let port = free_port()?;
            match self.start_on(port) {
                Ok(()) => {
                    self.port = port;
                    return Ok(());
                }
                Err(e) => last_error = Some(e),
            }
            if self.is_running() {
                break;
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// Stops the server and starts it again on the same port.
    pub fn restart(&mut self) -> Result<(), ClusterError> {
        let port = self.port;
        self.stop()?;
        self.start_on(port)
    }

    fn start_on(&self, port: u16) -> Result<(), ClusterError> {
        let mut server_options = format!("-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''");
        if !self.options.fsync {
            server_options.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        for (name, value) in &self.options.settings {
            server_options.push_str(&format!(" -c {name}={value}"));
        }
        let log = self.data_dir.join("server.log");
        let mut cmd = self.command("pg_ctl");
        cmd.arg("start").arg("-w").arg("-t").arg("60").arg("-D").arg(&self.data_dir);
        cmd.arg("-l").arg(&log).arg("-o").arg(server_options);
        run(cmd).map_err(|e| match e {
            ClusterError::CommandFailed { command, status, mut output } => {
                let tail = fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(15).collect();
                output.push_str("\nserver log (end):\n");
                output.extend(tail.into_iter().rev().map(|l| format!("{l}\n")));
                ClusterError::CommandFailed { command, status, output }
            }
            other => other,
        })?;
        Ok(())
    }

    /// Stops the server (fast shutdown: sessions are ended, work in flight rolled back).
    pub fn stop(&self) -> Result<(), ClusterError> {
        if !self.is_running() {
            return Ok(());
        }
        let mut cmd = self.command("pg_ctl");
        cmd.arg("stop").arg("-w").arg("-m").arg("fast").arg("-D").arg(&self.data_dir);
        run(cmd)?;
        Ok(())
    }

    /// The process id of the server (the postmaster), while one runs on this directory.
    pub fn server_pid(&self) -> Option<u32> {
        let pid_file = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        pid_file.lines().next()?.trim().parse().ok()
    }

    /// Makes a streaming standby of this running cluster in `data_dir` (with
    /// `pg_basebackup -R`), and starts it on a free port. It follows this one until
    /// [`Cluster::promote`].
    pub fn standby(&self, data_dir: &Path) -> Result<Cluster, ClusterError> {
        self.make_data_dir(data_dir)?;
        let mut cmd = self.command("pg_basebackup");
        cmd.arg("-D").arg(data_dir).args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", SUPERUSER]);
        cmd.args(["-R", "-X", "stream", "--no-sync", "--checkpoint=fast"]);
        run(cmd)?;
        let mut standby = Cluster {
            bin_dir: self.bin_dir.clone(),
            data_dir: data_dir.to_path_buf(),
            options: self.options.clone(),
            run_as: self.run_as,
            port: 0,
        };
        standby.start()?;
        Ok(standby)
    }

    /// Promotes a standby: it stops following and accepts writes.
    pub fn promote(&self) -> Result<(), ClusterError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("promote").arg("-w").arg("-D").arg(&self.data_dir);
        run(cmd)?;
        Ok(())
    }

    /// Kills the server with SIGKILL, as a crash would, and does not start it again.
    #[cfg(unix)]
    pub fn crash(&self) -> Result<(), ClusterError> {
        if let Some(pid) = self.server_pid() {
            Command::new("kill").arg("-KILL").arg(pid.to_string()).status().map_err(io("could not kill the server"))?;
        }
        Ok(())
    }

    /// Kills the server with SIGKILL, as a crash would, waits until its processes are
    /// gone, and starts it again on the same port: PostgreSQL recovers from its WAL.
    #[cfg(unix)]
    pub fn crash_and_recover(&mut self) -> Result<(), ClusterError> {
        self.crash()?;
        // The backends leave once they see their postmaster gone; until then the new
        // server refuses the shared memory they still hold.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            match self.start_on(self.port) {
                Ok(()) => return Ok(()),
                Err(error) if std::time::Instant::now() > deadline => return Err(error),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(200)),
            }
        }
    }

    /// The port to try first at the next start, unless the server already runs (then
    /// a free one, if it is taken).
    pub fn prefer_port(&mut self, port: u16) {
        if self.running_port().is_none() {
            self.port = port;
        }
    }

    /// Whether the server runs as the `postgres` user (we are root).
    pub fn runs_as_postgres(&self) -> bool {
        self.run_as.is_some()
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory of the server binaries it uses (`pg_ctl`, `postgres`).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The user its URLs log in as: the superuser `initdb` created.
    pub fn user(&self) -> &'static str {
        SUPERUSER
    }

    /// A connection URL for `database` on this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates `database` unless it exists.
    pub fn create_database_if_missing(&self, database: &str) -> Result<(), ClusterError> {
        let failed = |context: &str, e: &dyn std::fmt::Display| ClusterError::Database {
            context: format!("{context} on the cluster in {}", self.data_dir.display()),
            message: e.to_string(),
        };
        let mut conn = PgConnection::establish(&self.url("postgres")).map_err(|e| failed("could not connect", &e))?;
        #[derive(diesel::QueryableByName)]
        struct Found {
            #[diesel(sql_type = diesel::sql_types::Bool)]
            found: bool,
        }
        let found: Found = sql_query("SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1) AS found")
            .bind::<diesel::sql_types::Text, _>(database)
            .get_result(&mut conn)
            .map_err(|e| failed("could not list databases", &e))?;
        if !found.found {
            let create = format!("CREATE DATABASE {}", quote_identifier(database));
            if let Err(e) = sql_query(create).execute(&mut conn) {
                // Another process may have created it meanwhile.
                if !e.to_string().contains("already exists") {
                    return Err(failed(&format!("could not create database {database}"), &e));
                }
            }
        }
        Ok(())
    }

    /// Makes sure the server is stopped, and `remove` deleted if given, once this
    /// process has exited, however it exits (a watchdog process outside our process
    /// group waits for it). For throwaway clusters: tests, benchmarks. Unix only (the
    /// watchdog is a `sh` script).
    #[cfg(unix)]
    pub fn stop_when_this_process_exits(&self, remove: Option<&Path>) -> Result<(), ClusterError> {
        let script = r#"
            while kill -0 "$1" 2>/dev/null; do sleep 1; done
            pid=$(head -n 1 "$2/postmaster.pid" 2>/dev/null)
            if [ -n "$pid" ]; then
                kill -QUIT "$pid" 2>/dev/null
                while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
            fi
            if [ -n "$3" ]; then rm -rf "$3"; fi
        "#;
        let remove: OsString = remove.map(|p| p.as_os_str().to_owned()).unwrap_or_default();
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("task_engine-watchdog")
            .arg(std::process::id().to_string())
            .arg(&self.data_dir)
            .arg(remove)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Out of our process group, so a Ctrl-C meant for us does not reach it.
            .process_group(0)
            .spawn()
            .map_err(io("could not start the cluster's watchdog"))?;
        Ok(())
    }

    /// A command for one of the server binaries, run as `postgres` when we are root.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        cmd.stdin(Stdio::null());
        // The server inherits the environment; keep the locale out of its way.
        cmd.env("LC_ALL", "C").env_remove("PGDATA").env_remove("PGPORT");
        #[cfg(unix)]
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
            // A working directory that `postgres` can read.
            cmd.current_dir("/");
        }
        cmd
    }
}

/// Runs `cmd` to completion; a non-zero exit becomes [`ClusterError::CommandFailed`].
fn run(mut cmd: Command) -> Result<Output, ClusterError> {
    let line = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
    );
    let output = cmd.output().map_err(io(format!("could not run {line}")))?;
    if output.status.success() {
        return Ok(output);
    }
    Err(ClusterError::CommandFailed {
        command: line,
        status: output.status.to_string(),
        output: format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)),
    })
}

fn is_executable(path: &Path) -> bool {
    #[cfg(unix)]
    let executable = |m: &fs::Metadata| m.permissions().mode() & 0o111 != 0;
    #[cfg(not(unix))]
    let executable = |_: &fs::Metadata| true;
    fs::metadata(path).map(|m| m.is_file() && executable(&m)).unwrap_or(false)
}

/// A loopback port that nobody listens on right now.
fn free_port() -> Result<u16, ClusterError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("could not find a free port"))?;
    Ok(listener.local_addr().map_err(io("could not find a free port"))?.port())
}

/// Our effective user id, from `/proc` (Linux), without `libc`; `None` elsewhere.
fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// The uid and gid of the `postgres` user, from `/etc/passwd`.
fn postgres_user() -> Result<(u32, u32), ClusterError> {
    let passwd = fs::read_to_string("/etc/passwd").map_err(io("could not read /etc/passwd"))?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == SUPERUSER)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .ok_or(ClusterError::NoUnprivilegedUser)
}

/// Fails unless `uid`/`gid` may enter every directory down to `dir`.
#[cfg(unix)]
fn check_reachable(dir: &Path, uid: u32, gid: u32) -> Result<(), ClusterError> {
    let dir = fs::canonicalize(dir).map_err(io(format!("could not resolve {}", dir.display())))?;
    for ancestor in dir.ancestors().skip(1) {
        let Ok(meta) = fs::metadata(ancestor) else { continue };
        let mode = meta.mode();
        let can_enter = if meta.uid() == uid {
            mode & 0o100 != 0
        } else if meta.gid() == gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !can_enter {
            return Err(ClusterError::Unreachable { data_dir: dir.clone(), blocking: ancestor.to_path_buf() });
        }
    }
    Ok(())
}

/// Quotes an SQL identifier.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }
}
