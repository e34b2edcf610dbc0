//! A PgBouncer in transaction pool mode in front of a server on this machine, as a
//! deployment puts one in front of its database: for the tests that show what works
//! through a transaction pooler. Its configuration is generated in a directory of ours;
//! it listens on a free loopback port, with no Unix socket, and lets clients in without
//! a password (`auth_type = trust`, the users listed in its auth file), logging into
//! the server as they asked. PgBouncer refuses to run as root: when we are root it runs
//! as `postgres`, as the private cluster does.

use std::fs;
use std::io::Write as _;
use std::net::TcpStream;
#[cfg(unix)]
use std::os::unix::fs::chown;
#[cfg(unix)]
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{effective_uid, free_port, io, is_executable, postgres_user, ClusterError};

/// How many server connections it opens per database and user (PgBouncer's
/// `default_pool_size`): small, as in front of a server with a connection budget.
pub const POOL_SIZE: u32 = 10;

/// A running PgBouncer, stopped when dropped.
#[derive(Debug)]
pub struct Bouncer {
    child: Child,
    port: u16,
    dir: PathBuf,
    /// What it takes to start it again ([`Bouncer::restart`]).
    program: PathBuf,
    run_as: Option<(u32, u32)>,
    server_port: u16,
}

impl Bouncer {
    /// Finds the `pgbouncer` program: `TASK_ENGINE_PGBOUNCER`, `PATH`, or where
    /// distributions put it (Debian's package: `/usr/sbin`, outside a user's `PATH`).
    pub fn find_program() -> Result<PathBuf, String> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(path) = std::env::var_os("TASK_ENGINE_PGBOUNCER") {
            candidates.push(path.into());
        }
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path).map(|dir| dir.join("pgbouncer")));
        }
        candidates.extend(
            [
                "/usr/sbin/pgbouncer",
                "/usr/local/sbin/pgbouncer",
                "/usr/local/bin/pgbouncer",
                "/opt/homebrew/bin/pgbouncer",
            ]
            .map(PathBuf::from),
        );
        candidates.into_iter().find(|p| is_executable(p)).ok_or_else(|| {
            "pgbouncer not found (TASK_ENGINE_PGBOUNCER, PATH, /usr/sbin); install it (Debian/Ubuntu: \
             `apt-get install pgbouncer`; macOS: `brew install pgbouncer`) to run the tests through a \
             transaction pooler"
                .to_owned()
        })
    }

    /// Starts PgBouncer in transaction pool mode, its files in `dir` (created; deleted
    /// once this process has exited), in front
    /// of the server on 127.0.0.1:`server_port`, letting in `user` without a password;
    /// returns once it accepts connections.
    pub fn start(dir: &Path, server_port: u16, user: &str) -> Result<Self, ClusterError> {
        let program = Self::find_program().map_err(|message| ClusterError::Io {
            context: message,
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        let run_as = if effective_uid() == Some(0) { Some(postgres_user()?) } else { None };
        fs::create_dir_all(dir).map_err(io(format!("could not create {}", dir.display())))?;
        let users = dir.join("users.txt");
        fs::write(&users, format!("\"{}\" \"\"\n", user.replace('"', "\"\"")))
            .map_err(io(format!("could not write {}", users.display())))?;
        #[cfg(unix)]
        if let Some((uid, gid)) = run_as {
            for path in [dir, users.as_path()] {
                chown(path, Some(uid), Some(gid))
                    .map_err(io(format!("could not give {} to postgres", path.display())))?;
            }
        }
        // Another process may take the port between our probe and PgBouncer's bind:
        // try a few.
        let mut last_error = None;
        for _ in 0..5 {
            let port = free_port()?;
            match Self::start_on(&program, dir, run_as, server_port, port) {
                Ok(child) => {
                    return Ok(Self { child, port, dir: dir.to_path_buf(), program, run_as, server_port });
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    fn start_on(
        program: &Path,
        dir: &Path,
        run_as: Option<(u32, u32)>,
        server_port: u16,
        port: u16,
    ) -> Result<Child, ClusterError> {
        let config = dir.join("pgbouncer.ini");
        let log = dir.join("pgbouncer.log");
        // `*`: every database of the server, by the name the client asks for. libpq
        // clients may send `extra_float_digits` and `options` at startup, which
        // PgBouncer refuses unless told to ignore them.
        let text = format!(
            "[databases]\n\
             * = host=127.0.0.1 port={server_port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {users}\n\
             pool_mode = transaction\n\
             default_pool_size = {POOL_SIZE}\n\
             max_client_conn = 1000\n\
             ignore_startup_parameters = extra_float_digits,options\n\
             logfile = {log}\n",
            users = dir.join("users.txt").display(),
            log = log.display(),
        );
        let mut file = fs::File::create(&config).map_err(io(format!("could not write {}", config.display())))?;
        file.write_all(text.as_bytes()).map_err(io(format!("could not write {}", config.display())))?;
        let mut cmd = Command::new(program);
        cmd.arg("-q").arg(&config).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        #[cfg(unix)]
        if let Some((uid, gid)) = run_as {
            chown(&config, Some(uid), Some(gid))
                .map_err(io(format!("could not give {} to postgres", config.display())))?;
            cmd.uid(uid).gid(gid).current_dir("/");
        }
        let mut child = cmd.spawn().map_err(io(format!("could not start {}", program.display())))?;
        stop_when_this_process_exits(child.id(), dir)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(child);
            }
            let exited = child.try_wait().map_err(io("could not watch pgbouncer"))?;
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let tail = fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(15).collect();
                return Err(ClusterError::CommandFailed {
                    command: format!("{} {}", program.display(), config.display()),
                    status: exited.map_or_else(|| "not listening after 30 s".to_owned(), |s| s.to_string()),
                    output: tail.into_iter().rev().map(|l| format!("{l}\n")).collect(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it with SIGKILL, as a crash would: its clients' connections and its
    /// server connections are cut at once, whatever they were doing.
    pub fn kill(&mut self) -> Result<(), ClusterError> {
        self.child.kill().map_err(io("could not kill pgbouncer"))?;
        self.child.wait().map_err(io("could not wait for pgbouncer"))?;
        Ok(())
    }

    /// Starts it again, on the same port with the same configuration, killing it first
    /// if it still runs; returns once it accepts connections.
    pub fn restart(&mut self) -> Result<(), ClusterError> {
        if self.child.try_wait().map_err(io("could not watch pgbouncer"))?.is_none() {
            self.kill()?;
        }
        self.child = Self::start_on(&self.program, &self.dir, self.run_as, self.server_port, self.port)?;
        Ok(())
    }

    /// The port it listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its directory: configuration and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes sure PgBouncer (`pid`) is stopped and its directory deleted once this process
/// has exited, however it exits: a watchdog outside our process group waits for us.
#[cfg(unix)]
fn stop_when_this_process_exits(pid: u32, dir: &Path) -> Result<(), ClusterError> {
    let script = r#"
        while kill -0 "$1" 2>/dev/null; do sleep 1; done
        kill -TERM "$2" 2>/dev/null
        rm -rf "$3"
    "#;
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("task_engine-pgbouncer-watchdog")
        .arg(std::process::id().to_string())
        .arg(pid.to_string())
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(io("could not start pgbouncer's watchdog"))?;
    Ok(())
}

#[cfg(not(unix))]
fn stop_when_this_process_exits(_pid: u32, _dir: &Path) -> Result<(), ClusterError> {
    Ok(())
}
