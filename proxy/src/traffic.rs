//! Runs Pingora for client traffic on a named std thread (Pingora builds its own
//! runtimes, so it must not run inside ours), stopped by our `Shutdown` rather than by
//! signals of its own.
//!
//! The listening socket is bound by us and handed to Pingora through its inherited-fd
//! table, so a bad address fails start-up with one clear line instead of Pingora's
//! retry-then-panic, and tests can bind port 0. At shutdown the listener stops accepting,
//! in-flight requests get up to the drain timeout, and only then are Pingora's runtimes
//! dropped: an idle proxy stops at once, a busy one stops when its last request ends.

use std::os::fd::IntoRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use esper_common::Shutdown;
use pingora::server::configuration::ServerConf;
use pingora::server::{
    Fds, ListenFds, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch,
};
use pingora::services::{ServiceReadyNotifier, ServiceWithDependents};
use tokio::sync::watch;

use crate::proxy::{EsperProxy, InFlight};

/// How often the drain checks for remaining requests.
const DRAIN_POLL: Duration = Duration::from_millis(10);

/// The Pingora proxy service, fed our listener and our stop signal instead of Pingora's.
struct Owned<S> {
    inner: S,
    fds: Option<ListenFds>,
    stop: watch::Receiver<bool>,
}

#[async_trait]
impl<S: ServiceWithDependents> ServiceWithDependents for Owned<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        _shutdown: ShutdownWatch,
        listeners_per_fd: usize,
        ready_notifier: ServiceReadyNotifier,
    ) {
        let fds = self.fds.take().or(fds);
        self.inner
            .start_service(fds, self.stop.clone(), listeners_per_fd, ready_notifier)
            .await
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
}

/// Tells Pingora to stop once our shutdown fired and in-flight requests have drained.
struct Drain {
    shutdown: Shutdown,
    stop: watch::Sender<bool>,
    in_flight: InFlight,
    timeout: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for Drain {
    async fn recv(&self) -> ShutdownSignal {
        self.shutdown.wait().await;
        // Stop accepting; idle keep-alive connections are closed by Pingora.
        let _ = self.stop.send(true);
        let deadline = Instant::now() + self.timeout;
        while self.in_flight.get() > 0 {
            if Instant::now() >= deadline {
                tracing::warn!(
                    in_flight = self.in_flight.get(),
                    timeout = ?self.timeout,
                    "requests still in flight after the drain timeout; closing them"
                );
                break;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
        // The drain is done: no grace period left to wait for.
        ShutdownSignal::FastShutdown
    }
}

/// Starts Pingora on `listener` with `threads` worker threads; the thread ends after
/// `shutdown` fires and the drain completes.
pub fn spawn(
    app: EsperProxy,
    listener: std::net::TcpListener,
    threads: usize,
    drain_timeout: Duration,
    in_flight: InFlight,
    shutdown: Shutdown,
) -> std::io::Result<JoinHandle<()>> {
    let addr = listener.local_addr()?.to_string();
    // Pingora's accept loop is asynchronous; the inherited socket must not block.
    listener.set_nonblocking(true)?;
    let mut fds = Fds::new();
    fds.add(addr.clone(), listener.into_raw_fd());
    let fds: ListenFds = Arc::new(parking_lot::Mutex::new(fds));

    std::thread::Builder::new()
        .name("esper-proxy".into())
        .spawn(move || {
            let conf = ServerConf {
                threads,
                grace_period_seconds: Some(0),
                graceful_shutdown_timeout_seconds: Some(0),
                ..ServerConf::default()
            };
            let mut server = Server::new_with_opt_and_conf(None, conf);
            let conf = server.configuration.clone();
            let mut service =
                pingora::proxy::http_proxy_service_with_name(&conf, app, "esper-proxy");
            service.add_tcp(&addr);
            let (stop_tx, stop_rx) = watch::channel(false);
            server.add_service(Owned {
                inner: service,
                fds: Some(fds),
                stop: stop_rx,
            });
            server.run(RunArgs {
                shutdown_signal: Box::new(Drain {
                    shutdown,
                    stop: stop_tx,
                    in_flight,
                    timeout: drain_timeout,
                }),
            });
            tracing::info!("traffic listener stopped");
        })
}
