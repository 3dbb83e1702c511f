//! The baseline of the proxy benchmark: a Pingora pass-through with nothing of Esper in
//! it, configured as the proxy is (one upstream peer, keep-alive pool, the same thread
//! count). Two binaries run it: `bare-pingora` with the system allocator and
//! `bare-pingora-mimalloc` with the allocator the `esper` binary uses.
//!
//! Usage: `bare-pingora[-mimalloc] LISTEN UPSTREAM THREADS`.

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
        eprintln!("usage: bare-pingora LISTEN UPSTREAM [THREADS]");
        std::process::exit(2);
    };
    let threads = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(1);
    let Ok(addr) = upstream.parse::<std::net::SocketAddr>() else {
        eprintln!("UPSTREAM must be IP:PORT");
        std::process::exit(2);
    };
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut svc = http_proxy_service(
        &server.configuration,
        Pass {
            peer: HttpPeer::new(addr, false, String::new()),
        },
    );
    svc.add_tcp(listen);
    server.add_service(svc);
    server.run_forever();
}
