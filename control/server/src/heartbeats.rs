//! Workers and proxies as last heard from: their heartbeats, kept in memory with the time
//! they arrived. A member not heard from within the timeout is listed as not alive, and
//! forgotten after an hour.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use esper_protocol::control::Seen;
use esper_protocol::{ProxyHeartbeat, WorkerHeartbeat};
use parking_lot::RwLock;

/// Members silent for this long are dropped from listings.
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// Most members of one kind kept: a fleet larger than any this control plane serves,
/// small enough that ids made up by a caller cannot grow its memory without bound. A
/// new member beyond it takes the place of the one silent longest.
const MAX_MEMBERS: usize = 10_000;

/// What the roster reads of a member's heartbeat.
pub trait Member {
    /// When this run of the member started: one restarted under the same id is another
    /// run.
    fn run(&self) -> DateTime<Utc>;
    /// Whether it says it is stopping.
    fn stopping(&self) -> bool;
}

impl Member for WorkerHeartbeat {
    fn run(&self) -> DateTime<Utc> {
        self.started_at
    }

    fn stopping(&self) -> bool {
        self.state == "draining"
    }
}

impl Member for ProxyHeartbeat {
    fn run(&self) -> DateTime<Utc> {
        self.started_at
    }

    fn stopping(&self) -> bool {
        false
    }
}

/// One kind of member (workers or proxies), by id.
#[derive(Debug)]
pub struct Roster<T> {
    timeout: chrono::Duration,
    members: RwLock<HashMap<String, (T, DateTime<Utc>)>>,
    /// Members asked to drain, with the run that was asked: told so by the answer to
    /// every heartbeat of that run until one says it is stopping, so an answer lost on
    /// the way loses nothing.
    drains: RwLock<HashMap<String, DateTime<Utc>>>,
}

/// Why a member cannot be asked to drain.
#[derive(Debug, PartialEq, Eq)]
pub enum NotDrained {
    /// Never heard from, or forgotten.
    Unknown,
    /// Not heard from within the timeout: no heartbeat would carry the request.
    Silent,
}

