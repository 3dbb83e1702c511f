//! TLS termination: certificates chosen by SNI from PEM files, checked for changes on an
//! interval and swapped in without a pause (invalid new files leave the previous
//! certificate in service, with a warning saying why), the rustls acceptor with HTTP/2
//! by ALPN, and the facts of each TLS connection (version, JA4 fingerprint) for events.

use std::any::Any;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use esper_common::Shutdown;
use esper_protocol::TlsInfo;
use parking_lot::Mutex;
use pingora::listeners::TlsAccept;
use pingora::listeners::tls::{Acceptor, TlsSettings};
use pingora::protocols::ALPN;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert};

use crate::config::CertConfig;

tokio::task_local! {
    /// The JA4 fingerprint of the connection being handshaken, read by the handshake
    /// callback (which runs inside that connection's task).
    pub static CLIENT_HELLO_JA4: Option<String>;
}

/// What the proxy keeps of a TLS connection, attached to Pingora's TLS digest.
#[derive(Debug)]
pub struct TlsFacts {
    ja4: Option<String>,
}

impl TlsFacts {
    /// The event's TLS facts of a connection with digest `d`.
    pub fn event_info(d: &SslDigest) -> TlsInfo {
        let version = match d.version.as_ref() {
            "TLSv1_3" => "TLSv1.3".to_string(),
            "TLSv1_2" => "TLSv1.2".to_string(),
            other => other.to_string(),
        };
        TlsInfo {
            version,
            fingerprint: d.extension.get::<TlsFacts>().and_then(|f| f.ja4.clone()),
        }
    }
}

/// The JA4 fingerprint of a connection with digest `d`, when known.
pub fn ja4_of(d: &SslDigest) -> Option<&str> {
    d.extension.get::<TlsFacts>().and_then(|f| f.ja4.as_deref())
}

struct Callbacks;

#[async_trait]
impl TlsAccept for Callbacks {
    async fn handshake_complete_callback(
        &self,
        _ssl: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        let ja4 = CLIENT_HELLO_JA4.try_with(Clone::clone).ok().flatten();
        Some(Arc::new(TlsFacts { ja4 }))
    }
}

/// One configured certificate and what was last loaded from it.
struct Source {
    cfg: CertConfig,
    stamp: (Option<SystemTime>, Option<SystemTime>),
    key: Arc<CertifiedKey>,
}

/// Certificates by server name.
#[derive(Debug, Default)]
struct Table {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `.example.com` for `*.example.com`.
    wildcard: Vec<(String, Arc<CertifiedKey>)>,
    default: Option<Arc<CertifiedKey>>,
}

/// The certificates in service and their files.
pub struct Certs {
    sources: Mutex<Vec<Source>>,
    table: ArcSwap<Table>,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certs").finish_non_exhaustive()
    }
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn provider() -> Result<Arc<CryptoProvider>, String> {
    pingora::tls::install_default_crypto_provider();
    CryptoProvider::get_default()
        .cloned()
        .ok_or_else(|| "no TLS crypto provider".to_string())
}

/// Loads a certificate chain and its key, checking that they belong together.
fn load(cfg: &CertConfig) -> Result<Arc<CertifiedKey>, String> {
    let (cert, key) = (cfg.cert.display(), cfg.key.display());
    let loaded = pingora::tls::load_certs_and_key_files(&cert.to_string(), &key.to_string())
        .map_err(|e| format!("cannot read `{cert}` / `{key}`: {e}"))?;
    let Some((chain, private)) = loaded else {
        return Err(format!(
            "`{cert}` holds no PEM certificate or `{key}` no PEM private key"
        ));
    };
    CertifiedKey::from_der(chain, private, provider()?.as_ref())
        .map(Arc::new)
        .map_err(|e| format!("`{cert}` / `{key}`: {e}"))
}

impl Certs {
    /// Loads every certificate; any failure is an error naming the files.
    pub fn load(configs: &[CertConfig]) -> Result<Certs, String> {
        let mut sources = Vec::new();
        for cfg in configs {
            let stamp = (mtime(&cfg.cert), mtime(&cfg.key));
            sources.push(Source {
                key: load(cfg)?,
                cfg: cfg.clone(),
                stamp,
            });
        }
        let certs = Certs {
            table: ArcSwap::from_pointee(table(&sources)),
            sources: Mutex::new(sources),
        };
        Ok(certs)
    }

