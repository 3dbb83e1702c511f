//! The proxy's configuration: the TOML shape with its defaults, the environment names
//! (`ESPER_*` plus the seed's `BATCH_TIMEOUT_MS`), the command-line flags, and the one
//! validation pass that runs before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use esper_common::config::{
    ConfigError, Vars, check_token, parse_duration_ms, parse_duration_secs,
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The header a trusted proxy in front names the client in (`real_ip_header`): the one
/// it sets. Only that one is read, since a proxy passes the other on as the client wrote
/// it, and reading that would let a client choose its own address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RealIpHeader {
    /// `X-Forwarded-For`, what load balancers set (the default).
    #[default]
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    /// `Forwarded: for=...` (RFC 7239).
    #[serde(rename = "forwarded")]
    Forwarded,
}

impl std::str::FromStr for RealIpHeader {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Ok(RealIpHeader::XForwardedFor),
            "forwarded" => Ok(RealIpHeader::Forwarded),
            _ => Err("expected x-forwarded-for or forwarded".to_string()),
        }
    }
}

/// Which requests get an access-log line (`access_log`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    /// None (the default): the engine's events, the metrics and the decision log say
    /// what was done, and a busy proxy writes nothing per request.
    #[default]
    Off,
    /// Requests a mitigation acted on: blocked, challenged, throttled, tarpitted, or
    /// matched by a log-only mitigation.
    Mitigated,
    /// Every request.
    All,
}

impl AccessLog {
    /// Does a request the proxy answered with `action` get a line?
    pub fn logs(self, action: esper_protocol::EnforcedAction) -> bool {
        match self {
            AccessLog::Off => false,
            AccessLog::Mitigated => action != esper_protocol::EnforcedAction::Allow,
            AccessLog::All => true,
        }
    }
}

impl std::str::FromStr for AccessLog {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" => Ok(AccessLog::Off),
            "mitigated" => Ok(AccessLog::Mitigated),
            "all" => Ok(AccessLog::All),
            _ => Err("expected off, mitigated or all".to_string()),
        }
    }
}

/// Default most mitigations a proxy's cache holds (about 300 bytes each).
pub const DEFAULT_CACHE_MAX_ENTRIES: usize = 2_000_000;

/// Default client-traffic listener.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8000";
/// Default ops listener (health and metrics).
pub const DEFAULT_OPS_LISTEN: &str = "0.0.0.0:9095";
/// Longest app name.
use esper_protocol::mitigation::MAX_APP_NAME_LEN;
/// Default app name reported in events and matched against app-scoped mitigations.
pub const DEFAULT_APP: &str = "default";
/// Default ingestion broker.
pub const DEFAULT_INGESTION_URL: &str = "http://127.0.0.1:8082";
/// Default mitigation broker.
pub const DEFAULT_MITIGATION_URL: &str = "http://127.0.0.1:8083";
/// Default fraction of requests reported.
pub const DEFAULT_SAMPLE_RATE: f64 = 1.0;
/// Default events per ingestion batch.
pub const DEFAULT_BATCH_SIZE: usize = 500;
/// Default longest wait before a partial batch is sent (the seed's `BATCH_TIMEOUT_MS`).
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Default capacity of the queue between request handling and the forwarder.
pub const DEFAULT_BUFFER: usize = 10_000;
/// Headers the proxy can add to the requests it forwards (`forward_headers`), all of
/// them by default.
pub const FORWARD_HEADERS: [&str; 4] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-real-ip",
    "x-request-id",
];
/// Default headers copied into events: cheap, telling signals about clients and bots.
pub const DEFAULT_REPORT_HEADERS: [&str; 4] =
    ["referer", "accept", "accept-language", "accept-encoding"];
/// Default upper bound on a tarpit delay, whatever the mitigation asks for.
pub const DEFAULT_TARPIT_MAX: Duration = Duration::from_secs(10);
/// Default number of requests held in tarpits at once; beyond it they get a 429.
pub const DEFAULT_TARPIT_CONCURRENCY: usize = 1_000;
/// Default bound on throttle token buckets kept in memory.
pub const DEFAULT_THROTTLE_ENTITIES: usize = 100_000;
/// Default long-poll wait on the mitigation broker's delta stream.
pub const DEFAULT_STREAM_WAIT: Duration = Duration::from_secs(25);
/// Default interval between heartbeats to the control plane.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// Default time in-flight requests get to finish at shutdown.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default timeout for connecting to the upstream.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default longest wait for the upstream between two reads of its answer (nginx's
/// `proxy_read_timeout`), and for it to take what is written to it (`proxy_send_timeout`).
pub const DEFAULT_UPSTREAM_READ_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_UPSTREAM_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time an idle upstream connection stays in the keep-alive pool.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default interval between resolutions of upstream host names.
pub const DEFAULT_UPSTREAM_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);

/// Default lifetime of a clearance cookie earned by solving a challenge.
pub const DEFAULT_CHALLENGE_TTL: Duration = Duration::from_secs(3600);
/// Default wait of the no-JavaScript challenge before its link clears the client.
pub const DEFAULT_CHALLENGE_FALLBACK_DELAY: Duration = Duration::from_secs(5);
/// Shortest `challenge_secret` accepted, in bytes.
pub const MIN_CHALLENGE_SECRET_LEN: usize = 16;

/// Default TLS listener, used when certificates are configured.
pub const DEFAULT_TLS_LISTEN: &str = "0.0.0.0:8443";
/// Default interval between checks of the certificate files for changes.
pub const DEFAULT_TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// Default answer for a request whose Host no app serves: 421 Misdirected Request.
pub const DEFAULT_UNKNOWN_HOST_STATUS: u16 = 421;
/// Default active health check of an app's upstreams.
pub const DEFAULT_HEALTH_CHECK: &str = "tcp";
/// Default interval between health checks of an app's upstreams.
pub const DEFAULT_HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// One protected app among several, chosen by Host and path prefix (`[[apps]]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppConfig {
    /// The app's name: reported in events, and app-scoped mitigations apply only when
    /// they name it.
    pub name: String,
    /// Host names served by this app: exact (`shop.example`) or a wildcard for
    /// subdomains (`*.shop.example`). Empty: any host.
    pub hosts: Vec<String>,
    /// Path prefix served by this app (`/api` serves `/api` and `/api/...`); the
    /// longest matching prefix wins among apps of the same host.
    pub path_prefix: String,
    /// The app's upstreams, `HOST:PORT` each, balanced round robin.
    pub upstreams: Vec<String>,
    /// Speak TLS to the upstreams, verifying their certificates against their host names.
    pub upstream_tls: bool,
    /// Active health check of the upstreams: `tcp` (connect), an HTTP path such as
    /// `/healthz` (GET must answer 200), or `none`.
    pub health_check: String,
    /// Interval between health checks.
    #[serde(with = "humantime_serde")]
    pub health_check_interval: Duration,
    /// Fraction of this app's requests reported; unset means the top-level `sample_rate`.
    pub sample_rate: Option<f64>,
    /// This app's answer templates; unset means the top-level `templates_dir`.
    pub templates_dir: Option<PathBuf>,
}

impl Default for AppConfig {
    fn default() -> Self {
        AppConfig {
            name: String::new(),
            hosts: Vec::new(),
            path_prefix: "/".into(),
            upstreams: Vec::new(),
            upstream_tls: false,
            health_check: DEFAULT_HEALTH_CHECK.into(),
            health_check_interval: DEFAULT_HEALTH_CHECK_INTERVAL,
            sample_rate: None,
            templates_dir: None,
        }
    }
}

/// A certificate and its key, PEM files, for the TLS listener (`[[tls_certificates]]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CertConfig {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Server names (SNI) it serves: exact or `*.domain`. Empty: the default
    /// certificate, for clients without SNI or with a name no other certificate has.
    pub hosts: Vec<String>,
}

