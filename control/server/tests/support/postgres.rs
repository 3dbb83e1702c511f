//! A throwaway PostgreSQL cluster for integration tests: `initdb` into a temporary
//! directory, `postgres` on a free loopback port with its socket in that directory, and
//! a watchdog shell that stops the server and removes the directory when the test
//! process ends. As root (PostgreSQL refuses to run as root) everything runs as the
//! `postgres` user that Debian's package creates. One cluster per test binary; each
//! test gets its own database.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A running cluster whose superuser `esper` connects without a password over TCP.
pub struct PgServer {
    port: u16,
    /// Lives as long as the test process; it stops the server once that is gone.
    _watchdog: std::process::Child,
}

/// The binary directory of the newest installed PostgreSQL.
fn bin_dir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop().unwrap_or_else(|| {
        panic!(
            "these tests need PostgreSQL's server binaries (/usr/lib/postgresql/*/bin/initdb): \
             install them (Debian: apt-get install postgresql; .ci/run does this when missing)"
        )
    })
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `program args...`, as the `postgres` user when we are root.
fn command(program: &Path, as_postgres: bool) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

#[path = "../../../../brokers/testing/ports.rs"]
mod ports;
use ports::free_port;

/// The cluster shared by every test of this binary.
pub fn shared() -> &'static PgServer {
    static SERVER: OnceLock<PgServer> = OnceLock::new();
    SERVER.get_or_init(PgServer::start)
}

impl PgServer {
    fn start() -> PgServer {
        let bin = bin_dir();
        let as_postgres = running_as_root();
        let dir = std::env::temp_dir().join(format!("esper-pg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        if as_postgres {
            let owned = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir)
                .status()
                .is_ok_and(|s| s.success());
            assert!(owned, "cannot hand {} to the postgres user", dir.display());
        }
        let data = dir.join("data");
        let out = command(&bin.join("initdb"), as_postgres)
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "esper",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("cannot run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        // The watchdog stops the server (fast shutdown) once this process is gone and
        // removes the cluster. `/proc/PID` rather than `kill -0`: as another user we
        // may not signal this process.
        let script = r#"bin="$1"; data="$2"; dir="$3"; port="$4"; parent="$5"
            "$bin/postgres" -D "$data" -p "$port" -k "$dir" -c listen_addresses=127.0.0.1 \
              -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
              -c max_connections=200 >"$dir/log" 2>&1 &
            p=$!
            while [ -d "/proc/$parent" ] && kill -0 $p 2>/dev/null; do sleep 0.2; done
            kill -INT $p 2>/dev/null; wait $p 2>/dev/null; rm -rf "$dir""#;
        let watchdog = command(Path::new("/bin/sh"), as_postgres)
            .args(["-c", script, "sh"])
            .arg(&bin)
            .arg(&data)
            .arg(&dir)
            .arg(port.to_string())
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start postgres");
        let server = PgServer {
            port,
            _watchdog: watchdog,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let ready = Command::new(bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "esper"])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return server;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
        panic!("postgres on port {port} did not start within 30s: {log}");
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://esper@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates an empty database with a fresh name; returns its URL.
    pub async fn fresh_database(&self) -> String {
        use sqlx::Connection;
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&self.url("postgres"))
            .await
            .unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        self.url(&name)
    }
}
