//! A TCP relay in front of a real service, whose reachability a test switches: passing
//! bytes through, refusing (each connection closed as soon as it is accepted), or
//! stalled (requests read and never answered, as from a host that hangs). Switching
//! cuts the connections in progress, so pooled keep-alive connections do not carry
//! requests past the switch.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass = 0,
    Refuse = 1,
    Stall = 2,
}

impl Mode {
    fn from_u8(v: u8) -> Mode {
        match v {
            0 => Mode::Pass,
            1 => Mode::Refuse,
            _ => Mode::Stall,
        }
    }
}

struct Shared {
    mode: AtomicU8,
    live: Mutex<Vec<AbortHandle>>,
    stalled_bytes: AtomicBool,
}

pub struct Relay {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: AbortHandle,
}

impl Relay {
    /// A relay on `127.0.0.1:0` in front of `target`, passing.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the relay");
        let addr = listener.local_addr().expect("relay address");
        let shared = Arc::new(Shared {
            mode: AtomicU8::new(Mode::Pass as u8),
            live: Mutex::new(Vec::new()),
            stalled_bytes: AtomicBool::new(false),
        });
        let accept = tokio::spawn(accept_loop(listener, target, shared.clone())).abort_handle();
        Relay {
            addr,
            shared,
            accept,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Switches to `mode`, cutting every connection in progress.
    pub fn set(&self, mode: Mode) {
        self.shared.mode.store(mode as u8, Ordering::SeqCst);
        let cut = std::mem::take(&mut *self.shared.live.lock().expect("relay lock"));
        for conn in cut {
            conn.abort();
        }
    }

    /// Whether a stalled connection has received bytes: a request is stuck in it.
    pub fn stalled_request_seen(&self) -> bool {
        self.shared.stalled_bytes.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.set(Mode::Refuse);
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        let mode = Mode::from_u8(shared.mode.load(Ordering::SeqCst));
        if mode == Mode::Refuse {
            drop(inbound);
            continue;
        }
        let conn = shared.clone();
        let task = tokio::spawn(async move {
            if mode == Mode::Stall {
                let mut buf = [0u8; 4096];
                while let Ok(n) = inbound.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    conn.stalled_bytes.store(true, Ordering::SeqCst);
                }
                return;
            }
            if let Ok(mut outbound) = TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
        let mut live = shared.live.lock().expect("relay lock");
        live.retain(|t| !t.is_finished());
        live.push(task.abort_handle());
        // A switch between the accept and the push above missed this connection.
        if Mode::from_u8(shared.mode.load(Ordering::SeqCst)) != mode {
            task.abort();
        }
    }
}