fn default_addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// The proxy's configuration. Precedence: flags > environment > file > defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address client traffic is accepted on (`ESPER_PROXY_LISTEN`, `--listen`).
    pub listen: SocketAddr,
    /// Address of the ops server: `/healthz`, `/readyz`, `/healthz/detailed`, `/metrics`
    /// (`ESPER_PROXY_OPS_LISTEN`, `--ops-listen`).
    pub ops_listen: SocketAddr,
    /// The protected app, `HOST:PORT` (`ESPER_UPSTREAM`, `--upstream`). Required. A host
    /// name is resolved once at start-up.
    pub upstream: String,
    /// Speak TLS to the upstream, verifying its certificate against the host name
    /// (`ESPER_UPSTREAM_TLS`, `--upstream-tls`).
    pub upstream_tls: bool,
    /// Timeout for connecting to the upstream (`ESPER_UPSTREAM_CONNECT_TIMEOUT`).
    #[serde(with = "humantime_serde")]
    pub upstream_connect_timeout: Duration,
    /// Longest wait for the next bytes of the upstream's answer, its header or a chunk of
    /// its body; past it the client gets a 504 (or, mid-body, the connection is closed)
    /// and the upstream connection is dropped. 0: no limit, for apps that hold a
    /// response open without sending (server-sent events without keep-alive comments)
    /// (`ESPER_UPSTREAM_READ_TIMEOUT`).
    #[serde(with = "humantime_serde")]
    pub upstream_read_timeout: Duration,
    /// Longest wait for the upstream to take the request's next bytes; 0: no limit
    /// (`ESPER_UPSTREAM_WRITE_TIMEOUT`).
    #[serde(with = "humantime_serde")]
    pub upstream_write_timeout: Duration,
    /// Longest time an upstream connection sits idle and is still reused
    /// (`ESPER_UPSTREAM_IDLE_TIMEOUT`). Shorter than the upstream's own keep-alive
    /// timeout, it keeps requests off connections the upstream is closing (a request
    /// that is not safe to retry, such as a POST, would get a 502), and off connections
    /// that a NAT or firewall forgot silently. The pool is split into windows of this
    /// length, each reused only within its window (see `apps::ReuseWindows`). 0: one
    /// window for ever, so a connection stays pooled until the upstream closes it or
    /// the pool evicts it, which suits upstreams on the same host.
    #[serde(with = "humantime_serde")]
    pub upstream_idle_timeout: Duration,
    /// How often upstream host names are resolved again (each name is a backend per
    /// address); when one resolves to other addresses, its app is rebuilt with them, as
    /// a reload does, without dropping connections (the other apps are kept). Load balancers' names (a cloud
    /// balancer, a DNS-discovered service) change address over time. 0: resolved only
    /// at start and on reloads (`ESPER_UPSTREAM_RESOLVE_INTERVAL`).
    #[serde(with = "humantime_serde")]
    pub upstream_resolve_interval: Duration,
    /// Name of the protected app: reported in events, and app-scoped mitigations apply
    /// only when they name it (`ESPER_APP`, `--app`).
    pub app: String,
    /// This proxy's id in events and heartbeats; empty means the host name
    /// (`ESPER_PROXY_ID`, `--proxy-id`).
    pub proxy_id: String,
    /// Fraction of requests reported to the ingestion broker, 0 to 1; each event carries
    /// `weight = 1 / sample_rate` (`ESPER_SAMPLE_RATE`, `--sample-rate`).
    pub sample_rate: f64,
    /// Ingestion broker base URL (`ESPER_INGESTION_URL`, `--ingestion-url`).
    pub ingestion_url: String,
    /// Mitigation broker base URL, or several instances over one Redis, comma-separated:
    /// the proxy follows one and moves to the next when it fails, keeping its cursor
    /// (`ESPER_MITIGATION_URL`, `--mitigation-url`).
    pub mitigation_url: String,
    /// Control-plane base URL for heartbeats; none means no heartbeats
    /// (`ESPER_CONTROL_URL`, `--control-url`).
    pub control_url: Option<String>,
    /// With a control URL, follow the proxy configuration the control plane holds
    /// (`PUT /api/v1/proxies/config`), laid over this one and applied without dropping
    /// connections, and report the headers and cookies its enabled policies read besides
    /// `report_headers` and `report_cookies` (`ESPER_PROXY_FOLLOW_CONFIG`).
    pub follow_control_config: bool,
    /// Bearer token for both brokers, when they require one (`ESPER_BROKER_TOKEN`).
    pub broker_token: Option<String>,
    /// Bearer token for the control plane (`ESPER_TOKEN`).
    pub control_token: Option<String>,
    /// Events per ingestion batch (`ESPER_PROXY_BATCH_SIZE`, `--batch-size`).
    pub batch_size: usize,
    /// Longest wait before a partial batch is sent (`ESPER_FLUSH_INTERVAL`,
    /// `BATCH_TIMEOUT_MS` in milliseconds, `--flush-interval`).
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Events waiting to be sent, at most; beyond it new events are dropped and counted
    /// (`ESPER_PROXY_BUFFER`, `--buffer`).
    pub buffer: usize,
    /// A file every forwarded event is also appended to, one JSON object a line, the
    /// format `esperctl policies test --events FILE` replays; none records nothing
    /// (`ESPER_PROXY_RECORD_EVENTS`, `--record-events`).
    pub record_events: Option<std::path::PathBuf>,
    /// Request headers copied into events, by name (`ESPER_REPORT_HEADERS`, comma
    /// separated; `--report-header`, repeatable). Those the control plane's policies
    /// read are reported as well (see `follow_control_config`).
    pub report_headers: Vec<String>,
    /// Cookies copied into events, by name; values leave the proxy only as a SHA-256 hex
    /// prefix (`ESPER_REPORT_COOKIES`, comma separated; `--report-cookie`, repeatable).
    pub report_cookies: Vec<String>,
    /// Worker threads for client traffic; 0 means one per core. On a host shared with
    /// other busy processes (a load generator, the upstream), fewer threads than cores
    /// serve more requests per second (`ESPER_PROXY_THREADS`, `--threads`).
    pub threads: usize,
    /// Upper bound on a tarpit delay, whatever the mitigation asks for
    /// (`ESPER_TARPIT_MAX`, `--tarpit-max`).
    #[serde(with = "humantime_serde")]
    pub tarpit_max: Duration,
    /// Requests held in tarpits at once, at most; beyond it they get a 429
    /// (`ESPER_TARPIT_CONCURRENCY`, `--tarpit-concurrency`).
    pub tarpit_concurrency: usize,
    /// Throttle token buckets kept in memory, at most (`ESPER_THROTTLE_ENTITIES`).
    pub throttle_entities: usize,
    /// Most mitigations the cache holds; past it a new one takes the place of a less
    /// severe one (`esper_proxy_cache_evicted_total`) or, with none held, is refused
    /// (`esper_proxy_cache_refused_total`), with a warning, while those held are still
    /// updated and removed, so a runaway policy cannot take the proxy's memory
    /// (`ESPER_CACHE_MAX_ENTRIES`).
    pub cache_max_entries: usize,
    /// Long-poll wait on the mitigation broker's delta stream (`ESPER_STREAM_WAIT`,
    /// `--stream-wait`).
    #[serde(with = "humantime_serde")]
    pub stream_wait: Duration,
    /// Interval between heartbeats to the control plane (`ESPER_HEARTBEAT_INTERVAL`).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Time in-flight requests get to finish at shutdown (`ESPER_PROXY_DRAIN_TIMEOUT`,
    /// `--drain-timeout`).
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Networks of proxies and load balancers in front whose `real_ip_header` is
    /// believed: the client is the rightmost address in it that is not one of them. Empty: the connection's address is the client
    /// (`ESPER_TRUSTED_PROXIES`, comma separated; `--trusted-proxy`, repeatable).
    #[serde(with = "nets")]
    pub trusted_proxies: Vec<IpNet>,
    /// Which header the trusted proxies name the client in: `x-forwarded-for` (default)
    /// or `forwarded`; the other is not read (`ESPER_REAL_IP_HEADER`, `--real-ip-header`).
    pub real_ip_header: RealIpHeader,
    /// Headers added to what is forwarded: `x-forwarded-for` (the client chain, kept
    /// only from trusted hops), `x-forwarded-proto` (the client's scheme: as the
    /// trusted hops tell it in the `real_ip_header` they speak, so a balancer that
    /// terminated TLS is heard; else this hop's), `x-real-ip` (the client),
    /// `x-request-id` (to the upstream request when the client sent no usable one, and
    /// to the response). All four by default. An address header left out is not added,
    /// and a client's own copy from an untrusted peer is still removed, so the app never
    /// reads an address a client made up; with `x-request-id` left out, a client's usable
    /// id still passes on and an unusable one is removed. Each costs every request a
    /// header insertion
    /// (`ESPER_FORWARD_HEADERS`, comma separated, `none` for none).
    pub forward_headers: Vec<String>,
    /// An access-log line, at INFO with target `esper_proxy::access` in the service's
    /// log (so `LOG_FORMAT=json` makes it JSON), for `mitigated` requests (any action
    /// but allow) or `all`; `off` by default (`ESPER_ACCESS_LOG`, `--access-log`).
    pub access_log: AccessLog,
    /// Keep the letter case of every header name as the client and the upstream wrote
    /// it. Off by default: the requests and answers the proxy adds headers to are sent
    /// with lowercase names, except a dozen common ones written in their usual case
    /// (`Host`, `Content-Type`, `Content-Length`, ...), as HAProxy and Envoy do. Names
    /// are case-insensitive in HTTP (and lowercase in HTTP/2); keeping the case costs
    /// every request a second header map to copy and update. Turn it on for an app that
    /// wrongly depends on it (`ESPER_PRESERVE_HEADER_CASE`).
    pub preserve_header_case: bool,
    /// Every connection on `listen` starts with a PROXY protocol header (v1 or v2) from a
    /// load balancer, which names the client. Connections without one are closed; with
    /// `trusted_proxies` set, so are headers from peers outside it
    /// (`ESPER_PROXY_PROTOCOL`, `--proxy-protocol`).
    pub proxy_protocol: bool,
    /// Client networks that bypass every mitigation (`ESPER_ALLOW_IPS`, comma separated).
    #[serde(with = "nets")]
    pub allow_ips: Vec<IpNet>,
    /// Paths that bypass every mitigation: exact, or a prefix with a trailing `*`, such
    /// as `/healthz` or `/.well-known/*` (`ESPER_ALLOW_PATHS`, comma separated).
    pub allow_paths: Vec<String>,
    /// Directory of answer templates overriding the built-ins: `block`, `throttle`,
    /// `busy`, `challenge`, each `.html` and/or `.json` (`ESPER_TEMPLATES_DIR`).
    pub templates_dir: Option<PathBuf>,
    /// Key signing challenge tokens and clearance cookies (HMAC-SHA256), at least 16
    /// bytes; share it between instances so a cookie from one is honoured by all. When
    /// unset, the control plane's key for the whole deployment (with `control_url`),
    /// else a random one per process. Reloadable: cookies signed with the key before
    /// are still honoured (`ESPER_CHALLENGE_SECRET`).
    pub challenge_secret: Option<String>,
    /// Lifetime of a clearance cookie (`ESPER_CHALLENGE_TTL`).
    #[serde(with = "humantime_serde")]
    pub challenge_ttl: Duration,
    /// How long a client without JavaScript waits on the challenge page before its
    /// link clears it, up to difficulty 16; each bit above doubles it, up to an hour
    /// (`ESPER_CHALLENGE_FALLBACK_DELAY`).
    #[serde(with = "humantime_serde")]
    pub challenge_fallback_delay: Duration,
    /// Several apps by Host and path prefix, each with its upstreams. Empty: sidecar
    /// mode, one app (`app`) for every request, sent to `upstream`.
    pub apps: Vec<AppConfig>,
    /// The app (by name) serving requests whose Host no app claims; unset means such
    /// requests get `unknown_host_status` (`ESPER_DEFAULT_APP`).
    pub default_app: Option<String>,
    /// Status answered when no app serves the request's Host: 421 or 404
    /// (`ESPER_UNKNOWN_HOST_STATUS`).
    pub unknown_host_status: u16,
    /// Address of the TLS listener, opened when `tls_certificates` is not empty
    /// (`ESPER_PROXY_TLS_LISTEN`, `--tls-listen`).
    pub tls_listen: SocketAddr,
    /// Certificates, chosen by SNI (`ESPER_PROXY_TLS_CERT` and `ESPER_PROXY_TLS_KEY` add one default
    /// certificate; `--tls-cert`, `--tls-key`).
    pub tls_certificates: Vec<CertConfig>,
    /// Interval between checks of the certificate files; changed files are loaded, and
    /// invalid new files leave the previous certificate in service
    /// (`ESPER_TLS_RELOAD_INTERVAL`).
    #[serde(with = "humantime_serde")]
    pub tls_reload_interval: Duration,
    /// Offer HTTP/2 to TLS clients (ALPN) (`ESPER_TLS_HTTP2`).
    pub tls_http2: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: default_addr(DEFAULT_LISTEN),
            ops_listen: default_addr(DEFAULT_OPS_LISTEN),
            upstream: String::new(),
            upstream_tls: false,
            upstream_connect_timeout: DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
            upstream_read_timeout: DEFAULT_UPSTREAM_READ_TIMEOUT,
            upstream_write_timeout: DEFAULT_UPSTREAM_WRITE_TIMEOUT,
            upstream_idle_timeout: DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            upstream_resolve_interval: DEFAULT_UPSTREAM_RESOLVE_INTERVAL,
            app: DEFAULT_APP.to_string(),
            proxy_id: String::new(),
            sample_rate: DEFAULT_SAMPLE_RATE,
            ingestion_url: DEFAULT_INGESTION_URL.to_string(),
            mitigation_url: DEFAULT_MITIGATION_URL.to_string(),
            control_url: None,
            follow_control_config: true,
            broker_token: None,
            control_token: None,
            batch_size: DEFAULT_BATCH_SIZE,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            buffer: DEFAULT_BUFFER,
            record_events: None,
            report_headers: DEFAULT_REPORT_HEADERS.map(String::from).to_vec(),
            report_cookies: Vec::new(),
            threads: 0,
            tarpit_max: DEFAULT_TARPIT_MAX,
            tarpit_concurrency: DEFAULT_TARPIT_CONCURRENCY,
            throttle_entities: DEFAULT_THROTTLE_ENTITIES,
            cache_max_entries: DEFAULT_CACHE_MAX_ENTRIES,
            stream_wait: DEFAULT_STREAM_WAIT,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            trusted_proxies: Vec::new(),
            real_ip_header: RealIpHeader::default(),
            forward_headers: FORWARD_HEADERS.map(String::from).to_vec(),
            access_log: AccessLog::Off,
            preserve_header_case: false,
            proxy_protocol: false,
            allow_ips: Vec::new(),
            allow_paths: Vec::new(),
            templates_dir: None,
            challenge_secret: None,
            challenge_ttl: DEFAULT_CHALLENGE_TTL,
            challenge_fallback_delay: DEFAULT_CHALLENGE_FALLBACK_DELAY,
            apps: Vec::new(),
            default_app: None,
            unknown_host_status: DEFAULT_UNKNOWN_HOST_STATUS,
            tls_listen: default_addr(DEFAULT_TLS_LISTEN),
            tls_certificates: Vec::new(),
            tls_reload_interval: DEFAULT_TLS_RELOAD_INTERVAL,
            tls_http2: true,
        }
    }
}

