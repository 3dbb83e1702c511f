//! A local mirror of the mitigation broker's active set, kept fresh by following its
//! delta stream as proxies do, so `POST /api/v1/analyze` answers from memory (covering
//! networks included) without a broker round trip per request.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use chrono::Utc;
use esper_common::Shutdown;
use esper_protocol::{Change, ClientError, DeltaPage, EntityKey, Mitigation, MitigationClient};
use ipnet::IpNet;
use parking_lot::RwLock;

/// How long one long-poll of the stream waits for a change.
const POLL_WAIT: Duration = Duration::from_secs(20);
/// Retry delays after a failed poll.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct State {
    by_id: HashMap<String, Mitigation>,
    /// Ids by exact key (addresses, header and cookie values).
    exact: HashMap<EntityKey, HashSet<String>>,
    /// Networks by id: checked by containment.
    nets: HashMap<String, IpNet>,
    /// Tuples (combinations) by id: every part must match.
    tuples: HashMap<String, Vec<EntityKey>>,
    synced: bool,
}

impl State {
    fn insert(&mut self, m: Mitigation) {
        self.remove(&m.id);
        match &m.entity {
            EntityKey::Cidr(net) => {
                self.nets.insert(m.id.clone(), *net);
            }
            EntityKey::Tuple(parts) => {
                self.tuples.insert(m.id.clone(), parts.clone());
            }
            key => {
                self.exact
                    .entry(key.clone())
                    .or_default()
                    .insert(m.id.clone());
            }
        }
        self.by_id.insert(m.id.clone(), m);
    }

    fn remove(&mut self, id: &str) {
        if let Some(old) = self.by_id.remove(id) {
            if let Some(ids) = self.exact.get_mut(&old.entity) {
                ids.remove(id);
                if ids.is_empty() {
                    self.exact.remove(&old.entity);
                }
            }
            self.nets.remove(id);
            self.tuples.remove(id);
        }
    }

    fn prune_expired(&mut self) {
        let now = Utc::now();
        let expired: Vec<String> = self
            .by_id
            .values()
            .filter(|m| !m.is_active(now))
            .map(|m| m.id.clone())
            .collect();
        for id in expired {
            self.remove(&id);
        }
    }
}

/// The mirrored active set.
#[derive(Debug, Default)]
pub struct Mirror {
    state: RwLock<State>,
}

impl Mirror {
    pub fn new() -> Mirror {
        Mirror::default()
    }

    /// Has the mirror received the broker's active set at least once since its last error?
    pub fn synced(&self) -> bool {
        self.state.read().synced
    }

