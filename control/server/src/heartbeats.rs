//! Workers and proxies as last heard from: their heartbeats, kept in the control store
//! with the time they arrived, so every control plane instance over one store lists the
//! same fleet and carries drain requests made through any of them. A member not heard
//! from within the timeout is listed as not alive, and forgotten after an hour.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use esper_protocol::control::Seen;
use esper_protocol::{ProxyHeartbeat, WorkerHeartbeat};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::store::{ControlStore, DrainAsk, Heard, MemberBeat, StoreError};

/// Members silent for this long are dropped from listings, and from the store at the
/// next [`Heartbeats::prune`].
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// Most members of one kind kept: a fleet larger than any this control plane serves,
/// small enough that ids made up by a caller cannot grow the store without bound. Past
/// it, [`Heartbeats::prune`] drops those silent longest.
const MAX_MEMBERS: usize = 10_000;

/// What the roster reads of a member's heartbeat.
pub trait Member: Serialize + DeserializeOwned {
    /// The kind's name in the store.
    const KIND: &'static str;
    /// Its id.
    fn id(&self) -> &str;
    /// When this run of the member started: one restarted under the same id is another
    /// run.
    fn run(&self) -> DateTime<Utc>;
    /// Whether it says it is stopping.
    fn stopping(&self) -> bool;
}

impl Member for WorkerHeartbeat {
    const KIND: &'static str = "worker";

    fn id(&self) -> &str {
        &self.worker_id
    }

    fn run(&self) -> DateTime<Utc> {
        self.started_at
    }

    fn stopping(&self) -> bool {
        self.state == "draining"
    }
}

impl Member for ProxyHeartbeat {
    const KIND: &'static str = "proxy";

    fn id(&self) -> &str {
        &self.proxy_id
    }

    fn run(&self) -> DateTime<Utc> {
        self.started_at
    }

    fn stopping(&self) -> bool {
        false
    }
}

/// How often the warning about two runs beating under one id is repeated per id.
const WARN_AGAIN: Duration = Duration::from_secs(600);
/// Ids whose warning time is kept; past it the record starts afresh (ids come from
/// callers, so it must not grow without bound).
const WARNED_IDS: usize = 1_000;

/// One kind of member (workers or proxies), by id.
pub struct Roster<T> {
    store: Arc<dyn ControlStore>,
    timeout: chrono::Duration,
    /// The ids warned of as beating from two runs: two processes sharing an id would
    /// otherwise be warned of at every heartbeat.
    warned: Warned,
    kind: PhantomData<fn() -> T>,
}

/// When each id was last warned of.
#[derive(Default)]
struct Warned(std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>);

impl Warned {
    /// Whether `id` is due a warning at `now` (none within [`WARN_AGAIN`]); records it
    /// if so.
    fn due(&self, id: &str, now: std::time::Instant) -> bool {
        let Ok(mut warned) = self.0.lock() else {
            return true;
        };
        if warned
            .get(id)
            .is_some_and(|at| now.saturating_duration_since(*at) < WARN_AGAIN)
        {
            return false;
        }
        if warned.len() >= WARNED_IDS {
            warned.clear();
        }
        warned.insert(id.to_string(), now);
        true
    }
}

/// Why a member cannot be asked to drain.
#[derive(Debug, PartialEq, Eq)]
pub enum NotDrained {
    /// Never heard from, or forgotten.
    Unknown,
    /// Not heard from within the timeout: no heartbeat would carry the request.
    Silent,
}

