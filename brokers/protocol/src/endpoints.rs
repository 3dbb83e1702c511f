//! Where a client sends its requests: one service's instances (a base URL, or several
//! comma-separated), which a reload may replace while the clients that use them keep
//! running.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::watch;

/// One setting's instances, as [`Endpoints`] hands them out: a snapshot that a later
/// [`Endpoints::set`] does not change.
#[derive(Debug)]
pub struct Instances {
    /// As given (without a trailing `/`), for messages.
    given: String,
    urls: Vec<String>,
    /// The instances of the setting this one replaced: a request built for one of them
    /// just before the change is sent to this one's instance instead.
    replaced: Vec<String>,
    /// The instance calls go to: the one after the last that failed (always below
    /// `urls.len()`).
    current: AtomicUsize,
}

impl Instances {
    fn parse(url: &str) -> Instances {
        let mut urls: Vec<String> = url
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_string())
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            urls.push(url.trim().trim_end_matches('/').to_string());
        }
        Instances {
            given: url.trim().trim_end_matches('/').to_string(),
            urls,
            replaced: Vec::new(),
            current: AtomicUsize::new(0),
        }
    }

    /// The instances of the setting this one replaced (none for the first).
    pub fn replaced(&self) -> &[String] {
        &self.replaced
    }

    /// The setting as given, for messages.
    pub fn given(&self) -> &str {
        &self.given
    }

    /// Every instance's base URL, in the order given (never empty).
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The index in [`Instances::urls`] of the instance calls go to.
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.urls.len()
    }

    /// The base URL calls go to.
    pub fn current_url(&self) -> &str {
        &self.urls[self.current()]
    }

    /// Later calls go to the instance after `failed`, unless a call has already moved on
    /// from it: calls that fail on one instance at once move on once, and a call that
    /// failed on an instance others have left does not undo their move. `true` when this
    /// call moved.
    pub fn leave(&self, failed: usize) -> bool {
        let n = self.urls.len();
        let failed = failed % n;
        self.current
            .compare_exchange(
                failed,
                (failed + 1) % n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
    }
}

/// The instances of one service, shared by every client given the same `Endpoints`:
/// [`Endpoints::set`] takes effect at each one's next request, and long polls can watch
/// for it ([`Endpoints::subscribe`]) to move at once.
#[derive(Clone, Debug)]
pub struct Endpoints(Arc<watch::Sender<Arc<Instances>>>);

impl Endpoints {
    /// `url` like `http://127.0.0.1:8082`, or several such, comma-separated.
    pub fn new(url: &str) -> Endpoints {
        Endpoints(Arc::new(watch::Sender::new(Arc::new(Instances::parse(
            url,
        )))))
    }

    /// The instances in force.
    pub fn load(&self) -> Arc<Instances> {
        self.0.borrow().clone()
    }

    /// The setting in force as given, for messages.
    pub fn given(&self) -> String {
        self.0.borrow().given.clone()
    }

    /// Replaces the instances; `true` when the list differs from the one before (calls
    /// then start again with its first instance).
    pub fn set(&self, url: &str) -> bool {
        let mut next = Instances::parse(url);
        self.0.send_if_modified(|now| {
            if now.urls == next.urls {
                return false;
            }
            next.replaced = now.urls.clone();
            *now = Arc::new(next);
            true
        })
    }

    /// A receiver that sees each change [`Endpoints::set`] makes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Instances>> {
        self.0.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_split_trimmed_and_replaced_for_every_holder() {
        let a = Endpoints::new(" http://a:1/ , ,http://b:2 ");
        let now = a.load();
        assert_eq!(now.urls(), ["http://a:1", "http://b:2"]);
        assert_eq!(now.given(), "http://a:1/ , ,http://b:2");
        assert!(now.leave(0));
        assert_eq!(now.current_url(), "http://b:2");
        assert!(!now.leave(0), "another call has moved on from it already");
        assert_eq!(now.current_url(), "http://b:2");

        let b = a.clone();
        let seen = a.subscribe();
        assert!(
            !b.set("http://a:1,http://b:2/"),
            "the same list is no change"
        );
        assert!(!seen.has_changed().unwrap_or(true));
        assert!(b.set("http://c:3"));
        assert!(seen.has_changed().unwrap_or(false));
        assert_eq!(a.load().current_url(), "http://c:3");
        assert_eq!(a.given(), "http://c:3");
        // A snapshot taken before keeps its own list.
        assert_eq!(now.current_url(), "http://b:2");
    }
}
