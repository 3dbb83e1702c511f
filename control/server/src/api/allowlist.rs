//! The `allowlist` named list wins over every mitigation, not only over policies (which
//! the workers skip for it): a manual mitigation against a covered entity is refused,
//! and adding an entry revokes the mitigations in force that it covers.

use chrono::Utc;
use esper_common::ApiError;
use esper_engine::policy::{ALLOWLIST, ListKind, parse_net};
use esper_protocol::EntityKey;
use esper_protocol::mitigation::RevokeRequest;
use ipnet::IpNet;

use super::{broker_error, store_error};
use crate::state::AppState;
use crate::store::RevokeTarget;

/// The networks of the stored allowlist (none when there is no such IP list).
pub async fn networks(state: &AppState) -> Result<Vec<IpNet>, ApiError> {
    let list = state
        .store
        .get_list(ALLOWLIST)
        .await
        .map_err(|e| store_error(state, e))?;
    Ok(list
        .filter(|l| l.kind == ListKind::Ip.to_string())
        .map(|l| l.items.iter().filter_map(|i| parse_net(i)).collect())
        .unwrap_or_default())
}

/// The allowlist entry that a mitigation against `entity` would reach: one holding the
/// address, or overlapping the network, of the entity or of one of its tuple parts.
pub fn covering(entity: &EntityKey, allow: &[IpNet]) -> Option<IpNet> {
    let overlaps = |net: &IpNet| {
        allow
            .iter()
            .find(|a| a.contains(net) || net.contains(*a))
            .copied()
    };
    match entity {
        EntityKey::Ip(ip) => overlaps(&IpNet::from(*ip)),
        EntityKey::Cidr(net) => overlaps(net),
        EntityKey::Tuple(parts) => parts.iter().find_map(|p| covering(p, allow)),
        _ => None,
    }
}

/// Whether every address `entity` names (in its IP part) is inside `entry`.
fn within(entity: &EntityKey, entry: &IpNet) -> bool {
    match entity {
        EntityKey::Ip(ip) => entry.contains(ip),
        EntityKey::Cidr(net) => entry.contains(net),
        EntityKey::Tuple(parts) => parts.iter().any(|p| within(p, entry)),
        _ => false,
    }
}

/// Refuses a manual mitigation against an allowlisted entity.
pub async fn check_manual(state: &AppState, entity: &EntityKey) -> Result<(), ApiError> {
    match covering(entity, &networks(state).await?) {
        Some(entry) => Err(ApiError::Conflict(format!(
            "{entity} {} allowlist entry {entry}, and the allowlist wins over every \
             mitigation; remove the entry first (esperctl lists) if the mitigation is meant",
            // A network wider than the entry would block its addresses at the proxies,
            // which enforce what they are sent and do not read this list.
            if within(entity, &entry) {
                "is covered by"
            } else {
                "would reach"
            }
        ))),
        None => Ok(()),
    }
}

/// Revokes the mitigations in force that `allow` covers; returns their ids.
pub async fn revoke_covered(
    state: &AppState,
    allow: &[IpNet],
    by: &str,
) -> Result<Vec<String>, ApiError> {
    let covered: Vec<_> = state
        .mirror
        .all()
        .into_iter()
        .filter(|m| covering(&m.entity, allow).is_some())
        .collect();
    let mut revoked = Vec::with_capacity(covered.len());
    for m in covered {
        let req = RevokeRequest {
            id: Some(m.id.clone()),
            entity: None,
        };
        state
            .mitigation
            .revoke(&req)
            .await
            .map_err(|e| broker_error(state, "mitigation", &state.mitigation.url(), e))?;
        state.mirror.revoke(Some(&m.id), None);
        state.metrics.revocations.inc();
        if let Err(e) = state
            .store
            .mark_revoked(&RevokeTarget::Id(m.id.clone()), by, Utc::now())
            .await
        {
            state.metrics.store_errors.inc();
            tracing::error!(id = %m.id, error = %e, "revocation done but not recorded in the decision log");
        }
        tracing::info!(id = %m.id, entity = %m.entity, "mitigation revoked: its entity is now allowlisted");
        revoked.push(m.id);
    }
    Ok(revoked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(items: &[&str]) -> Vec<IpNet> {
        items.iter().filter_map(|i| parse_net(i)).collect()
    }

    fn key(s: &str) -> EntityKey {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_networks_and_tuple_parts_are_covered() {
        let allow = nets(&["192.0.2.0/24", "2001:db8::1"]);
        assert!(covering(&key("ip:192.0.2.7"), &allow).is_some());
        assert!(covering(&key("ip:198.51.100.7"), &allow).is_none());
        // A network holding an allowlisted address would reach it.
        assert!(covering(&key("cidr:192.0.0.0/16"), &allow).is_some());
        assert!(covering(&key("cidr:2001:db8::/64"), &allow).is_some());
        assert!(covering(&key("cidr:192.0.2.128/25"), &allow).is_some());
        assert!(covering(&key("cidr:198.51.100.0/24"), &allow).is_none());
        assert!(covering(&key("tuple:ip:192.0.2.9+header:x-api-key=k"), &allow).is_some());
        assert!(covering(&key("header:x-api-key=k"), &allow).is_none());
        // Written IPv4-mapped, an entry is the IPv4 one.
        let mapped = nets(&["::ffff:198.51.100.50", "::ffff:203.0.113.0/120"]);
        assert!(covering(&key("ip:198.51.100.50"), &mapped).is_some());
        assert!(covering(&key("ip:203.0.113.9"), &mapped).is_some());
        assert!(covering(&key("ip:198.51.100.51"), &mapped).is_none());
    }

    #[test]
    fn a_network_holding_an_entry_reaches_it_without_being_covered() {
        let entry = nets(&["127.0.0.1"])[0];
        assert!(within(&key("ip:127.0.0.1"), &entry));
        assert!(!within(&key("cidr:127.0.0.0/8"), &entry));
        let office = nets(&["192.0.2.0/24"])[0];
        assert!(within(&key("cidr:192.0.2.128/25"), &office));
        assert!(within(
            &key("tuple:ip:192.0.2.9+header:x-api-key=k"),
            &office
        ));
    }
}