impl<T: Clone + Member> Roster<T> {
    fn new(timeout: Duration) -> Roster<T> {
        Roster {
            timeout: chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX),
            members: RwLock::new(HashMap::new()),
            drains: RwLock::new(HashMap::new()),
        }
    }

    /// Records a heartbeat from `id`; `true` when it is to drain: asked, and not yet
    /// stopping. A run other than the one asked (the member restarted) is not told.
    pub fn beat(&self, id: &str, beat: T) -> bool {
        let (run, stopping) = (beat.run(), beat.stopping());
        let now = Utc::now();
        let forget = chrono::Duration::from_std(FORGET_AFTER).unwrap_or(chrono::Duration::MAX);
        let mut members = self.members.write();
        members.retain(|_, (_, seen)| now - *seen < forget);
        if members.len() >= MAX_MEMBERS && !members.contains_key(id) {
            let stalest = members
                .iter()
                .min_by_key(|(_, (_, seen))| *seen)
                .map(|(k, _)| k.clone());
            if let Some(k) = stalest {
                members.remove(&k);
            }
        }
        members.insert(id.to_string(), (beat, now));
        let mut drains = self.drains.write();
        drains.retain(|k, _| members.contains_key(k));
        match drains.get(id) {
            Some(asked) if *asked == run && !stopping => true,
            Some(_) => {
                drains.remove(id);
                false
            }
            None => false,
        }
    }

    /// Asks `id`'s run last heard from to drain: the answer to its next heartbeat tells
    /// it.
    pub fn drain(&self, id: &str) -> Result<(), NotDrained> {
        let now = Utc::now();
        let run = match self.members.read().get(id) {
            None => return Err(NotDrained::Unknown),
            Some((_, seen)) if now - *seen > self.timeout => return Err(NotDrained::Silent),
            Some((beat, _)) => beat.run(),
        };
        self.drains.write().insert(id.to_string(), run);
        Ok(())
    }

    /// Every member, by id, with whether it is alive.
    pub fn list(&self) -> Vec<Seen<T>> {
        let now = Utc::now();
        let mut out: Vec<(String, Seen<T>)> = self
            .members
            .read()
            .iter()
            .map(|(id, (beat, seen))| {
                (
                    id.clone(),
                    Seen {
                        beat: beat.clone(),
                        last_seen: *seen,
                        alive: now - *seen <= self.timeout,
                    },
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.into_iter().map(|(_, s)| s).collect()
    }

    /// How many are alive.
    pub fn alive(&self) -> usize {
        let now = Utc::now();
        self.members
            .read()
            .values()
            .filter(|(_, seen)| now - *seen <= self.timeout)
            .count()
    }
}

/// Workers and proxies.
#[derive(Debug)]
pub struct Heartbeats {
    pub workers: Roster<WorkerHeartbeat>,
    pub proxies: Roster<ProxyHeartbeat>,
}

impl Heartbeats {
    /// Members are alive when heard from within `timeout`.
    pub fn new(timeout: Duration) -> Heartbeats {
        Heartbeats {
            workers: Roster::new(timeout),
            proxies: Roster::new(timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Member for u32 {
        fn run(&self) -> DateTime<Utc> {
            DateTime::UNIX_EPOCH
        }

        fn stopping(&self) -> bool {
            false
        }
    }

    /// A heartbeat of run `.0` (its start, in seconds), stopping when `.1`.
    #[derive(Clone, Debug)]
    struct Beat(i64, bool);

    impl Member for Beat {
        fn run(&self) -> DateTime<Utc> {
            DateTime::from_timestamp(self.0, 0).unwrap_or_default()
        }

        fn stopping(&self) -> bool {
            self.1
        }
    }

    #[test]
    fn a_drain_is_told_until_the_run_asked_says_it_is_stopping() {
        let r: Roster<Beat> = Roster::new(Duration::from_secs(15));
        assert_eq!(r.drain("a"), Err(NotDrained::Unknown));
        assert!(!r.beat("a", Beat(1, false)));
        assert_eq!(r.drain("a"), Ok(()));
        assert!(!r.beat("b", Beat(1, false)), "only the one asked");
        assert!(r.beat("a", Beat(1, false)));
        assert!(
            r.beat("a", Beat(1, false)),
            "told again: the answer before may not have arrived"
        );
        assert!(!r.beat("a", Beat(1, true)), "it heard");
        assert!(!r.beat("a", Beat(1, false)), "asked once, heard once");

        // A member restarted under the same id is not the run that was asked.
        assert_eq!(r.drain("a"), Ok(()));
        assert!(!r.beat("a", Beat(2, false)));
        assert!(
            !r.beat("a", Beat(2, false)),
            "the request went with its run"
        );

        let silent: Roster<u32> = Roster::new(Duration::ZERO);
        silent.beat("a", 1);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(silent.drain("a"), Err(NotDrained::Silent));
    }

    #[test]
    fn a_drain_asked_of_a_member_that_went_away_is_forgotten_with_it() {
        let r: Roster<u32> = Roster::new(Duration::from_secs(15));
        r.beat("a", 1);
        assert_eq!(r.drain("a"), Ok(()));
        r.members.write().get_mut("a").unwrap().1 = Utc::now() - chrono::Duration::hours(2);
        r.beat("b", 1);
        assert!(r.drains.read().is_empty());
    }

    #[test]
    fn the_roster_is_bounded_by_forgetting_the_stalest() {
        let r: Roster<u32> = Roster::new(Duration::from_secs(15));
        for i in 0..MAX_MEMBERS {
            r.beat(&format!("m{i}"), 0);
        }
        r.beat("m0", 1);
        r.beat("newcomer", 2);
        let ids: std::collections::HashSet<String> = r.members.read().keys().cloned().collect();
        assert_eq!(ids.len(), MAX_MEMBERS);
        assert!(ids.contains("newcomer") && ids.contains("m0"));
        assert!(!ids.contains("m1"), "m1 was silent longest");
    }

    #[test]
    fn members_go_stale_after_the_timeout() {
        let r: Roster<u32> = Roster::new(Duration::from_secs(15));
        r.beat("b", 2);
        r.beat("a", 1);
        r.beat("a", 3);
        let list = r.list();
        assert_eq!(list.iter().map(|s| s.beat).collect::<Vec<_>>(), [3, 2]);
        assert!(list.iter().all(|s| s.alive));
        assert_eq!(r.alive(), 2);
        r.members.write().get_mut("a").unwrap().1 = Utc::now() - chrono::Duration::seconds(16);
        assert_eq!(r.alive(), 1);
        assert!(!r.list()[0].alive);
        r.members.write().get_mut("a").unwrap().1 = Utc::now() - chrono::Duration::hours(2);
        r.beat("c", 4);
        assert_eq!(r.list().len(), 2, "long-silent members are forgotten");
    }
}