    /// Mitigations held.
    pub fn len(&self) -> usize {
        self.state.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies one page of the stream.
    pub fn apply(&self, page: DeltaPage) {
        let mut st = self.state.write();
        // A snapshot taken while the broker restores from the decision log may lack
        // what is still in force: added to what is held, not put in its place.
        if page.snapshot && !page.restoring {
            let synced = st.synced;
            *st = State::default();
            st.synced = synced;
        }
        for change in page.changes {
            match change {
                Change::Upsert { mitigation } => st.insert(mitigation),
                Change::Remove { id } => st.remove(&id),
            }
        }
        st.prune_expired();
        st.synced = true;
    }

    /// Every mitigation held.
    pub fn all(&self) -> Vec<Mitigation> {
        self.state.read().by_id.values().cloned().collect()
    }

    /// Records a mitigation this control plane just published (read-your-writes; the
    /// stream brings the same one again shortly).
    pub fn upsert(&self, m: Mitigation) {
        self.state.write().insert(m);
    }

    /// Forgets mitigations this control plane just revoked.
    pub fn revoke(&self, id: Option<&str>, entity: Option<&EntityKey>) {
        let mut st = self.state.write();
        let ids: Vec<String> = st
            .by_id
            .values()
            .filter(|m| id == Some(m.id.as_str()) || entity == Some(&m.entity))
            .map(|m| m.id.clone())
            .collect();
        for id in ids {
            st.remove(&id);
        }
    }

    /// The most severe active mitigation that applies to a request from `ip` for `app`:
    /// against the address itself or a network containing it.
    pub fn best_for_ip(&self, ip: IpAddr, app: &str) -> Option<Mitigation> {
        self.best_for(ip, &[], app)
    }

    /// The most severe active mitigation that applies to a request from `ip` for `app`
    /// that carries the entity keys `others` (its header and hashed cookie values):
    /// against the address, a network containing it, or one of those keys.
    pub fn best_for(&self, ip: IpAddr, others: &[EntityKey], app: &str) -> Option<Mitigation> {
        let now = Utc::now();
        let st = self.state.read();
        let direct = std::iter::once(EntityKey::Ip(ip))
            .chain(others.iter().cloned())
            .filter_map(|k| st.exact.get(&k))
            .flatten();
        let covering = st
            .nets
            .iter()
            .filter(|(_, net)| net.contains(&ip))
            .map(|(id, _)| id);
        let tuples = st
            .tuples
            .iter()
            .filter(|(_, parts)| {
                parts.iter().all(|p| match p {
                    EntityKey::Ip(_) | EntityKey::Cidr(_) => p.covers_ip(ip),
                    other => others.contains(other),
                })
            })
            .map(|(id, _)| id);
        direct
            .chain(covering)
            .chain(tuples)
            .filter_map(|id| st.by_id.get(id))
            .filter(|m| m.is_active(now) && m.scope.applies_to(app))
            .max_by(|a, b| {
                a.action
                    .severity()
                    .cmp(&b.action.severity())
                    .then(a.expires_at.cmp(&b.expires_at))
            })
            .cloned()
    }

    fn lost(&self) {
        self.state.write().synced = false;
    }
}

/// The stream's next answer; a snapshot arriving in pages is gathered into one.
async fn poll(client: &MitigationClient, cursor: Option<&str>) -> Result<DeltaPage, ClientError> {
    let mut page = client.stream(cursor, POLL_WAIT).await?;
    while let (true, Some(more)) = (page.snapshot, page.more.take()) {
        let next = client.snapshot_next(&page.cursor, &more).await?;
        if next.cursor == page.cursor {
            page.changes.extend(next.changes);
            page.more = next.more;
        } else {
            // The snapshot could not be continued: this page starts a new one.
            page = next;
        }
    }
    Ok(page)
}

/// Follows the broker's stream into `mirror` until shutdown.
pub async fn follow(mirror: std::sync::Arc<Mirror>, client: MitigationClient, shutdown: Shutdown) {
    let mut cursor: Option<String> = None;
    let mut backoff = BACKOFF_MIN;
    let mut warned = false;
    let mut moved = client.endpoints().subscribe();
    loop {
        let poll = tokio::select! {
            r = poll(&client, cursor.as_deref()) => r,
            // A reload named other brokers: the long poll in flight is left behind.
            Ok(()) = moved.changed() => {
                tracing::info!(url = client.url(), "following the mitigation broker at its new address");
                backoff = BACKOFF_MIN;
                continue;
            }
            _ = shutdown.wait() => return,
        };
        match poll {
            Ok(page) => {
                cursor = Some(page.cursor.clone());
                mirror.apply(page);
                backoff = BACKOFF_MIN;
                if warned {
                    tracing::info!(url = client.url(), "following the mitigation broker again");
                    warned = false;
                }
            }
            Err(e) => {
                mirror.lost();
                if !warned {
                    tracing::warn!(error = %e, "cannot follow the mitigation broker's stream; retrying");
                    warned = true;
                }
                tokio::select! {
                    stop = shutdown.sleep(backoff) => if stop {
                        return;
                    },
                    Ok(()) = moved.changed() => {
                        tracing::info!(url = client.url(), "following the mitigation broker at its new address");
                        backoff = BACKOFF_MIN;
                        continue;
                    }
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use esper_protocol::{Action, Origin, Reason, Scope};

    use super::*;

    fn m(id: &str, entity: &str, action: Action) -> Mitigation {
        let mut m = Mitigation::new(
            entity.parse().unwrap(),
            action,
            Duration::from_secs(60),
            Origin::Manual,
            Reason::default(),
        );
        m.id = id.into();
        m
    }

    #[tokio::test]
    async fn a_snapshot_in_pages_is_gathered_whole() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (trigger, shutdown) = esper_common::Shutdown::new();
        let config = esper_mitigation::Config {
            stream_page_size: 2,
            ..esper_mitigation::Config::default()
        };
        let broker = esper_mitigation::start(config, listener, shutdown)
            .await
            .unwrap();
        let client = MitigationClient::new(&format!("http://{}", broker.local_addr()), None);
        let all: Vec<Mitigation> = (0..7)
            .map(|i| m(&format!("m{i}"), &format!("ip:192.0.2.{i}"), Action::Block))
            .collect();
        client.publish(all).await.unwrap();
        let page = poll(&client, None).await.unwrap();
        assert!(page.snapshot && page.more.is_none());
        let mirror = Mirror::new();
        mirror.apply(page);
        assert_eq!(mirror.len(), 7);
        trigger.trigger();
        broker.wait().await.unwrap();
    }

    #[test]
    fn picks_the_most_severe_covering_mitigation() {
        let mirror = Mirror::new();
        mirror.apply(DeltaPage {
            cursor: "1".into(),
            snapshot: true,
            changes: vec![
                Change::Upsert {
                    mitigation: m("a", "ip:192.0.2.7", Action::Log),
                },
                Change::Upsert {
                    mitigation: m("b", "cidr:192.0.2.0/24", Action::Block),
                },
            ],
            more: None,
            total: None,
            restoring: false,
        });
        assert!(mirror.synced());
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(mirror.best_for_ip(ip, "shop").unwrap().id, "b");
        assert_eq!(
            mirror
                .best_for_ip("192.0.2.8".parse().unwrap(), "")
                .unwrap()
                .id,
            "b"
        );
        assert!(
            mirror
                .best_for_ip("198.51.100.1".parse().unwrap(), "")
                .is_none()
        );
        mirror.apply(DeltaPage {
            cursor: "2".into(),
            snapshot: false,
            changes: vec![Change::Remove { id: "b".into() }],
            more: None,
            total: None,
            restoring: false,
        });
        assert_eq!(mirror.best_for_ip(ip, "").unwrap().id, "a");

        let mut scoped = m("c", "ip:192.0.2.7", Action::Block);
        scoped.scope = Scope::App("blog".into());
        mirror.upsert(scoped);
        assert_eq!(mirror.best_for_ip(ip, "shop").unwrap().id, "a");
        assert_eq!(mirror.best_for_ip(ip, "blog").unwrap().id, "c");
        mirror.revoke(None, Some(&"ip:192.0.2.7".parse().unwrap()));
        assert!(mirror.is_empty());
    }

    #[test]
    fn tuples_apply_when_every_part_matches() {
        let mirror = Mirror::new();
        mirror.upsert(m(
            "t",
            "tuple:ip:192.0.2.7+header:user-agent=curl/8",
            Action::Block,
        ));
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let curl: EntityKey = "header:user-agent=curl/8".parse().unwrap();
        assert_eq!(
            mirror
                .best_for(ip, std::slice::from_ref(&curl), "")
                .unwrap()
                .id,
            "t"
        );
        assert!(mirror.best_for(ip, &[], "").is_none());
        assert!(
            mirror
                .best_for("192.0.2.8".parse().unwrap(), &[curl], "")
                .is_none()
        );
        mirror.apply(DeltaPage {
            cursor: "2".into(),
            snapshot: false,
            changes: vec![Change::Remove { id: "t".into() }],
            more: None,
            total: None,
            restoring: false,
        });
        assert!(mirror.is_empty());
    }

    #[test]
    fn a_snapshot_replaces_everything() {
        let mirror = Mirror::new();
        mirror.upsert(m("a", "ip:192.0.2.7", Action::Block));
        mirror.apply(DeltaPage {
            cursor: "9".into(),
            snapshot: true,
            changes: vec![],
            more: None,
            total: None,
            restoring: false,
        });
        assert!(mirror.is_empty());
    }
}
