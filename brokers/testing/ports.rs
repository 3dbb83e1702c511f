//! Free TCP ports for the servers tests start as child processes (Redis, PostgreSQL,
//! `esper` itself), chosen below the kernel's ephemeral range (32768 and up on Linux). A
//! port found by binding port 0 comes from that range, where outgoing connections take
//! their local ports too: in the time a child process takes to start and bind the port,
//! one of the tests' own connections may have taken it, and the child fails with
//! "address in use".

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

const FIRST: u32 = 10_000;
const SPAN: u32 = 22_000;

/// A port on 127.0.0.1 nothing is bound to now. Each process walks the range from its
/// own starting point, so test processes running side by side rarely try the same one.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static START: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        std::process::id().wrapping_mul(2_654_435_761) ^ nanos
    });
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + start.wrapping_add(n) % SPAN;
        let port = u16::try_from(port).expect("a port below 32000");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {FIRST} and {}", FIRST + SPAN - 1);
}

/// A loopback address that refuses connections for the rest of the test run. The port
/// stays bound without listening: a port merely bound and closed again can be handed
/// to another test's listener running in parallel, which would then answer.
#[allow(dead_code)] // not every suite that loads this file needs it
pub fn refusing_addr() -> std::net::SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    socket.bind(loopback).expect("a loopback port");
    let addr = socket.local_addr().expect("the bound address");
    // Held until the test process exits, which is what keeps the port refusing.
    std::mem::forget(socket);
    addr
}