fn since(now: DateTime<Utc>, ago: chrono::Duration) -> DateTime<Utc> {
    now.checked_sub_signed(ago)
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fn forget_after() -> chrono::Duration {
    chrono::Duration::from_std(FORGET_AFTER).unwrap_or(chrono::Duration::MAX)
}

impl<T: Member> Roster<T> {
    fn new(store: Arc<dyn ControlStore>, timeout: Duration) -> Roster<T> {
        Roster {
            store,
            timeout: chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX),
            warned: Warned::default(),
            kind: PhantomData,
        }
    }

    /// Records `beat`; `true` when its member is to drain: asked, and not yet stopping.
    /// The answer repeats it at every heartbeat of the run asked, so one lost on the way
    /// loses nothing; a run other than the one asked (the member restarted) is not told.
    /// A heartbeat older than the one recorded is left out (see [`Heard`]).
    pub async fn beat(&self, beat: &T) -> Result<bool, StoreError> {
        let json = serde_json::to_string(beat).map_err(|e| StoreError::Query(e.to_string()))?;
        let now = Utc::now();
        let heard = self
            .store
            .member_beat(&MemberBeat {
                kind: T::KIND,
                id: beat.id(),
                beat: &json,
                run: beat.run(),
                stopping: beat.stopping(),
                at: now,
                alive_since: since(now, self.timeout),
            })
            .await?;
        Ok(match heard {
            Heard::Recorded { drain } => drain,
            Heard::EarlierRun if self.warned.due(beat.id(), std::time::Instant::now()) => {
                tracing::warn!(
                    kind = T::KIND,
                    id = beat.id(),
                    started_at = %beat.run(),
                    "a heartbeat of an earlier run than the one last heard is left out: \
                     two processes share this id, or it was delayed past a restart"
                );
                false
            }
            // Warned of lately, or a beat that arrived after its run said it stops.
            left_out => {
                tracing::debug!(
                    kind = T::KIND,
                    id = beat.id(),
                    why = ?left_out,
                    "a heartbeat older than the one recorded is left out"
                );
                false
            }
        })
    }

    /// Asks `id`'s run last heard from to drain: the answer to its next heartbeat tells
    /// it, through whichever control plane instance it beats to.
    pub async fn drain(&self, id: &str) -> Result<Result<(), NotDrained>, StoreError> {
        let now = Utc::now();
        let asked = self
            .store
            .ask_drain(
                T::KIND,
                id,
                since(now, forget_after()),
                since(now, self.timeout),
            )
            .await?;
        Ok(match asked {
            DrainAsk::Asked => Ok(()),
            DrainAsk::Unknown => Err(NotDrained::Unknown),
            DrainAsk::Silent => Err(NotDrained::Silent),
        })
    }

    /// Every member heard from within the hour, by id, with whether it is alive. A
    /// heartbeat stored by a version whose fields this one does not read is left out.
    pub async fn list(&self) -> Result<Vec<Seen<T>>, StoreError> {
        let now = Utc::now();
        let alive_since = since(now, self.timeout);
        let rows = self
            .store
            .members(T::KIND, since(now, forget_after()))
            .await?;
        let mut listed: Vec<Seen<T>> = rows
            .into_iter()
            .filter_map(|r| match serde_json::from_str::<T>(&r.beat) {
                Ok(beat) => Some(Seen {
                    beat,
                    last_seen: r.seen_at,
                    alive: r.seen_at >= alive_since,
                    drain_asked: r.drain_asked,
                }),
                Err(e) => {
                    tracing::warn!(kind = T::KIND, error = %e, "a stored heartbeat cannot be read; left out");
                    None
                }
            })
            .collect();
        // By id, byte by byte: PostgreSQL's `ORDER BY` would follow its locale.
        listed.sort_by(|a, b| a.beat.id().cmp(b.beat.id()));
        Ok(listed)
    }

    /// How many are alive.
    pub async fn alive(&self) -> Result<u64, StoreError> {
        self.store
            .members_seen(T::KIND, since(Utc::now(), self.timeout))
            .await
    }
}

/// Workers and proxies.
pub struct Heartbeats {
    pub workers: Roster<WorkerHeartbeat>,
    pub proxies: Roster<ProxyHeartbeat>,
    store: Arc<dyn ControlStore>,
}

impl Heartbeats {
    /// Members are alive when heard from within `timeout`.
    pub fn new(store: Arc<dyn ControlStore>, timeout: Duration) -> Heartbeats {
        Heartbeats {
            workers: Roster::new(store.clone(), timeout),
            proxies: Roster::new(store.clone(), timeout),
            store,
        }
    }

    /// Forgets the members silent for an hour, and those past [`MAX_MEMBERS`] of a kind.
    pub async fn prune(&self) -> Result<u64, StoreError> {
        self.store
            .prune_members(since(Utc::now(), forget_after()), MAX_MEMBERS)
            .await
    }
}

impl std::fmt::Debug for Heartbeats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeats").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_warned_of_once_in_a_while() {
        let warned = Warned::default();
        let now = std::time::Instant::now();
        assert!(warned.due("w1", now));
        assert!(!warned.due("w1", now + Duration::from_secs(5)));
        assert!(warned.due("w2", now), "each id apart");
        assert!(warned.due("w1", now + WARN_AGAIN));
        for i in 0..WARNED_IDS {
            warned.due(&format!("x{i}"), now);
        }
        assert!(warned.0.lock().unwrap().len() <= WARNED_IDS, "bounded");
    }
}