/// A comma-separated list of networks; a bare address is a /32 or /128.
fn net_list(name: &str, value: &str) -> Result<Vec<IpNet>, ConfigError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| parse_net(s).map_err(|reason| ConfigError::invalid(name, s, reason)))
        .collect()
}

/// A network (`10.0.0.0/8`) or one address (`192.0.2.1`), as client addresses are
/// matched (see [`esper_protocol::parse_net`]).
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    esper_protocol::parse_net(s)
        .ok_or_else(|| "expected an address or a CIDR network such as 10.0.0.0/8".to_string())
}

/// Networks in a file or a control-plane document, read as in the environment: a bare
/// address is a /32 or /128 (serde's own `IpNet` wants a prefix length).
mod nets {
    use ipnet::IpNet;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(nets: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
        nets.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| {
                super::parse_net(s.trim())
                    .map_err(|reason| serde::de::Error::custom(format!("`{s}`: {reason}")))
            })
            .collect()
    }
}

/// A comma-separated list, trimmed, empty items dropped, names lower-cased.
fn name_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

impl Config {
    /// Reads the environment names (see each field's doc).
    pub fn apply_env(&mut self, vars: &Vars<'_>) -> Result<(), ConfigError> {
        let ms = Duration::from_millis(1);
        let secs = Duration::from_secs(1);
        vars.parse(&["ESPER_PROXY_LISTEN"], &mut self.listen)?;
        vars.parse(&["ESPER_PROXY_OPS_LISTEN"], &mut self.ops_listen)?;
        vars.string(&["ESPER_UPSTREAM"], &mut self.upstream);
        vars.bool(&["ESPER_UPSTREAM_TLS"], &mut self.upstream_tls)?;
        vars.duration(
            &["ESPER_UPSTREAM_CONNECT_TIMEOUT"],
            secs,
            &mut self.upstream_connect_timeout,
        )?;
        vars.duration(
            &["ESPER_UPSTREAM_READ_TIMEOUT"],
            secs,
            &mut self.upstream_read_timeout,
        )?;
        vars.duration(
            &["ESPER_UPSTREAM_WRITE_TIMEOUT"],
            secs,
            &mut self.upstream_write_timeout,
        )?;
        vars.duration(
            &["ESPER_UPSTREAM_RESOLVE_INTERVAL"],
            secs,
            &mut self.upstream_resolve_interval,
        )?;
        vars.duration(
            &["ESPER_UPSTREAM_IDLE_TIMEOUT"],
            secs,
            &mut self.upstream_idle_timeout,
        )?;
        vars.string(&["ESPER_APP"], &mut self.app);
        vars.string(&["ESPER_PROXY_ID"], &mut self.proxy_id);
        vars.parse(&["ESPER_SAMPLE_RATE"], &mut self.sample_rate)?;
        vars.string(&["ESPER_INGESTION_URL"], &mut self.ingestion_url);
        vars.string(&["ESPER_MITIGATION_URL"], &mut self.mitigation_url);
        vars.string_opt(&["ESPER_CONTROL_URL"], &mut self.control_url);
        vars.bool(
            &["ESPER_PROXY_FOLLOW_CONFIG"],
            &mut self.follow_control_config,
        )?;
        vars.secret(
            &["ESPER_BROKER_TOKEN", "ADMIN_TOKEN"],
            &mut self.broker_token,
        )?;
        vars.secret(&["ESPER_TOKEN"], &mut self.control_token)?;
        vars.parse(&["ESPER_PROXY_BATCH_SIZE"], &mut self.batch_size)?;
        vars.duration(
            &["ESPER_FLUSH_INTERVAL", "BATCH_TIMEOUT_MS"],
            ms,
            &mut self.flush_interval,
        )?;
        vars.parse(&["ESPER_PROXY_BUFFER"], &mut self.buffer)?;
        if let Some((_, v)) = vars.lookup(&["ESPER_PROXY_RECORD_EVENTS"]) {
            self.record_events = (!v.is_empty()).then(|| v.into());
        }
        if let Some((_, v)) = vars.lookup(&["ESPER_REPORT_HEADERS"]) {
            self.report_headers = name_list(&v);
        }
        if let Some((_, v)) = vars.lookup(&["ESPER_REPORT_COOKIES"]) {
            self.report_cookies = name_list(&v);
        }
        vars.parse(&["ESPER_PROXY_THREADS"], &mut self.threads)?;
        vars.duration(&["ESPER_TARPIT_MAX"], secs, &mut self.tarpit_max)?;
        vars.parse(&["ESPER_TARPIT_CONCURRENCY"], &mut self.tarpit_concurrency)?;
        vars.parse(&["ESPER_THROTTLE_ENTITIES"], &mut self.throttle_entities)?;
        vars.parse(&["ESPER_CACHE_MAX_ENTRIES"], &mut self.cache_max_entries)?;
        vars.duration(&["ESPER_STREAM_WAIT"], secs, &mut self.stream_wait)?;
        vars.duration(
            &["ESPER_HEARTBEAT_INTERVAL"],
            secs,
            &mut self.heartbeat_interval,
        )?;
        vars.duration(
            &["ESPER_PROXY_DRAIN_TIMEOUT"],
            secs,
            &mut self.drain_timeout,
        )?;
        if let Some((name, v)) = vars.lookup(&["ESPER_TRUSTED_PROXIES"]) {
            self.trusted_proxies = net_list(&name, &v)?;
        }
        vars.parse(&["ESPER_REAL_IP_HEADER"], &mut self.real_ip_header)?;
        if let Some((_, v)) = vars.lookup(&["ESPER_FORWARD_HEADERS"]) {
            // An empty variable counts as unset, as everywhere else.
            self.forward_headers = if v.eq_ignore_ascii_case("none") {
                Vec::new()
            } else {
                name_list(&v)
            };
        }
        vars.parse(&["ESPER_ACCESS_LOG"], &mut self.access_log)?;
        vars.bool(
            &["ESPER_PRESERVE_HEADER_CASE"],
            &mut self.preserve_header_case,
        )?;
        vars.bool(&["ESPER_PROXY_PROTOCOL"], &mut self.proxy_protocol)?;
        if let Some((name, v)) = vars.lookup(&["ESPER_ALLOW_IPS"]) {
            self.allow_ips = net_list(&name, &v)?;
        }
        if let Some((_, v)) = vars.lookup(&["ESPER_ALLOW_PATHS"]) {
            self.allow_paths = v
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if let Some((_, v)) = vars.lookup(&["ESPER_TEMPLATES_DIR"]) {
            self.templates_dir = Some(PathBuf::from(v));
        }
        vars.secret(&["ESPER_CHALLENGE_SECRET"], &mut self.challenge_secret)?;
        vars.duration(&["ESPER_CHALLENGE_TTL"], secs, &mut self.challenge_ttl)?;
        vars.duration(
            &["ESPER_CHALLENGE_FALLBACK_DELAY"],
            secs,
            &mut self.challenge_fallback_delay,
        )?;
        vars.string_opt(&["ESPER_DEFAULT_APP"], &mut self.default_app);
        vars.parse(
            &["ESPER_UNKNOWN_HOST_STATUS"],
            &mut self.unknown_host_status,
        )?;
        vars.parse(&["ESPER_PROXY_TLS_LISTEN"], &mut self.tls_listen)?;
        let (mut cert, mut key) = (None, None);
        vars.string_opt(&["ESPER_PROXY_TLS_CERT"], &mut cert);
        vars.string_opt(&["ESPER_PROXY_TLS_KEY"], &mut key);
        self.add_default_cert(cert, key);
        vars.duration(
            &["ESPER_TLS_RELOAD_INTERVAL"],
            secs,
            &mut self.tls_reload_interval,
        )?;
        vars.bool(&["ESPER_TLS_HTTP2"], &mut self.tls_http2)?;
        Ok(())
    }

    /// Checks every option once; the error names the option and the bad value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_token("broker_token", self.broker_token.as_deref())?;
        check_token("control_token", self.control_token.as_deref())?;
        if self.apps.is_empty() {
            if self.upstream.trim().is_empty() {
                return Err(ConfigError::invalid(
                    "upstream",
                    "",
                    "required: the protected app as HOST:PORT (ESPER_UPSTREAM or --upstream), \
                     or [[apps]] tables",
                ));
            }
            split_host_port(&self.upstream)
                .map_err(|reason| ConfigError::invalid("upstream", &self.upstream, reason))?;
        } else if !self.upstream.trim().is_empty() {
            return Err(ConfigError::invalid(
                "upstream",
                &self.upstream,
                "not used with [[apps]]: give each app its `upstreams`",
            ));
        }
        self.validate_apps()?;
        self.validate_tls()?;
        if self.app.trim().is_empty() {
            return Err(ConfigError::invalid("app", &self.app, "must not be empty"));
        }
        if !(self.sample_rate > 0.0 && self.sample_rate <= 1.0) {
            return Err(ConfigError::invalid(
                "sample_rate",
                self.sample_rate,
                "must be greater than 0 and at most 1",
            ));
        }
        // May list several instances, comma-separated, as mitigation_url.
        for url in self.ingestion_url.split(',') {
            check_url("ingestion_url", url.trim())?;
        }
        if crate::follower::broker_urls(&self.mitigation_url)
            .next()
            .is_none()
        {
            check_url("mitigation_url", &self.mitigation_url)?;
        }
        for url in crate::follower::broker_urls(&self.mitigation_url) {
            check_url("mitigation_url", url)?;
        }
        // May list several instances over one store, comma-separated.
        if let Some(urls) = &self.control_url {
            for url in urls.split(',') {
                check_url("control_url", url.trim())?;
            }
        }
        positive("batch_size", self.batch_size)?;
        positive("buffer", self.buffer)?;
        positive("tarpit_concurrency", self.tarpit_concurrency)?;
        positive("cache_max_entries", self.cache_max_entries)?;
        positive("throttle_entities", self.throttle_entities)?;
        if self.batch_size > self.buffer {
            return Err(ConfigError::invalid(
                "batch_size",
                self.batch_size,
                format!("must not exceed buffer ({})", self.buffer),
            ));
        }
        // Timers are set as now + the duration; one past any sensible setting could
        // overflow the clock and stop the proxy mid-run.
        for (option, d) in [
            ("flush_interval", self.flush_interval),
            ("stream_wait", self.stream_wait),
            ("heartbeat_interval", self.heartbeat_interval),
            ("drain_timeout", self.drain_timeout),
            ("tarpit_max", self.tarpit_max),
            ("upstream_connect_timeout", self.upstream_connect_timeout),
            ("upstream_read_timeout", self.upstream_read_timeout),
            ("upstream_write_timeout", self.upstream_write_timeout),
            ("upstream_idle_timeout", self.upstream_idle_timeout),
            ("upstream_resolve_interval", self.upstream_resolve_interval),
            ("challenge_ttl", self.challenge_ttl),
            ("challenge_fallback_delay", self.challenge_fallback_delay),
            ("tls_reload_interval", self.tls_reload_interval),
        ] {
            at_most_a_year(option, d)?;
        }
        nonzero("flush_interval", self.flush_interval)?;
        nonzero("stream_wait", self.stream_wait)?;
        nonzero("heartbeat_interval", self.heartbeat_interval)?;
        nonzero("upstream_connect_timeout", self.upstream_connect_timeout)?;
        // Zero would hold no tarpitted request at all: revoke the tarpits instead.
        nonzero("tarpit_max", self.tarpit_max)?;
        for (option, names) in [
            ("report_headers", &self.report_headers),
            ("report_cookies", &self.report_cookies),
        ] {
            if let Some(bad) = names.iter().find(|n| !is_token(n)) {
                return Err(ConfigError::invalid(
                    option,
                    bad,
                    "not a valid header or cookie name",
                ));
            }
        }
        if let Some(bad) = self
            .forward_headers
            .iter()
            .find(|h| !FORWARD_HEADERS.iter().any(|f| f.eq_ignore_ascii_case(h)))
        {
            return Err(ConfigError::invalid(
                "forward_headers",
                bad,
                format!("one of {}", FORWARD_HEADERS.join(", ")),
            ));
        }
        if let Some(bad) = self.allow_paths.iter().find(|p| !p.starts_with('/')) {
            return Err(ConfigError::invalid(
                "allow_paths",
                bad,
                "a path starts with `/` (a trailing `*` makes it a prefix)",
            ));
        }
        // Only normal request paths can match, so an entry that is not one never would.
        if let Some(bad) = self.allow_paths.iter().find(|p| {
            let p = p.strip_suffix('*').unwrap_or(p);
            !matches!(
                esper_protocol::normalize_path(p),
                std::borrow::Cow::Borrowed(_)
            ) || p.contains('\\')
        }) {
            return Err(ConfigError::invalid(
                "allow_paths",
                bad,
                "a normal path: no escapes, `;`, `.` or `..` segments, `//` or backslashes",
            ));
        }
        if let Some(secret) = &self.challenge_secret
            && secret.len() < MIN_CHALLENGE_SECRET_LEN
        {
            return Err(ConfigError::invalid(
                "challenge_secret",
                "(hidden)",
                format!("must be at least {MIN_CHALLENGE_SECRET_LEN} bytes"),
            ));
        }
        nonzero("challenge_ttl", self.challenge_ttl)?;
        // With no wait the no-JavaScript link would clear any difficulty for no work.
        nonzero("challenge_fallback_delay", self.challenge_fallback_delay)?;
        if self.threads > 1024 {
            return Err(ConfigError::invalid(
                "threads",
                self.threads,
                "at most 1024 (0 means one per core)",
            ));
        }
        Ok(())
    }

