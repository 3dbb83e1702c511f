//! Named lists (IP networks or strings) that policies refer to, and the active set the
//! control plane serves to workers.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::PolicyError;
use super::spec::{MAX_ID_LEN, PolicySpec, is_valid_id};

/// The name of the IP list the control plane serves as the global allowlist.
pub const ALLOWLIST: &str = "allowlist";

/// Most items one list may hold.
pub const MAX_LIST_ITEMS: usize = 1_000_000;

/// What a list holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListKind {
    /// IP addresses and CIDR networks (`203.0.113.7`, `10.0.0.0/8`, `2001:db8::/32`).
    #[default]
    Ip,
    /// Plain strings.
    String,
}

impl FromStr for ListKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ip" => Ok(ListKind::Ip),
            "string" => Ok(ListKind::String),
            other => Err(format!(
                "unknown list kind \"{other}\" (expected ip or string)"
            )),
        }
    }
}

impl fmt::Display for ListKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ListKind::Ip => "ip",
            ListKind::String => "string",
        })
    }
}

/// A named list, managed in the control plane (`esperctl lists`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedList {
    /// 1 to 64 characters of `a-z`, `0-9`, `-` and `_`; policies refer to it by this.
    pub name: String,
    pub kind: ListKind,
    pub items: Vec<String>,
}

impl NamedList {
    /// Checks the name and, for IP lists, that every item is an address or a network.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let err = |message: String| PolicyError {
            line: None,
            column: None,
            policy: None,
            message,
        };
        if !is_valid_id(&self.name) {
            return Err(err(format!(
                "list name \"{}\" must be 1 to {MAX_ID_LEN} characters of a-z, 0-9, '-' and '_'",
                self.name
            )));
        }
        if self.items.len() > MAX_LIST_ITEMS {
            return Err(err(format!(
                "list \"{}\" has {} items; at most {MAX_LIST_ITEMS} are allowed",
                self.name,
                self.items.len()
            )));
        }
        // Every part reads `allowlist` as addresses; another kind would switch it off.
        if self.name == ALLOWLIST && self.kind != ListKind::Ip {
            return Err(err(format!(
                "list \"{ALLOWLIST}\" is the allowlist of addresses and networks: its kind \
                 must be ip, not {}",
                self.kind
            )));
        }
        match self.kind {
            ListKind::Ip => {
                for (i, item) in self.items.iter().enumerate() {
                    if parse_net(item).is_none() {
                        return Err(err(format!(
                            "list \"{}\" item {}: \"{item}\" is not an IP address or CIDR network",
                            self.name,
                            i + 1
                        )));
                    }
                }
            }
            ListKind::String => {
                if let Some(i) = self.items.iter().position(|s| s.is_empty()) {
                    return Err(err(format!(
                        "list \"{}\" item {} is empty",
                        self.name,
                        i + 1
                    )));
                }
            }
        }
        Ok(())
    }

    /// The items of an IP list as networks (addresses become /32 or /128); items that
    /// do not parse are skipped (validation refuses them earlier).
    pub fn networks(&self) -> Vec<IpNet> {
        self.items.iter().filter_map(|s| parse_net(s)).collect()
    }
}

pub use esper_protocol::parse_net;

/// The body of the control plane's `GET /api/v1/policies/active`: the enabled policies,
/// every list, and the revision that changes whenever any of them does.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivePolicies {
    /// Increases with every change to policies or lists; workers reload when it changes.
    pub revision: i64,
    pub policies: Vec<PolicySpec>,
    pub lists: Vec<NamedList>,
    /// The stored version of each policy, by id, recorded in its decisions. A policy
    /// absent here has no version (policies loaded from a file).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub versions: BTreeMap<String, i64>,
    /// The name of an IP list whose addresses no policy ever decides against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowlist: Option<String>,
}

/// Checks that every list a policy refers to exists and is of the kind its use needs.
pub fn validate_references(
    policies: &[PolicySpec],
    lists: &[NamedList],
) -> Result<(), PolicyError> {
    for p in policies {
        for (name, kind) in p.typed_list_refs() {
            let message = match lists.iter().find(|l| l.name == name) {
                None => format!("refers to list \"{name}\", which does not exist"),
                Some(l) if l.kind != kind => format!(
                    "refers to list \"{name}\" as {} list, but it is {} list",
                    article(kind),
                    article(l.kind)
                ),
                Some(_) => continue,
            };
            return Err(PolicyError {
                line: None,
                column: None,
                policy: Some(p.id.clone()),
                message,
            });
        }
    }
    Ok(())
}

fn article(kind: ListKind) -> &'static str {
    match kind {
        ListKind::Ip => "an IP",
        ListKind::String => "a string",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(kind: ListKind, items: &[&str]) -> NamedList {
        NamedList {
            name: "office".into(),
            kind,
            items: items.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn ip_lists_take_addresses_and_networks() {
        let l = list(
            ListKind::Ip,
            &["203.0.113.7", "10.1.2.3/8", "2001:db8::/32"],
        );
        l.validate().unwrap();
        let nets = l.networks();
        assert_eq!(nets[0].to_string(), "203.0.113.7/32");
        assert_eq!(nets[1].to_string(), "10.0.0.0/8");
        let err = list(ListKind::Ip, &["10.0.0.1", "nope"])
            .validate()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "list \"office\" item 2: \"nope\" is not an IP address or CIDR network"
        );
        list(ListKind::String, &["nope"]).validate().unwrap();
        let mut bad = list(ListKind::String, &[]);
        bad.name = "Office".into();
        assert!(bad.validate().is_err());
        let mut allow = list(ListKind::String, &["203.0.113.0/24"]);
        allow.name = ALLOWLIST.into();
        let err = allow.validate().unwrap_err().to_string();
        assert!(err.contains("its kind must be ip, not string"), "{err}");
    }

    #[test]
    fn active_policies_json_round_trips() {
        let json = r#"{"revision":3,"policies":[{"id":"p","window":"1m","threshold":5,"action":"block"}],"lists":[{"name":"office","kind":"ip","items":["10.0.0.0/8"]}],"versions":{"p":2}}"#;
        let a: ActivePolicies = serde_json::from_str(json).unwrap();
        assert_eq!(a.versions["p"], 2);
        let back: ActivePolicies =
            serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(a, back);
    }

    #[test]
    fn references_must_exist_and_be_ip_lists() {
        let p: PolicySpec = serde_json::from_str(
            r#"{"id":"p","window":"1m","threshold":5,"action":"block","match":{"ip_not_in_list":"office"}}"#,
        )
        .unwrap();
        let err = validate_references(std::slice::from_ref(&p), &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "policy \"p\": refers to list \"office\", which does not exist"
        );
        let strings = list(ListKind::String, &["x"]);
        assert!(validate_references(std::slice::from_ref(&p), &[strings]).is_err());
        validate_references(&[p], &[list(ListKind::Ip, &["10.0.0.1"])]).unwrap();
    }
}
