//! Property tests: the bucketed windows agree with a naive list of every event, within
//! the documented precision (an event leaves the count between `window - bucket_ms` and
//! `window` after the newest event), and fixed-window double bursts cannot happen.

use std::collections::HashSet;
use std::time::Duration;

use proptest::prelude::*;

use super::window::{DistinctWindow, Window, WindowParams};

const WINDOW_MS: i64 = 60_000;

fn params() -> WindowParams {
    WindowParams::new(
        Duration::from_millis(WINDOW_MS as u64),
        10.0,
        Duration::from_secs(60),
    )
}

/// Events as (time offset ms, weight); times may go backwards (late events).
fn events() -> impl Strategy<Value = Vec<(i64, f64)>> {
    prop::collection::vec((0i64..300_000, 0.1f64..5.0), 1..200)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn weighted_counts_match_the_naive_reference(evs in events(), base in 0i64..1_000_000_000) {
        let p = params();
        let mut w = Window::default();
        let mut accepted: Vec<(i64, f64)> = Vec::new();
        let mut head = i64::MIN;
        for (offset, weight) in evs {
            let t = base + offset;
            match w.add(p.bucket_of(t), weight, &p) {
                Some(count) => {
                    accepted.push((t, weight));
                    head = head.max(t);
                    let within = |span: i64| -> f64 {
                        accepted.iter().filter(|(at, _)| *at > head - span).map(|(_, w)| w).sum()
                    };
                    let (upper, lower) = (within(WINDOW_MS), within(WINDOW_MS - p.bucket_ms));
                    prop_assert!(count <= upper + 1e-6, "count {count} > naive {upper}");
                    prop_assert!(count >= lower - 1e-6, "count {count} < naive {lower}");
                }
                None => {
                    // Refused only when older than the window behind the newest event.
                    prop_assert!(t <= head - WINDOW_MS + p.bucket_ms, "refused {t}, head {head}");
                }
            }
        }
    }

    #[test]
    fn distinct_counts_match_the_naive_reference(
        evs in prop::collection::vec((0i64..300_000, 0u64..80), 1..200),
    ) {
        let p = params();
        let mut d = DistinctWindow::default();
        let mut accepted: Vec<(i64, u64)> = Vec::new();
        let mut head = i64::MIN;
        for (t, value) in evs {
            if let Some((count, _)) = d.add(value, p.bucket_of(t), &p) {
                accepted.push((t, value));
                head = head.max(t);
                let within = |span: i64| -> usize {
                    accepted.iter().filter(|(at, _)| *at > head - span).map(|(_, v)| v).collect::<HashSet<_>>().len()
                };
                prop_assert!(count as usize <= within(WINDOW_MS));
                prop_assert!(count as usize >= within(WINDOW_MS - p.bucket_ms));
            }
        }
    }

    #[test]
    fn a_rollback_restores_the_count(
        before in prop::collection::vec((0i64..60_000, 0.1f64..5.0), 0..50),
        batch in prop::collection::vec((0i64..60_000, 0.1f64..5.0), 1..50),
    ) {
        let p = params();
        let mut w = Window::default();
        for (t, weight) in &before {
            w.add(p.bucket_of(*t), *weight, &p);
        }
        let start = w.count();
        let mut added = Vec::new();
        for (t, weight) in &batch {
            if w.add(p.bucket_of(*t), *weight, &p).is_some() {
                added.push((p.bucket_of(*t), *weight));
            }
        }
        for (b, weight) in added.iter().rev() {
            w.remove(*b, *weight);
        }
        // Buckets that left the window during the batch are gone for good, so the
        // count can only be lower, never higher.
        prop_assert!(w.count() <= start + 1e-6);
    }
}

#[test]
fn no_double_burst_at_window_edges() {
    // A fixed-window limiter with a limit of 10 a minute lets 9 requests through at
    // the end of one minute and 9 more at the start of the next. The sliding window
    // sees 10 within a minute and fires at the tenth.
    let p = params();
    let mut w = Window::default();
    let minute = 1_000_000 * WINDOW_MS;
    let mut fired_at = None;
    let times = (0..9)
        .map(|i| minute - 900 + i * 100)
        .chain((0..9).map(|i| minute + 100 + i * 100));
    for (n, t) in times.enumerate() {
        let count = w.add(p.bucket_of(t), 1.0, &p).unwrap();
        if fired_at.is_none() && p.reached(count) {
            fired_at = Some(n + 1);
        }
    }
    assert_eq!(fired_at, Some(10));
    assert_eq!(w.count(), 18.0);
}

#[test]
fn late_and_skewed_events() {
    let p = params();
    let mut w = Window::default();
    let t0 = 10_000_000;
    w.add(p.bucket_of(t0), 1.0, &p);
    // A late event still inside the window counts; one beyond it does not.
    assert_eq!(w.add(p.bucket_of(t0 - 30_000), 1.0, &p), Some(2.0));
    assert_eq!(w.add(p.bucket_of(t0 - 61_000), 1.0, &p), None);
    // A jump forward (a clock ahead) expires what is older than the window behind it.
    assert_eq!(w.add(p.bucket_of(t0 + 45_000), 1.0, &p), Some(2.0));
}