    /// Adds a default certificate from a cert and key path (environment or flags).
    fn add_default_cert(&mut self, cert: Option<String>, key: Option<String>) {
        if let (Some(cert), Some(key)) = (cert, key) {
            self.tls_certificates.retain(|c| !c.hosts.is_empty());
            self.tls_certificates.push(CertConfig {
                cert: cert.into(),
                key: key.into(),
                hosts: Vec::new(),
            });
        }
    }

    /// The apps to serve: the `[[apps]]` tables, or in sidecar mode one app named `app`
    /// for every host, sent to `upstream` (no health check: with one upstream there is
    /// nowhere else to go).
    pub fn effective_apps(&self) -> Vec<AppConfig> {
        if !self.apps.is_empty() {
            return self.apps.clone();
        }
        vec![AppConfig {
            name: self.app.clone(),
            upstreams: vec![self.upstream.clone()],
            upstream_tls: self.upstream_tls,
            health_check: "none".into(),
            templates_dir: self.templates_dir.clone(),
            ..AppConfig::default()
        }]
    }

    fn validate_apps(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::HashSet::new();
        // Which app each host and path prefix routes to: a second app with the same pair
        // would never be reached.
        let mut routes: std::collections::HashMap<(String, String), &str> =
            std::collections::HashMap::new();
        for (i, app) in self.apps.iter().enumerate() {
            let at = |field: &str| format!("apps[{i}].{field}");
            if app.name.trim().is_empty() {
                return Err(ConfigError::invalid(&at("name"), "", "must not be empty"));
            }
            // The control plane's fleet view takes names up to this long.
            if app.name.len() > MAX_APP_NAME_LEN || app.name.chars().any(char::is_control) {
                return Err(ConfigError::invalid(
                    &at("name"),
                    &app.name,
                    format!("must be 1 to {MAX_APP_NAME_LEN} printable characters"),
                ));
            }
            if !names.insert(app.name.as_str()) {
                return Err(ConfigError::invalid(&at("name"), &app.name, "used twice"));
            }
            if app.upstreams.is_empty() {
                return Err(ConfigError::invalid(
                    &at("upstreams"),
                    "[]",
                    "at least one HOST:PORT",
                ));
            }
            for u in &app.upstreams {
                split_host_port(u).map_err(|r| ConfigError::invalid(&at("upstreams"), u, r))?;
            }
            if let Some(bad) = app.hosts.iter().find(|h| !valid_host_pattern(h)) {
                return Err(ConfigError::invalid(
                    &at("hosts"),
                    bad,
                    "a host name, or `*.` and a domain",
                ));
            }
            if !app.path_prefix.starts_with('/') {
                return Err(ConfigError::invalid(
                    &at("path_prefix"),
                    &app.path_prefix,
                    "must start with `/`",
                ));
            }
            let prefix = app.path_prefix.trim_end_matches('/').to_string();
            let hosts: Vec<String> = if app.hosts.is_empty() {
                vec!["*".into()]
            } else {
                // As the router reads them: no case, no trailing dot.
                app.hosts
                    .iter()
                    .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                    .collect()
            };
            // The default app is reached by hosts no other app claims, whatever its own.
            let reached_anyway = self.default_app.as_deref() == Some(app.name.as_str());
            for host in hosts {
                if let Some(first) = routes.insert((host.clone(), prefix.clone()), &app.name)
                    && !reached_anyway
                {
                    return Err(ConfigError::invalid(
                        &at("hosts"),
                        &host,
                        format!(
                            "with path_prefix `{}` it is app `{first}`'s already; this app \
                             would never be reached",
                            app.path_prefix
                        ),
                    ));
                }
            }
            let hc = app.health_check.as_str();
            if !(hc == "tcp" || hc == "none" || hc.starts_with('/')) {
                return Err(ConfigError::invalid(
                    &at("health_check"),
                    hc,
                    "`tcp`, `none`, or an HTTP path such as `/healthz`",
                ));
            }
            nonzero(&at("health_check_interval"), app.health_check_interval)?;
            at_most_a_year(&at("health_check_interval"), app.health_check_interval)?;
            if let Some(rate) = app.sample_rate
                && !(rate > 0.0 && rate <= 1.0)
            {
                return Err(ConfigError::invalid(
                    &at("sample_rate"),
                    rate,
                    "must be greater than 0 and at most 1",
                ));
            }
        }
        if let Some(name) = &self.default_app
            && !self.effective_apps().iter().any(|a| &a.name == name)
        {
            return Err(ConfigError::invalid(
                "default_app",
                name,
                "names no app in [[apps]]",
            ));
        }
        if !matches!(self.unknown_host_status, 404 | 421) {
            return Err(ConfigError::invalid(
                "unknown_host_status",
                self.unknown_host_status,
                "404 or 421",
            ));
        }
        Ok(())
    }

