//! The baseline of the proxy benchmark: a Pingora pass-through with nothing of Esper in
//! it, configured as the proxy is (one upstream peer, keep-alive pool, the same thread
//! count). Two binaries run it: `bare-pingora` with the system allocator and
//! `bare-pingora-mimalloc` with the allocator the `esper` binary uses.
//!
//! Usage: `bare-pingora[-mimalloc] LISTEN UPSTREAM THREADS [IDLE_SECS]`. IDLE_SECS gives
//! pooled upstream connections an idle timeout, as esper-proxy's `upstream_idle_timeout`
//! does (by default they have none): the cost of Pingora's pool timer, measured alone.

use async_trait::async_trait;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session, http_proxy_service};
use pingora::server::Server;
use pingora::server::configuration::ServerConf;

struct Pass {
    peer: HttpPeer,
}

#[async_trait]
impl ProxyHttp for Pass {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(self.peer.clone()))
    }
}

/// Parses the arguments and runs the pass-through until killed.
pub fn bare_pingora() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(upstream)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: bare-pingora LISTEN UPSTREAM [THREADS] [IDLE_SECS]");
        std::process::exit(2);
    };
    let threads = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(1);
    let Ok(addr) = upstream.parse::<std::net::SocketAddr>() else {
        eprintln!("UPSTREAM must be IP:PORT");
        std::process::exit(2);
    };
    let mut peer = HttpPeer::new(addr, false, String::new());
    if let Some(idle) = args.get(4) {
        let Ok(secs) = idle.parse() else {
            eprintln!("IDLE_SECS must be a number of seconds");
            std::process::exit(2);
        };
        peer.options.idle_timeout = Some(std::time::Duration::from_secs(secs));
    }
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut svc = http_proxy_service(&server.configuration, Pass { peer });
    svc.add_tcp(listen);
    server.add_service(svc);
    server.run_forever();
}
