//! A throwaway `redis-server` for integration tests: loopback, a free port, its own
//! temporary directory, no persistence. A watchdog shell stops it when the test process
//! ends, however it ends, so no server outlives its tests. Included by path from each
//! broker crate's `tests/support/mod.rs`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A running `redis-server` (stopped on drop).
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    watchdog: Option<Child>,
}

/// One server for the whole test binary; tests keep apart by key prefix.
pub fn shared() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start)
}

/// A key prefix no other test uses.
pub fn unique_prefix(name: &str) -> String {
    format!("{name}-{}", uuid_like())
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[path = "ports.rs"]
mod ports;
use ports::free_port;

impl RedisServer {
    /// Starts a server on a free loopback port; panics with a clear message when
    /// `redis-server` is not installed.
    pub fn start() -> RedisServer {
        let installed = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            installed,
            "these tests need `redis-server` on PATH: install it (Debian: apt-get install \
             redis-server; .ci/run does this when it is missing)"
        );
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("esper-redis-{}", uuid_like()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = RedisServer {
            port,
            dir,
            watchdog: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        // The shell runs the server and stops it (and removes its directory) when the
        // test process is gone or when the shell itself gets SIGTERM.
        let script = r#"redis-server --port "$1" --bind 127.0.0.1 --save "" --appendonly no \
              --dir "$2" --logfile "$2/redis.log" &
            r=$!
            trap 'kill $r 2>/dev/null; wait $r 2>/dev/null; exit 0' TERM INT
            while kill -0 "$3" 2>/dev/null && kill -0 $r 2>/dev/null; do sleep 0.2; done
            kill $r 2>/dev/null; wait $r 2>/dev/null; rm -rf "$2""#;
        let child = Command::new("sh")
            .args(["-c", script, "sh"])
            .arg(self.port.to_string())
            .arg(&self.dir)
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start redis-server");
        self.watchdog = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.answers() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "redis-server on port {} did not start within 10s",
            self.port
        );
    }

    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGTERM to the watchdog, which stops Redis) and waits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.watchdog.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.answers() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `CONFIG SET name value` (through `redis-cli`, installed with the server).
    pub fn config_set(&self, name: &str, value: &str) {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "CONFIG", "SET", name, value])
            .output()
            .expect("run redis-cli");
        assert!(
            String::from_utf8_lossy(&out.stdout).trim() == "OK",
            "CONFIG SET {name} {value}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    /// Below what is in use, with writes refused rather than keys evicted (`on`), or
    /// without a limit again: a Redis out of memory that still answers `PING`.
    pub fn out_of_memory(&self, on: bool) {
        self.config_set("maxmemory-policy", "noeviction");
        self.config_set("maxmemory", if on { "1" } else { "0" });
        assert!(self.answers(), "a Redis out of memory still answers PING");
    }

    /// Starts the server again on the same port, empty (no persistence).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