    fn validate_tls(&self) -> Result<(), ConfigError> {
        for (i, c) in self.tls_certificates.iter().enumerate() {
            if c.cert.as_os_str().is_empty() || c.key.as_os_str().is_empty() {
                return Err(ConfigError::invalid(
                    &format!("tls_certificates[{i}]"),
                    c.cert.display(),
                    "both `cert` and `key` are required",
                ));
            }
            if let Some(bad) = c.hosts.iter().find(|h| !valid_host_pattern(h)) {
                return Err(ConfigError::invalid(
                    &format!("tls_certificates[{i}].hosts"),
                    bad,
                    "a host name, or `*.` and a domain",
                ));
            }
        }
        if !self.tls_certificates.is_empty() && self.tls_listen == self.listen {
            return Err(ConfigError::invalid(
                "tls_listen",
                self.tls_listen,
                "must differ from `listen`",
            ));
        }
        nonzero("tls_reload_interval", self.tls_reload_interval)
    }

    /// The number of traffic threads to run: `threads`, or one per core when 0.
    pub fn effective_threads(&self) -> usize {
        if self.threads > 0 {
            return self.threads;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// A complete, commented TOML configuration with every option at its default.
    pub fn template() -> &'static str {
        TEMPLATE
    }
}

/// Splits `HOST:PORT` (`[v6]:PORT` for IPv6 literals) into its parts.
pub fn split_host_port(value: &str) -> Result<(&str, u16), String> {
    if value.contains("://") {
        return Err(
            "expected HOST:PORT without a scheme, e.g. 127.0.0.1:3000 (for TLS to the \
             upstream, set upstream_tls)"
                .into(),
        );
    }
    let (host, port) = value
        .trim()
        .rsplit_once(':')
        .ok_or_else(|| "expected HOST:PORT, e.g. 127.0.0.1:3000".to_string())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err("the host is missing (expected HOST:PORT)".into());
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("`{port}` is not a port number"))?;
    if port == 0 {
        return Err("port 0 is not a valid upstream port".into());
    }
    Ok((host, port))
}

