//! A throwaway PostgreSQL server (the Debian `postgresql` package, installed by scripts/setup)
//! on 127.0.0.1, for tests of kas's PostgreSQL store. No system service is involved: each
//! [`Postgres`] is its own cluster in a temporary directory, stopped and deleted when dropped.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{Error, Result, io_err, run_output};

/// The superuser the cluster is created with; it authenticates without a password ("trust"),
/// which is fine for a server only reachable from this machine for the length of a test.
pub const USER: &str = "tether";

/// A role that must give its password (SCRAM) on 127.0.0.1, for tests of credential
/// rotation; created by [`Postgres::create_password_database`].
pub const PASSWORD_USER: &str = "tether_password";

/// Where a start that lost its port to another process is retried with a new one; see
/// [`Postgres::start`].
const START_ATTEMPTS: u32 = 3;

/// A running PostgreSQL server, stopped (and its data deleted) when dropped.
#[derive(Debug)]
pub struct Postgres {
    /// Its port on 127.0.0.1.
    pub port: u16,
    bin: PathBuf,
    data: PathBuf,
    /// uid and gid the server runs as when the tests run as root (PostgreSQL refuses root).
    owner: Option<(u32, u32)>,
    dir: tempfile::TempDir,
}

impl Postgres {
    /// Creates a cluster (`initdb`) and starts it (`pg_ctl start`), returning once it accepts
    /// connections. Fails, rather than letting a test skip, when PostgreSQL is not installed.
    ///
    /// PostgreSQL cannot be told to pick a free port and report it, so the port is picked here
    /// (bind to port 0, read it, close) and handed to the server. Another process can take it in
    /// between; the server then fails to bind, `pg_ctl` reports the failure, and the start is
    /// retried with a fresh port, so the race costs a retry, never a wrong server.
    pub fn start() -> Result<Postgres> {
        let bin = bin_dir()?;
        let owner = server_owner()?;
        let dir = tempfile::tempdir().map_err(io_err("creating a directory for PostgreSQL"))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(io_err(
                "handing the PostgreSQL directory to the postgres user",
            ))?;
        }
        let data = dir.path().join("data");
        let mut server = Postgres {
            port: 0,
            bin,
            data,
            owner,
            dir,
        };
        let mut initdb = server.command("initdb");
        initdb.arg("-D").arg(&server.data).args([
            "-A",
            "trust",
            "-U",
            USER,
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run_output(&mut initdb)?;
        server.require_password_of(PASSWORD_USER)?;
        let mut attempt = 1;
        loop {
            server.port = tether_test_support::unused_port();
            match server.pg_ctl_start() {
                Ok(()) => return Ok(server),
                Err(e) if attempt < START_ATTEMPTS && server.lost_port() => {
                    attempt += 1;
                    drop(e);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The URL of database `database` for [`USER`].
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// The cluster's directory (data files and write-ahead log).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Creates an empty database and returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String> {
        let mut createdb = self.command("createdb");
        createdb
            .args(["-h", "127.0.0.1", "-U", USER, "-p"])
            .arg(self.port.to_string())
            .arg(name);
        run_output(&mut createdb)?;
        Ok(self.url(name))
    }

    /// Creates [`PASSWORD_USER`] with `password` and an empty database it owns; returns the
    /// database's URL with that password in it.
    pub fn create_password_database(&self, name: &str, password: &str) -> Result<String> {
        self.sql(&format!(
            "CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD {}",
            quote(password)
        ))?;
        let mut createdb = self.command("createdb");
        createdb
            .args(["-h", "127.0.0.1", "-U", USER, "-O", PASSWORD_USER, "-p"])
            .arg(self.port.to_string())
            .arg(name);
        run_output(&mut createdb)?;
        Ok(self.password_url(name, password))
    }

    /// The URL of database `name` as [`PASSWORD_USER`] with `password`.
    pub fn password_url(&self, name: &str, password: &str) -> String {
        format!(
            "postgres://{PASSWORD_USER}:{password}@127.0.0.1:{}/{name}",
            self.port
        )
    }

    /// Changes [`PASSWORD_USER`]'s password and ends its sessions, as an operator rotating a
    /// leaked password does: from now on only the new one connects.
    pub fn rotate_password(&self, password: &str) -> Result<()> {
        self.sql(&format!(
            "ALTER ROLE {PASSWORD_USER} PASSWORD {}",
            quote(password)
        ))?;
        self.sql(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{PASSWORD_USER}'"
        ))
    }

    /// Runs one SQL statement as [`USER`] in database `postgres`.
    fn sql(&self, statement: &str) -> Result<()> {
        self.sql_in("postgres", statement).map(drop)
    }

    /// Runs SQL (one or several statements) as [`USER`] in `database`, behind the back of
    /// the programs using it: a test making writes fail with a trigger, say. Returns what it
    /// printed: the rows selected, unaligned, one a line.
    pub fn sql_in(&self, database: &str, statement: &str) -> Result<String> {
        let mut psql = self.command("psql");
        psql.args([
            "-h",
            "127.0.0.1",
            "-U",
            USER,
            "-d",
            database,
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-p",
        ])
        .arg(self.port.to_string())
        .arg("-c")
        .arg(statement);
        run_output(&mut psql).map(|out| String::from_utf8_lossy(&out).into_owned())
    }

    /// Puts a rule first in pg_hba.conf (the first matching rule decides): `user` connecting
    /// over TCP must give its password; everyone else stays trusted.
    fn require_password_of(&self, user: &str) -> Result<()> {
        let hba = self.data.join("pg_hba.conf");
        let rules = std::fs::read_to_string(&hba).map_err(io_err("reading pg_hba.conf"))?;
        let rules = format!("host all {user} 127.0.0.1/32 scram-sha-256\n{rules}");
        std::fs::write(&hba, rules).map_err(io_err("writing pg_hba.conf"))
    }

    /// Stops the server; it can be started again with [`Postgres::restart`]. `fast` shutdown:
    /// clients are disconnected, as when an operator stops the service.
    pub fn stop(&self) -> Result<()> {
        let mut stop = self.command("pg_ctl");
        stop.arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"]);
        run_output(&mut stop).map(drop)
    }

    /// Starts a stopped server again on the same port.
    pub fn restart(&self) -> Result<()> {
        self.pg_ctl_start()
    }

    fn pg_ctl_start(&self) -> Result<()> {
        let options = format!(
            "-k {} -p {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.dir.path().display(),
            self.port
        );
        let mut start = self.command("pg_ctl");
        start
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.log())
            .args(["-o", &options, "-t", "60", "-w", "start"]);
        run_output(&mut start).map(drop)
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// Whether the last start failed because the port was taken.
    fn lost_port(&self) -> bool {
        std::fs::read_to_string(self.log()).is_ok_and(|log| {
            log.contains("could not bind") || log.contains("Address already in use")
        })
    }

    /// A PostgreSQL program, run as the server's owner, from a directory that owner can read.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.current_dir(self.dir.path())
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // `immediate`: the data is thrown away with the directory, so there is nothing to flush.
        // Failing means it is not running (never started, or stopped by the test).
        let mut stop = self.command("pg_ctl");
        stop.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = stop.status();
    }
}

/// The newest installed PostgreSQL's programs: `TETHER_PG_BIN` if set, else the highest version
/// under /usr/lib/postgresql (where Debian puts them, off PATH).
fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TETHER_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("pg_ctl").exists().then_some((version, bin))
        })
        .max();
    newest.map(|(_, bin)| bin).ok_or_else(|| {
        Error::Other(format!(
            "PostgreSQL is not installed (no {}/*/bin/pg_ctl): run scripts/setup, which installs \
             the Debian package `postgresql`, or set TETHER_PG_BIN",
            root.display()
        ))
    })
}

/// PostgreSQL refuses to run as root, so tests running as root run it as the `postgres` user
/// the Debian package creates; anyone else runs it as themselves.
fn server_owner() -> Result<Option<(u32, u32)>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(io_err("reading /etc/passwd"))?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            match fields.as_slice() {
                ["postgres", _, uid, gid, ..] => Some((uid.parse().ok()?, gid.parse().ok()?)),
                _ => None,
            }
        })
        .map(Some)
        .ok_or_else(|| {
            Error::Other(
                "running as root and there is no `postgres` user to run PostgreSQL as \
                 (the Debian package `postgresql` creates it; run scripts/setup)"
                    .into(),
            )
        })
}

/// `text` as an SQL string literal.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}
