//! Test support (feature `testing`): a throw-away PostgreSQL server on 127.0.0.1.
//!
//! [`Postgres::start`] runs Debian's PostgreSQL binaries (`/usr/lib/postgresql/*/bin`, or
//! `$PG_BIN`): `initdb` (trust auth, no fsync) in a temp dir, then `pg_ctl start` on a free port
//! with its socket in that dir. As root it runs them as the `postgres` user through `runuser`
//! (PostgreSQL refuses to run as root), after handing the dir to that user. Dropping it stops
//! the server (`pg_ctl stop -m immediate`) and removes the dir. A missing binary panics with how
//! to install it: tests must fail, not skip.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Finds the PostgreSQL binaries: `$PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`.
pub fn pg_bin_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("PG_BIN") {
        return Some(PathBuf::from(d));
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").is_file())
        .collect();
    dirs.sort();
    dirs.pop()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A running PostgreSQL.
#[derive(Debug)]
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    running: bool,
}

impl Postgres {
    /// Starts a fresh server. Panics (with the install command) when PostgreSQL is missing.
    pub fn start() -> Self {
        let bin = pg_bin_dir().unwrap_or_else(|| {
            panic!(
                "PostgreSQL is needed for these tests and was not found (PG_BIN, \
                 /usr/lib/postgresql/*/bin): install it with `apt-get install postgresql`"
            )
        });
        // In /tmp rather than $TMPDIR: the `postgres` user must reach the directory, and a
        // TMPDIR under a private (0700) home would stop it.
        let dir = tempfile::Builder::new()
            .prefix("pg-test-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let as_postgres = is_root();
        if as_postgres {
            let st = Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(st.success(), "chown of the PostgreSQL test dir failed");
        }
        let mut pg = Self {
            dir,
            bin,
            as_postgres,
            port: free_port(),
            running: false,
        };
        let data = pg.data();
        pg.run_ok(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=100",
            pg.port,
            pg.dir.path().display()
        );
        let log = pg.dir.path().join("postgres.log");
        pg.run_ok(
            "pg_ctl",
            &[
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &opts,
            ],
        );
        pg.running = true;
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The work directory (data, socket, `postgres.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.arg("-u").arg("postgres").arg("--").arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run_ok(&self, tool: &str, args: &[&str]) {
        let out = self
            .command(tool)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
        );
    }

    /// DSN of database `db` as the superuser.
    pub fn dsn(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs `sql` in database `db` with `psql` and returns its unaligned output, trimmed.
    pub fn sql(&self, db: &str, sql: &str) -> String {
        let out = self
            .command("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", db, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run psql: {e}"));
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Creates database `name` and returns its DSN.
    pub fn create_database(&self, name: &str) -> String {
        assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        self.run_ok(
            "createdb",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                name,
            ],
        );
        self.dsn(name)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let data = self.data();
            let _ = self
                .command("pg_ctl")
                .args(["stop", "-m", "immediate", "-D"])
                .arg(&data)
                .output();
        }
    }
}