fn check_url(option: &str, url: &str) -> Result<(), ConfigError> {
    let ok = (url.starts_with("http://") || url.starts_with("https://"))
        && url.split("://").nth(1).is_some_and(|rest| !rest.is_empty());
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            option,
            url,
            "expected an http:// or https:// URL",
        ))
    }
}

fn positive(option: &str, n: usize) -> Result<(), ConfigError> {
    if n == 0 {
        Err(ConfigError::invalid(option, n, "must be at least 1"))
    } else {
        Ok(())
    }
}

fn nonzero(option: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        Err(ConfigError::invalid(
            option,
            humantime_serde::re::humantime::format_duration(d),
            "must be longer than 0",
        ))
    } else {
        Ok(())
    }
}

const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn at_most_a_year(option: &str, d: Duration) -> Result<(), ConfigError> {
    if d > MAX_DURATION {
        Err(ConfigError::invalid(
            option,
            humantime_serde::re::humantime::format_duration(d),
            "must be at most 365 days",
        ))
    } else {
        Ok(())
    }
}

/// A host name (letters, digits, `-`, `.`), optionally behind `*.`.
fn valid_host_pattern(h: &str) -> bool {
    let name = h.strip_prefix("*.").unwrap_or(h);
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// An HTTP token (RFC 9110): what header and cookie names are made of.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The commented template (`esper proxy config`); a test checks it parses to the defaults.
const TEMPLATE: &str = include_str!("template.toml");

/// Command-line flags of `esper proxy run`; each overrides the environment and the file.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Args {
    /// Address client traffic is accepted on [default: 0.0.0.0:8000]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Address of the ops server (health, metrics) [default: 0.0.0.0:9095]
    #[arg(long, value_name = "ADDR")]
    pub ops_listen: Option<SocketAddr>,
    /// The protected app, HOST:PORT
    #[arg(long, value_name = "HOST:PORT")]
    pub upstream: Option<String>,
    /// Speak TLS to the upstream
    #[arg(long)]
    pub upstream_tls: bool,
    /// Name of the protected app [default: default]
    #[arg(long)]
    pub app: Option<String>,
    /// This proxy's id [default: the host name]
    #[arg(long)]
    pub proxy_id: Option<String>,
    /// Fraction of requests reported, 0 to 1 [default: 1.0]
    #[arg(long, value_name = "RATE")]
    pub sample_rate: Option<f64>,
    /// Ingestion broker URL [default: http://127.0.0.1:8082]
    #[arg(long, value_name = "URL")]
    pub ingestion_url: Option<String>,
    /// Mitigation broker URL, or several comma-separated [default: http://127.0.0.1:8083]
    #[arg(long, value_name = "URL")]
    pub mitigation_url: Option<String>,
    /// Control-plane URL for heartbeats
    #[arg(long, value_name = "URL")]
    pub control_url: Option<String>,
    /// Events per ingestion batch [default: 500]
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// Longest wait before a partial batch is sent (e.g. 100ms; bare numbers are ms)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    pub flush_interval: Option<Duration>,
    /// Events waiting to be sent, at most [default: 10000]
    #[arg(long, value_name = "N")]
    pub buffer: Option<usize>,
    /// Also append every forwarded event to FILE as JSON lines (replayable with
    /// `esperctl policies test --events FILE`)
    #[arg(long, value_name = "FILE")]
    pub record_events: Option<std::path::PathBuf>,
    /// A request header to copy into events (repeatable; replaces the defaults)
    #[arg(long = "report-header", value_name = "NAME")]
    pub report_headers: Vec<String>,
    /// A cookie to report, hashed (repeatable)
    #[arg(long = "report-cookie", value_name = "NAME")]
    pub report_cookies: Vec<String>,
    /// Worker threads for client traffic; 0 means one per core [default: 0]
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Upper bound on a tarpit delay (e.g. 10s; bare numbers are seconds)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs)]
    pub tarpit_max: Option<Duration>,
    /// Requests held in tarpits at once, at most [default: 1000]
    #[arg(long, value_name = "N")]
    pub tarpit_concurrency: Option<usize>,
    /// Long-poll wait on the delta stream (e.g. 25s; bare numbers are seconds)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs)]
    pub stream_wait: Option<Duration>,
    /// Time in-flight requests get to finish at shutdown (e.g. 10s)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs)]
    pub drain_timeout: Option<Duration>,
    /// A trusted proxy network whose forwarding headers are believed (repeatable)
    #[arg(long = "trusted-proxy", value_name = "CIDR", value_parser = parse_net)]
    pub trusted_proxies: Vec<IpNet>,
    /// The header trusted proxies name the client in: x-forwarded-for or forwarded
    /// [default: x-forwarded-for]
    #[arg(long, value_name = "HEADER")]
    pub real_ip_header: Option<RealIpHeader>,
    /// Expect a PROXY protocol header on every client connection
    #[arg(long)]
    pub proxy_protocol: bool,
    /// Access-log lines for: off, mitigated or all [default: off]
    #[arg(long, value_name = "WHICH")]
    pub access_log: Option<AccessLog>,
    /// Address of the TLS listener [default: 0.0.0.0:8443]
    #[arg(long, value_name = "ADDR")]
    pub tls_listen: Option<SocketAddr>,
    /// A default TLS certificate chain (PEM); needs --tls-key
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<String>,
    /// The private key of --tls-cert (PEM)
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<String>,
}