    /// Replaces the configured certificates (a configuration reload); nothing changes
    /// when one fails to load.
    pub fn replace(&self, configs: &[CertConfig]) -> Result<(), String> {
        let fresh = Certs::load(configs)?;
        let fresh = fresh.sources.into_inner();
        // Held while the table is stored, so a file poll cannot store a table built from
        // the sources this replaces after it.
        let mut sources = self.sources.lock();
        self.table.store(Arc::new(table(&fresh)));
        *sources = fresh;
        Ok(())
    }

    /// Reloads certificates whose files changed since they were last read. A change that
    /// does not load leaves the previous certificate in service. Returns how many were
    /// replaced.
    pub fn poll(&self) -> usize {
        let mut sources = self.sources.lock();
        let mut replaced = 0;
        for s in sources.iter_mut() {
            let stamp = (mtime(&s.cfg.cert), mtime(&s.cfg.key));
            if stamp == s.stamp {
                continue;
            }
            // Remember the stamp either way, so a bad file is reported once, and a fixed
            // one (a new stamp) is read again.
            s.stamp = stamp;
            match load(&s.cfg) {
                Ok(key) => {
                    tracing::info!(cert = %s.cfg.cert.display(), "certificate reloaded");
                    s.key = key;
                    replaced += 1;
                }
                Err(reason) => tracing::warn!(
                    cert = %s.cfg.cert.display(),
                    %reason,
                    "new certificate files are invalid; keeping the previous certificate"
                ),
            }
        }
        if replaced > 0 {
            self.table.store(Arc::new(table(&sources)));
        }
        replaced
    }

    /// The certificate for server name `sni` (or the default).
    fn resolve(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let t = self.table.load();
        let found = sni.and_then(|name| {
            let name = name.to_ascii_lowercase();
            t.exact.get(&name).cloned().or_else(|| {
                t.wildcard
                    .iter()
                    .find(|(suffix, _)| {
                        name.ends_with(suffix.as_str())
                            && name.len() > suffix.len()
                            && !name[..name.len() - suffix.len()].contains('.')
                    })
                    .map(|(_, k)| k.clone())
            })
        });
        found.or_else(|| t.default.clone())
    }
}

fn table(sources: &[Source]) -> Table {
    let mut t = Table::default();
    for s in sources {
        if s.cfg.hosts.is_empty() && t.default.is_none() {
            t.default = Some(s.key.clone());
        }
        for h in &s.cfg.hosts {
            let h = h.to_ascii_lowercase();
            match h.strip_prefix('*') {
                Some(suffix) => t.wildcard.push((suffix.to_string(), s.key.clone())),
                None => {
                    t.exact.entry(h).or_insert_with(|| s.key.clone());
                }
            }
        }
    }
    // Without a certificate for any name, the first one answers unknown names.
    if t.default.is_none() {
        t.default = sources.first().map(|s| s.key.clone());
    }
    t
}

#[derive(Debug)]
struct Resolver(Arc<Certs>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.resolve(hello.server_name())
    }
}

/// The TLS acceptor serving `certs`, offering HTTP/2 by ALPN when `h2`.
pub fn acceptor(certs: Arc<Certs>, h2: bool) -> Result<Acceptor, String> {
    provider()?;
    let mut settings =
        TlsSettings::with_callbacks(Box::new(Callbacks)).map_err(|e| e.to_string())?;
    settings.set_cert_resolver(Arc::new(Resolver(certs)));
    if h2 {
        settings.enable_h2();
    } else {
        settings.set_alpn(ALPN::H1);
    }
    Ok(settings.build())
}

/// Checks the certificate files every `interval` until shutdown.
pub async fn watch(certs: Arc<Certs>, interval: Duration, shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.wait() => return,
        }
        let certs = certs.clone();
        // File reads block; keep them off the runtime's workers.
        let _ = tokio::task::spawn_blocking(move || certs.poll()).await;
    }
}
