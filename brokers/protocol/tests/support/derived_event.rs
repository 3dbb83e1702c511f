//! The reference serialisation of a `RequestEvent`: a copy of the struct with serde's
//! derived `Serialize` and the same field attributes, the form the wire format was first
//! defined by. Tests compare `RequestEvent`'s own serialisation with it byte for byte,
//! and the `event_ser` benchmark times both.

use std::collections::BTreeMap;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use esper_protocol::{EnforcedAction, RequestEvent, TlsInfo};
use serde::Serialize;

/// Field for field the same as `RequestEvent`, serialised by the derive.
#[derive(Clone, Debug, Serialize)]
pub struct DerivedEvent {
    pub id: String,
    pub timestamp: DateTime<Utc>,
    pub app: String,
    pub proxy_id: String,
    pub client_ip: IpAddr,
    pub method: String,
    pub host: String,
    pub path: String,
    pub status: u16,
    pub latency_us: u64,
    pub bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub cookies: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsInfo>,
    pub action: EnforcedAction,
    pub weight: f64,
}

impl From<&RequestEvent> for DerivedEvent {
    fn from(ev: &RequestEvent) -> DerivedEvent {
        DerivedEvent {
            id: ev.id.clone(),
            timestamp: ev.timestamp,
            app: ev.app.clone(),
            proxy_id: ev.proxy_id.clone(),
            client_ip: ev.client_ip,
            method: ev.method.clone(),
            host: ev.host.clone(),
            path: ev.path.clone(),
            status: ev.status,
            latency_us: ev.latency_us,
            bytes: ev.bytes,
            user_agent: ev.user_agent.clone(),
            headers: ev.headers.clone(),
            cookies: ev.cookies.clone(),
            tls: ev.tls.clone(),
            action: ev.action,
            weight: ev.weight,
        }
    }
}

/// The ingest body (`{"events":[...]}`) as the derived serialisation writes it.
pub fn derived_body(events: &[DerivedEvent]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Body<'a> {
        events: &'a [DerivedEvent],
    }
    serde_json::to_vec(&Body { events }).unwrap_or_default()
}