impl Args {
    /// Writes the flags that were given over `cfg`.
    pub fn apply(&self, cfg: &mut Config) {
        fn set<T: Clone>(target: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *target = v.clone();
            }
        }
        set(&mut cfg.listen, &self.listen);
        set(&mut cfg.ops_listen, &self.ops_listen);
        set(&mut cfg.upstream, &self.upstream);
        if self.upstream_tls {
            cfg.upstream_tls = true;
        }
        set(&mut cfg.app, &self.app);
        set(&mut cfg.proxy_id, &self.proxy_id);
        set(&mut cfg.sample_rate, &self.sample_rate);
        set(&mut cfg.ingestion_url, &self.ingestion_url);
        set(&mut cfg.mitigation_url, &self.mitigation_url);
        if self.control_url.is_some() {
            cfg.control_url = self.control_url.clone();
        }
        set(&mut cfg.batch_size, &self.batch_size);
        set(&mut cfg.flush_interval, &self.flush_interval);
        set(&mut cfg.buffer, &self.buffer);
        if self.record_events.is_some() {
            cfg.record_events = self.record_events.clone();
        }
        if !self.report_headers.is_empty() {
            cfg.report_headers = name_list(&self.report_headers.join(","));
        }
        if !self.report_cookies.is_empty() {
            cfg.report_cookies = name_list(&self.report_cookies.join(","));
        }
        set(&mut cfg.threads, &self.threads);
        set(&mut cfg.tarpit_max, &self.tarpit_max);
        set(&mut cfg.tarpit_concurrency, &self.tarpit_concurrency);
        set(&mut cfg.stream_wait, &self.stream_wait);
        set(&mut cfg.drain_timeout, &self.drain_timeout);
        if !self.trusted_proxies.is_empty() {
            cfg.trusted_proxies = self.trusted_proxies.clone();
        }
        set(&mut cfg.real_ip_header, &self.real_ip_header);
        set(&mut cfg.access_log, &self.access_log);
        if self.proxy_protocol {
            cfg.proxy_protocol = true;
        }
        set(&mut cfg.tls_listen, &self.tls_listen);
        cfg.add_default_cert(self.tls_cert.clone(), self.tls_key.clone());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use clap::Parser;
    use esper_common::config::load;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn template_parses_to_the_defaults() {
        let parsed: Config = toml::from_str(Config::template()).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn environment_names_apply() {
        let vars = env(&[
            ("ESPER_UPSTREAM", "app.internal:3000"),
            ("ESPER_PROXY_LISTEN", "127.0.0.1:18000"),
            ("ESPER_SAMPLE_RATE", "0.25"),
            ("BATCH_TIMEOUT_MS", "250"),
            ("ESPER_REPORT_HEADERS", "X-Api-Key, referer,"),
            ("ESPER_REPORT_COOKIES", "session"),
            ("ESPER_TOKEN", "t0k"),
            ("ESPER_CONTROL_URL", "http://127.0.0.1:8080"),
            ("ESPER_TARPIT_MAX", "3"),
            ("ESPER_TRUSTED_PROXIES", "10.0.0.0/8, 192.0.2.1"),
            ("ESPER_ALLOW_PATHS", "/healthz,/static/*"),
            ("ESPER_CHALLENGE_SECRET", "0123456789abcdef"),
        ]);
        let cfg: Config = load(None, &vars, Config::apply_env).unwrap();
        assert_eq!(cfg.upstream, "app.internal:3000");
        assert_eq!(cfg.listen, "127.0.0.1:18000".parse().unwrap());
        assert_eq!(cfg.sample_rate, 0.25);
        assert_eq!(cfg.flush_interval, Duration::from_millis(250));
        assert_eq!(cfg.report_headers, vec!["x-api-key", "referer"]);
        assert_eq!(cfg.report_cookies, vec!["session"]);
        assert_eq!(cfg.control_token.as_deref(), Some("t0k"));
        assert_eq!(cfg.tarpit_max, Duration::from_secs(3));
        assert_eq!(
            cfg.trusted_proxies,
            vec![
                "10.0.0.0/8".parse::<IpNet>().unwrap(),
                "192.0.2.1/32".parse().unwrap()
            ]
        );
        assert_eq!(cfg.allow_paths, vec!["/healthz", "/static/*"]);
        assert_eq!(cfg.forward_headers, FORWARD_HEADERS.to_vec());
        cfg.validate().unwrap();
        let some = env(&[
            ("ESPER_UPSTREAM", "app.internal:3000"),
            ("ESPER_FORWARD_HEADERS", "X-Forwarded-For, x-request-id"),
        ]);
        let cfg = load::<Config, _>(None, &some, Config::apply_env).unwrap();
        assert_eq!(cfg.forward_headers, vec!["x-forwarded-for", "x-request-id"]);
        cfg.validate().unwrap();
        let none = env(&[("ESPER_FORWARD_HEADERS", "none")]);
        let cfg = load::<Config, _>(None, &none, Config::apply_env).unwrap();
        assert!(cfg.forward_headers.is_empty());
        assert!(!cfg.preserve_header_case);
        let kept = env(&[("ESPER_PRESERVE_HEADER_CASE", "true")]);
        let cfg = load::<Config, _>(None, &kept, Config::apply_env).unwrap();
        assert!(cfg.preserve_header_case);
        let bad = env(&[("ESPER_PRESERVE_HEADER_CASE", "maybe")]);
        let err = load::<Config, _>(None, &bad, Config::apply_env).unwrap_err();
        assert!(
            err.to_string().contains("ESPER_PRESERVE_HEADER_CASE"),
            "{err}"
        );
        let typo = env(&[
            ("ESPER_UPSTREAM", "app.internal:3000"),
            ("ESPER_FORWARD_HEADERS", "x-forwarded-host"),
        ]);
        let err = load::<Config, _>(None, &typo, Config::apply_env)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("forward_headers") && err.contains("x-forwarded-host"),
            "{err}"
        );
        let bad = env(&[("ESPER_TRUSTED_PROXIES", "10.0.0.0/8,nope")]);
        let err = load::<Config, _>(None, &bad, Config::apply_env).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn allow_paths_must_be_normal_paths() {
        let ok = Config {
            upstream: "127.0.0.1:3000".into(),
            allow_paths: vec![
                "/healthz".into(),
                "/.well-known/*".into(),
                "/static/*".into(),
            ],
            ..Config::default()
        };
        ok.validate().unwrap();
        for bad in ["/a/../b", "/a//b", "/%61", "/a\\b/*"] {
            let cfg = Config {
                allow_paths: vec![bad.into()],
                ..ok.clone()
            };
            let err = cfg.validate().unwrap_err().to_string();
            assert!(
                err.contains("allow_paths") && err.contains("normal path"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn the_real_ip_header_is_x_forwarded_for_unless_set() {
        assert_eq!(
            Config::default().real_ip_header,
            RealIpHeader::XForwardedFor
        );
        let fwd = env(&[("ESPER_REAL_IP_HEADER", "Forwarded")]);
        let cfg = load::<Config, _>(None, &fwd, Config::apply_env).unwrap();
        assert_eq!(cfg.real_ip_header, RealIpHeader::Forwarded);
        let toml: Config = toml::from_str("real_ip_header = \"forwarded\"").unwrap();
        assert_eq!(toml.real_ip_header, RealIpHeader::Forwarded);
        let typo = env(&[("ESPER_REAL_IP_HEADER", "x-real-ip")]);
        let err = load::<Config, _>(None, &typo, Config::apply_env).unwrap_err();
        assert!(
            err.to_string().contains("ESPER_REAL_IP_HEADER")
                && err.to_string().contains("x-forwarded-for or forwarded"),
            "{err}"
        );
        assert!(toml::from_str::<Config>("real_ip_header = \"x-real-ip\"").is_err());
    }

    #[test]
    fn networks_in_a_file_may_be_bare_addresses() {
        let cfg: Config = toml::from_str(
            "allow_ips = [\"127.0.0.10\", \"10.0.0.0/8\", \"::ffff:192.0.2.1\"]\n\
             trusted_proxies = [\"192.0.2.7\"]",
        )
        .unwrap();
        let shown: Vec<String> = cfg.allow_ips.iter().map(|n| n.to_string()).collect();
        assert_eq!(shown, ["127.0.0.10/32", "10.0.0.0/8", "192.0.2.1/32"]);
        assert_eq!(cfg.trusted_proxies[0].to_string(), "192.0.2.7/32");
        let err = toml::from_str::<Config>("allow_ips = [\"10.0.0.0/8\", \"office\"]")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`office`") && err.contains("allow_ips"),
            "{err}"
        );
        // Written back as networks, read again the same.
        let again: Config = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(again.allow_ips, cfg.allow_ips);
    }

    #[test]
    fn the_access_log_is_off_unless_asked_for() {
        use esper_protocol::EnforcedAction;
        assert_eq!(Config::default().access_log, AccessLog::Off);
        let vars = env(&[("ESPER_ACCESS_LOG", "Mitigated")]);
        let cfg = load::<Config, _>(None, &vars, Config::apply_env).unwrap();
        assert_eq!(cfg.access_log, AccessLog::Mitigated);
        let toml: Config = toml::from_str("access_log = \"all\"").unwrap();
        assert_eq!(toml.access_log, AccessLog::All);
        let typo = env(&[("ESPER_ACCESS_LOG", "on")]);
        let err = load::<Config, _>(None, &typo, Config::apply_env).unwrap_err();
        assert!(err.to_string().contains("off, mitigated or all"), "{err}");
        assert!(!AccessLog::Off.logs(EnforcedAction::Block));
        assert!(!AccessLog::Mitigated.logs(EnforcedAction::Allow));
        for a in [
            EnforcedAction::Block,
            EnforcedAction::Challenge,
            EnforcedAction::Throttle,
            EnforcedAction::Tarpit,
            EnforcedAction::Log,
        ] {
            assert!(AccessLog::Mitigated.logs(a), "{a:?}");
        }
        assert!(AccessLog::All.logs(EnforcedAction::Allow));
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn flags_win_over_environment() {
        let vars = env(&[("ESPER_UPSTREAM", "a:1"), ("ESPER_APP", "shop")]);
        let mut cfg: Config = load(None, &vars, Config::apply_env).unwrap();
        let cli = Cli::parse_from([
            "x",
            "--upstream",
            "b:2",
            "--report-header",
            "X-One",
            "--report-header",
            "x-two",
            "--flush-interval",
            "50",
        ]);
        cli.args.apply(&mut cfg);
        assert_eq!(cfg.upstream, "b:2");
        assert_eq!(cfg.app, "shop");
        assert_eq!(cfg.report_headers, vec!["x-one", "x-two"]);
        assert_eq!(cfg.flush_interval, Duration::from_millis(50));
    }

    #[test]
    fn validation_names_the_option_and_value() {
        let base = Config {
            upstream: "127.0.0.1:3000".into(),
            ..Config::default()
        };
        base.validate().unwrap();
        let cases: Vec<(Config, &str)> = vec![
            (Config::default(), "invalid upstream = ``: required"),
            (
                Config {
                    upstream: "nohost".into(),
                    ..base.clone()
                },
                "invalid upstream = `nohost`",
            ),
            (
                Config {
                    sample_rate: 0.0,
                    ..base.clone()
                },
                "invalid sample_rate = `0`",
            ),
            (
                Config {
                    sample_rate: 1.5,
                    ..base.clone()
                },
                "invalid sample_rate = `1.5`",
            ),
            (
                Config {
                    ingestion_url: "127.0.0.1:8082".into(),
                    ..base.clone()
                },
                "invalid ingestion_url = `127.0.0.1:8082`",
            ),
            (
                Config {
                    control_url: Some("http://cp1:8080, cp2:8080".into()),
                    ..base.clone()
                },
                "invalid control_url = `cp2:8080`",
            ),
            (
                Config {
                    batch_size: 0,
                    ..base.clone()
                },
                "invalid batch_size = `0`",
            ),
            (
                Config {
                    report_headers: vec!["bad header".into()],
                    ..base.clone()
                },
                "invalid report_headers = `bad header`",
            ),
            (
                Config {
                    flush_interval: Duration::ZERO,
                    ..base.clone()
                },
                "invalid flush_interval = `0s`",
            ),
            (
                Config {
                    challenge_fallback_delay: Duration::ZERO,
                    ..base.clone()
                },
                "invalid challenge_fallback_delay = `0s`",
            ),
            (
                Config {
                    flush_interval: Duration::from_secs(1000 * 365 * 24 * 3600),
                    ..base.clone()
                },
                "invalid flush_interval = `999years 3months 23days 22h 19m 12s`: must be at most 365 days",
            ),
            (
                Config {
                    tarpit_max: Duration::ZERO,
                    ..base.clone()
                },
                "invalid tarpit_max = `0s`",
            ),
            (
                Config {
                    upstream: "http://127.0.0.1:3000".into(),
                    ..base.clone()
                },
                "invalid upstream = `http://127.0.0.1:3000`: expected HOST:PORT without a scheme",
            ),
            (
                Config {
                    upstream: String::new(),
                    apps: vec![
                        AppConfig {
                            name: "a".into(),
                            hosts: vec!["shop.example".into()],
                            upstreams: vec!["127.0.0.1:1".into()],
                            ..AppConfig::default()
                        },
                        AppConfig {
                            name: "b".into(),
                            hosts: vec!["SHOP.example".into()],
                            path_prefix: "/".into(),
                            upstreams: vec!["127.0.0.1:2".into()],
                            ..AppConfig::default()
                        },
                    ],
                    ..base.clone()
                },
                "invalid apps[1].hosts = `shop.example`: with path_prefix `/` it is app `a`'s already",
            ),
        ];
        for (cfg, expected) in cases {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.starts_with(expected), "{err} / {expected}");
        }
    }

    #[test]
    fn host_port_splits() {
        assert_eq!(split_host_port("a.b:80"), Ok(("a.b", 80)));
        assert_eq!(split_host_port("[::1]:8080"), Ok(("::1", 8080)));
        assert!(split_host_port("a.b:http").is_err());
        assert!(split_host_port(":80").is_err());
        assert!(split_host_port("a:0").is_err());
    }
}
