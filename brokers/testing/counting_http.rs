//! A keep-alive HTTP/1.1 server speaking raw bytes that counts the connections a client
//! opens and closes: it shows what a connection pool keeps, reuses and drops. Included
//! by path from the tests that need it (`brokers/protocol`, `proxy`).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How the server answers.
#[derive(Clone, Copy, Debug, Default)]
pub struct Behaviour {
    /// Wait before each answer (so concurrent calls need connections of their own).
    pub delay: Duration,
    /// Close a connection this long after its last answer, as app servers close idle
    /// keep-alive connections; `None` keeps it until the client closes it.
    pub close_after: Option<Duration>,
    /// Close the connection of this many requests, read in full, without an answer: an
    /// instance that died with the request on the wire, or closed an idle connection as
    /// the request went out. They follow the first `hang_up_after` requests.
    pub hang_ups: usize,
    pub hang_up_after: usize,
    /// The answer's JSON body; `ok` as plain text when `None`.
    pub json: Option<&'static str>,
    /// The answer's status and any headers of its own, as written after `HTTP/1.1 `
    /// (`"503 Service Unavailable\r\nretry-after: 1"`); `200 OK` when `None`.
    pub status: Option<&'static str>,
    /// Write the head and the first byte of the body, then nothing more.
    pub stall_body: bool,
}

pub struct CountingServer {
    pub addr: SocketAddr,
    /// Connections accepted.
    pub opened: Arc<AtomicUsize>,
    /// Connections the client closed (end of stream read by the server).
    pub closed_by_client: Arc<AtomicUsize>,
    /// Requests read, answered or not.
    pub requests: Arc<AtomicUsize>,
}

impl CountingServer {
    /// Starts the server on a free loopback port; it answers `200 ok` to every request.
    pub async fn start(behaviour: Behaviour) -> CountingServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let opened = Arc::new(AtomicUsize::new(0));
        let closed_by_client = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (o, c, r) = (opened.clone(), closed_by_client.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                o.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(conn, behaviour, c.clone(), r.clone()));
            }
        });
        CountingServer {
            addr,
            opened,
            closed_by_client,
            requests,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn opened(&self) -> usize {
        self.opened.load(Ordering::SeqCst)
    }

    pub fn closed_by_client(&self) -> usize {
        self.closed_by_client.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn serve(
    mut conn: tokio::net::TcpStream,
    b: Behaviour,
    closed: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = match b.close_after {
            Some(after) => match tokio::time::timeout(after, conn.read(&mut chunk)).await {
                Ok(r) => r,
                Err(_) => return,
            },
            None => conn.read(&mut chunk).await,
        };
        match read {
            Ok(0) | Err(_) => {
                closed.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let length = content_length(&buf[..end]);
            if buf.len() < end + 4 + length {
                break;
            }
            buf.drain(..end + 4 + length);
            let n = requests.fetch_add(1, Ordering::SeqCst);
            if n >= b.hang_up_after && n - b.hang_up_after < b.hang_ups {
                return;
            }
            if !b.delay.is_zero() {
                tokio::time::sleep(b.delay).await;
            }
            let status = b.status.unwrap_or("200 OK");
            let answer = match b.json {
                Some(json) => format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{json}",
                    json.len()
                ),
                None => format!("HTTP/1.1 {status}\r\ncontent-length: 2\r\n\r\nok"),
            };
            if b.stall_body {
                let head = answer.find("\r\n\r\n").map_or(answer.len(), |i| i + 5);
                let _ = conn.write_all(&answer.as_bytes()[..head]).await;
                std::future::pending::<()>().await;
            }
            if conn.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

/// The `content-length` of a request head (0 without one).
fn content_length(head: &[u8]) -> usize {
    String::from_utf8_lossy(head)
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0)
}
