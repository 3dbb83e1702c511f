//! `--memory-limit`: while the worker's resident memory is above the limit its loops
//! stop claiming new batches (the batches in hand finish), and they resume once it is
//! below again. Intake slows down instead of the kernel's OOM killer ending the worker
//! with leased work in hand.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use esper_common::Shutdown;
use prometheus::{IntGauge, Registry};
use serde::{Deserialize, Serialize};

/// How often resident memory is read.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// A size in bytes, written `4G`, `512M`, `64K` (powers of 1024, optional `i`/`B`
/// suffix as in `4GiB`) or a plain number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<ByteSize, String> {
        let t = s.trim();
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(digits);
        let bad = || format!("`{s}` is not a size (write e.g. 4G, 512M or a number of bytes)");
        let n: u64 = number.parse().map_err(|_| bad())?;
        let unit = unit.trim().to_ascii_uppercase();
        let shift = match unit.trim_end_matches('B').trim_end_matches('I') {
            "" => 0,
            "K" => 10,
            "M" => 20,
            "G" => 30,
            "T" => 40,
            _ => return Err(bad()),
        };
        n.checked_mul(1u64 << shift).map(ByteSize).ok_or_else(bad)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if self.0 >= 1 << shift && self.0.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// This process's resident memory, from `/proc/self/status` (`None` where there is no
/// procfs).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    kb.checked_mul(1024)
}

/// The limit, the last reading, and whether claiming is paused.
#[derive(Debug)]
pub(crate) struct MemoryGuard {
    limit: ByteSize,
    resident: AtomicU64,
    over: AtomicBool,
    resident_gauge: IntGauge,
    paused_gauge: IntGauge,
}

impl MemoryGuard {
    pub fn new(
        limit: ByteSize,
        registry: &Registry,
    ) -> Result<Arc<MemoryGuard>, prometheus::Error> {
        let resident_gauge = IntGauge::new(
            "esper_worker_resident_memory_bytes",
            "Resident memory of the worker, as --memory-limit compares it",
        )?;
        let paused_gauge = IntGauge::new(
            "esper_worker_claims_paused",
            "1 while resident memory is above --memory-limit and no new batch is claimed",
        )?;
        registry.register(Box::new(resident_gauge.clone()))?;
        registry.register(Box::new(paused_gauge.clone()))?;
        let guard = Arc::new(MemoryGuard {
            limit,
            resident: AtomicU64::new(0),
            over: AtomicBool::new(false),
            resident_gauge,
            paused_gauge,
        });
        guard.sample();
        Ok(guard)
    }

    /// Is claiming paused?
    pub fn over(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// `/healthz/detailed`'s line about it.
    pub fn describe(&self) -> String {
        let used = ByteSize(self.resident.load(Ordering::Relaxed));
        let mib = |b: ByteSize| b.0 as f64 / f64::from(1 << 20);
        if self.over() {
            format!(
                "{:.0} MiB resident, above the {} limit: claiming paused",
                mib(used),
                self.limit
            )
        } else {
            format!("{:.0} MiB resident of a {} limit", mib(used), self.limit)
        }
    }

    fn sample(&self) {
        let Some(used) = resident_bytes() else {
            return;
        };
        self.resident.store(used, Ordering::Relaxed);
        self.resident_gauge
            .set(i64::try_from(used).unwrap_or(i64::MAX));
        let over = used > self.limit.0;
        if self.over.swap(over, Ordering::Relaxed) != over {
            if over {
                tracing::warn!(resident = used, limit = %self.limit, "memory above the limit: no new batches are claimed until it is below");
            } else {
                tracing::info!(resident = used, limit = %self.limit, "memory below the limit again: claiming resumes");
            }
        }
        self.paused_gauge.set(i64::from(over));
    }

    /// Reads resident memory until shutdown.
    pub async fn watch(self: Arc<Self>, shutdown: Shutdown) {
        while !shutdown.is_triggered() {
            self.sample();
            shutdown.sleep(SAMPLE_EVERY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units_and_print_back() {
        for (text, bytes) in [
            ("4G", 4u64 << 30),
            ("4GiB", 4 << 30),
            ("4gb", 4 << 30),
            ("512M", 512 << 20),
            ("64k", 64 << 10),
            ("1048576", 1 << 20),
            (" 2T ", 2 << 40),
        ] {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
        for bad in ["", "G", "4X", "-1", "1.5G", "99999999999T"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
        assert_eq!(ByteSize(4 << 30).to_string(), "4G");
        assert_eq!(ByteSize(1536 << 20).to_string(), "1536M");
        assert_eq!(ByteSize(1000).to_string(), "1000");
        let toml: ByteSize = toml::from_str::<toml::Value>("x = \"4G\"").unwrap()["x"]
            .clone()
            .try_into()
            .unwrap();
        assert_eq!(toml, ByteSize(4 << 30));
    }

    #[test]
    fn resident_memory_is_read_and_compared() {
        let used = resident_bytes().expect("procfs");
        assert!(used > 1 << 20, "{used}");
        let low = MemoryGuard::new(ByteSize(1), &Registry::new()).unwrap();
        assert!(low.over());
        assert!(
            low.describe().ends_with("claiming paused"),
            "{}",
            low.describe()
        );
        let high = MemoryGuard::new(ByteSize(1 << 50), &Registry::new()).unwrap();
        assert!(!high.over());
    }
}
