//! `--memprofile FILE`: a sampling heap profile of a service, written as a pprof profile
//! when it stops, for `go tool pprof FILE` (or any pprof viewer), as Go's `-memprofile`.
//!
//! On average one allocation in every [`DEFAULT_RATE`] bytes allocated (or the rate given)
//! is recorded with its call
//! stack (the gaps between samples are drawn from an exponential distribution, so every
//! byte is as likely to be sampled); the profile estimates from those, per call stack,
//! what was allocated (`alloc_objects`, `alloc_space`) and what is still held when the
//! profile is written (`inuse_objects`, `inuse_space`, the default view).
//!
//! Recording happens in the global allocator, [`Sampling`], which wraps the binary's
//! allocator: while no profile runs it costs one relaxed atomic load per allocation and
//! per free. While one runs, a free looks its address up only when a sampled allocation
//! lives in the same one of [`BUCKETS`] address buckets.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};

use anyhow::Context;
use pprof::protos::{self, Message};

/// Mean bytes allocated between two samples unless told otherwise (Go's default
/// `MemProfileRate`).
pub const DEFAULT_RATE: u64 = 512 * 1024;
/// Deepest call stack recorded.
const MAX_FRAMES: usize = 64;
/// Address buckets counting live sampled allocations.
const BUCKETS: usize = 1 << 16;

/// True while a profile runs.
static ON: AtomicBool = AtomicBool::new(false);
/// Mean bytes between samples of the profile running.
static RATE: AtomicU64 = AtomicU64::new(DEFAULT_RATE);
/// Live sampled allocations per address bucket.
static LIVE: [AtomicU32; BUCKETS] = [const { AtomicU32::new(0) }; BUCKETS];
/// What is recorded; `None` while no profile runs.
static STATE: Mutex<Option<State>> = Mutex::new(None);

thread_local! {
    // Const-initialised and without destructors, so the allocator can use them at any
    // point of a thread's life.
    /// Bytes this thread allocates before its next sample; 0 until first drawn.
    static UNTIL: Cell<i64> = const { Cell::new(0) };
    /// Set while this thread records: its own allocations then are not sampled.
    static BUSY: Cell<bool> = const { Cell::new(false) };
    /// State of this thread's random generator (xorshift64*), seeded on first use.
    static SEED: Cell<u64> = const { Cell::new(0) };
}

/// The binary's allocator `A`, recording samples while a profile runs.
pub struct Sampling<A>(pub A);

// SAFETY: every call goes to `A` unchanged; the recording around it neither touches the
// memory handed out nor changes what `A` returns.
//
// Each method checks `ON` before calling `A`, so with no profile running the call is
// the method's last act (a tail call): the wrapper then costs the check alone.
#[allow(unsafe_code)]
unsafe impl<A: GlobalAlloc> GlobalAlloc for Sampling<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !ON.load(Relaxed) {
            // SAFETY: the caller's contract, passed on.
            return unsafe { self.0.alloc(layout) };
        }
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { self.0.alloc(layout) };
        allocated(p, layout.size());
        p
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !ON.load(Relaxed) {
            // SAFETY: the caller's contract, passed on.
            return unsafe { self.0.alloc_zeroed(layout) };
        }
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { self.0.alloc_zeroed(layout) };
        allocated(p, layout.size());
        p
    }

    #[inline]
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        if ON.load(Relaxed) {
            freed(p);
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { self.0.dealloc(p, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !ON.load(Relaxed) {
            // SAFETY: the caller's contract, passed on.
            return unsafe { self.0.realloc(p, layout, new_size) };
        }
        // Recorded as a free of the old block and an allocation of the new one (before
        // the call: once it returns, another thread may be given the old address). A
        // failed call leaves the old block allocated but unrecorded.
        freed(p);
        // SAFETY: the caller's contract, passed on.
        let q = unsafe { self.0.realloc(p, layout, new_size) };
        allocated(q, new_size);
        q
    }
}

fn bucket(addr: usize) -> usize {
    // Allocations are at least 8-aligned; mixing spreads neighbouring blocks.
    ((addr >> 3).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 48) % BUCKETS
}

/// Counts `size` bytes allocated at `p` against this thread's sampling gap.
#[inline(never)]
fn allocated(p: *mut u8, size: usize) {
    if p.is_null() {
        return;
    }
    let size = i64::try_from(size).unwrap_or(i64::MAX);
    let sample = UNTIL
        .try_with(|until| {
            // A thread's first gap is drawn like every other: sampling its first
            // allocation always would weigh it as if it had been drawn by chance.
            let gap = match until.get() {
                0 => next_gap(),
                gap => gap,
            };
            let left = gap.saturating_sub(size);
            if left > 0 {
                until.set(left);
                false
            } else {
                until.set(next_gap());
                true
            }
        })
        .unwrap_or(false);
    if sample {
        record(p as usize, size);
    }
}

/// Forgets the block at `p` if it was sampled.
#[inline(never)]
fn freed(p: *mut u8) {
    let addr = p as usize;
    if LIVE[bucket(addr)].load(Relaxed) == 0 {
        return;
    }
    busy(|| {
        if let Some(state) = lock().as_mut()
            && state.forget(addr)
        {
            LIVE[bucket(addr)].fetch_sub(1, Relaxed);
        }
    });
}

/// Records a sampled allocation of `size` bytes at `addr` with the current call stack.
fn record(addr: usize, size: i64) {
    busy(|| {
        let mut frames = [0usize; MAX_FRAMES];
        let mut n = 0;
        // Unsynchronised, as std's backtraces and the CPU profiler's signal handler
        // unwind: `trace` would take a global lock (held while anything symbolises) from
        // inside the allocator, and a poisoned one panics there.
        unwind(|frame| {
            let ip = frame.ip() as usize;
            // The outermost frame of a thread may come as address 0.
            if ip == 0 {
                return false;
            }
            frames[n] = ip;
            n += 1;
            n < MAX_FRAMES
        });
        if let Some(state) = lock().as_mut()
            && state.add(addr, size, &frames[..n])
        {
            LIVE[bucket(addr)].fetch_add(1, Relaxed);
        }
    });
}

/// Walks the current thread's stack, innermost frame first.
#[allow(unsafe_code)]
fn unwind(f: impl FnMut(&backtrace::Frame) -> bool) {
    // SAFETY: `trace_unsynchronized` is unsafe only because several threads unwinding
    // at once is not safe on every platform; libgcc's unwinder, the one used on Linux,
    // is thread-safe.
    unsafe { backtrace::trace_unsynchronized(f) }
}

/// Runs `f` unless this thread is already recording (then its allocations, those of the
/// recording itself, are not recorded).
fn busy(f: impl FnOnce()) {
    if BUSY.try_with(|b| b.replace(true)) != Ok(false) {
        return;
    }
    f();
    let _ = BUSY.try_with(|b| b.set(false));
}

fn lock() -> std::sync::MutexGuard<'static, Option<State>> {
    STATE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Bytes until the next sample: exponentially distributed with mean `RATE`.
fn next_gap() -> i64 {
    let x = SEED
        .try_with(|seed| {
            let mut x = seed.get();
            if x == 0 {
                // Any non-zero start differing between threads: this slot's address.
                x = (seed as *const Cell<u64> as u64) | 1;
            }
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            seed.set(x);
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        })
        .unwrap_or(1);
    // Uniform in (0, 1].
    let u = ((x >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    (-u.ln() * RATE.load(Relaxed) as f64) as i64 + 1
}

/// Sampled allocations, raw: scaled to estimates when the profile is written.
#[derive(Default)]
struct State {
    /// Live sampled blocks: address -> (stack, size).
    live: HashMap<usize, (usize, i64)>,
    /// Distinct call stacks, and their index in `totals`.
    stacks: HashMap<Box<[usize]>, usize>,
    totals: Vec<Totals>,
}

/// Per call stack: samples taken and bytes they held, all of them and those still live.
#[derive(Default, Clone)]
struct Totals {
    frames: Box<[usize]>,
    allocs: i64,
    alloc_bytes: i64,
    inuse: i64,
    inuse_bytes: i64,
}

impl State {
    /// `true` when `addr` was not live already.
    fn add(&mut self, addr: usize, size: i64, frames: &[usize]) -> bool {
        let stack = match self.stacks.get(frames) {
            Some(&i) => i,
            None => {
                let i = self.totals.len();
                self.stacks.insert(frames.into(), i);
                self.totals.push(Totals {
                    frames: frames.into(),
                    ..Totals::default()
                });
                i
            }
        };
        let t = &mut self.totals[stack];
        t.allocs += 1;
        t.alloc_bytes = t.alloc_bytes.saturating_add(size);
        t.inuse += 1;
        t.inuse_bytes = t.inuse_bytes.saturating_add(size);
        // A block freed without being seen (while this thread recorded) may come back.
        match self.live.insert(addr, (stack, size)) {
            Some((old, old_size)) => {
                let t = &mut self.totals[old];
                t.inuse -= 1;
                t.inuse_bytes -= old_size;
                false
            }
            None => true,
        }
    }

    /// `true` when `addr` was a live sampled block.
    fn forget(&mut self, addr: usize) -> bool {
        let Some((stack, size)) = self.live.remove(&addr) else {
            return false;
        };
        let t = &mut self.totals[stack];
        t.inuse -= 1;
        t.inuse_bytes -= size;
        true
    }
}

/// Estimates of objects and bytes from `count` samples holding `bytes`, as Go's
/// `scaleHeapSample`: a block of `size` bytes is sampled with probability
/// 1 - exp(-size / rate).
fn scale(count: i64, bytes: i64, rate: u64) -> (i64, i64) {
    if count <= 0 || bytes <= 0 {
        return (0, 0);
    }
    let average = bytes as f64 / count as f64;
    let factor = 1.0 / (1.0 - (-average / rate as f64).exp());
    (
        (count as f64 * factor) as i64,
        (bytes as f64 * factor) as i64,
    )
}

/// A running heap profile; [`MemProfile::write`] stops it and writes the file.
pub struct MemProfile {
    path: PathBuf,
    started: std::time::SystemTime,
}

impl MemProfile {
    /// Starts sampling, one allocation per `rate` bytes on average. The file is created
    /// now, so a path that cannot be written is an error at start rather than after
    /// hours of running. One profile runs at a time.
    pub fn start(path: &Path, rate: u64) -> anyhow::Result<MemProfile> {
        anyhow::ensure!(rate > 0, "the heap profile's sampling rate must be above 0");
        std::fs::File::create(path)
            .with_context(|| format!("cannot write the heap profile to {}", path.display()))?;
        // Nothing allocates while the lock is held here: an allocation sampled now would
        // wait on this same lock.
        let running = {
            let mut state = lock();
            let running = state.is_some();
            if !running {
                RATE.store(rate, Relaxed);
                *state = Some(State::default());
                ON.store(true, Relaxed);
            }
            running
        };
        anyhow::ensure!(!running, "a heap profile is already running");
        tracing::info!(file = %path.display(), rate, "heap profile started");
        Ok(MemProfile {
            path: path.to_path_buf(),
            started: std::time::SystemTime::now(),
        })
    }

    /// Stops sampling; [`write`](Self::write) does too. Recording nothing more, before
    /// anything else is written (a CPU profile's report allocates as it is built).
    pub fn stop(&self) {
        ON.store(false, Relaxed);
    }

    /// Stops sampling and writes the profile (pprof's protobuf format).
    pub fn write(self) -> anyhow::Result<()> {
        self.stop();
        // As in `start`, nothing allocates under the lock.
        let state = {
            let mut held = lock();
            // Frees no longer look anything up; the next profile starts from zero.
            for live in &LIVE {
                live.store(0, Relaxed);
            }
            held.take()
        };
        // Dropped outside the lock: its frees, with sampling off, look nothing up.
        let state = state.unwrap_or_default();
        let profile = encode(&state, self.started, RATE.load(Relaxed));
        std::fs::write(&self.path, profile.encode_to_vec())
            .with_context(|| format!("cannot write the heap profile to {}", self.path.display()))?;
        tracing::info!(file = %self.path.display(), "heap profile written");
        Ok(())
    }
}

/// Builds the pprof profile of what `state` recorded, symbolising each address.
fn encode(state: &State, started: std::time::SystemTime, rate: u64) -> protos::Profile {
    let mut b = Builder::default();
    b.string("");
    let value_type = |b: &mut Builder, ty: &str, unit: &str| protos::ValueType {
        ty: b.string(ty),
        unit: b.string(unit),
    };
    let sample_type = vec![
        value_type(&mut b, "alloc_objects", "count"),
        value_type(&mut b, "alloc_space", "bytes"),
        value_type(&mut b, "inuse_objects", "count"),
        value_type(&mut b, "inuse_space", "bytes"),
    ];
    let period_type = Some(value_type(&mut b, "space", "bytes"));
    let mut samples = Vec::new();
    for t in &state.totals {
        let locations: Vec<u64> = t.frames.iter().map(|&ip| b.location(ip)).collect();
        // Every stack starts in the recording and the allocator; the profile starts at
        // the code that asked for memory: past the global allocator's entry point, and
        // past the collections' allocation helpers that called it.
        let mut first = locations
            .iter()
            .rposition(|id| b.kind(*id) == Frame::Entry)
            .map_or(0, |i| i + 1);
        while locations
            .get(first)
            .is_some_and(|id| b.kind(*id) == Frame::Helper)
        {
            first += 1;
        }
        if first >= locations.len() {
            first = 0;
        }
        let (allocs, alloc_bytes) = scale(t.allocs, t.alloc_bytes, rate);
        let (inuse, inuse_bytes) = scale(t.inuse, t.inuse_bytes, rate);
        samples.push(protos::Sample {
            location_id: locations[first..].to_vec(),
            value: vec![allocs, alloc_bytes, inuse, inuse_bytes],
            label: Vec::new(),
        });
    }
    let started_nanos = started
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    let duration_nanos = started
        .elapsed()
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    let default_sample_type = b.string("inuse_space");
    protos::Profile {
        sample_type,
        sample: samples,
        location: b.locations,
        function: b.functions,
        string_table: b.strings,
        time_nanos: started_nanos,
        duration_nanos,
        period_type,
        period: i64::try_from(rate).unwrap_or(i64::MAX),
        default_sample_type,
        ..protos::Profile::default()
    }
}

/// Interns strings, functions and locations for [`encode`].
#[derive(Default)]
struct Builder {
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    functions: Vec<protos::Function>,
    function_ids: HashMap<(String, String), u64>,
    locations: Vec<protos::Location>,
    location_ids: HashMap<usize, u64>,
    /// What each location's outermost function is, by location id - 1.
    kinds: Vec<Frame>,
}

impl Builder {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&id) = self.string_ids.get(s) {
            return id;
        }
        let id = self.strings.len() as i64;
        self.strings.push(s.to_string());
        self.string_ids.insert(s.to_string(), id);
        id
    }

    fn function(&mut self, name: String, file: String) -> u64 {
        if let Some(&id) = self.function_ids.get(&(name.clone(), file.clone())) {
            return id;
        }
        let id = self.functions.len() as u64 + 1;
        let (name_id, file_id) = (self.string(&name), self.string(&file));
        self.functions.push(protos::Function {
            id,
            name: name_id,
            system_name: name_id,
            filename: file_id,
            start_line: 0,
        });
        self.function_ids.insert((name, file), id);
        id
    }

    /// The location of `ip`, with a line per function inlined there (innermost first).
    fn location(&mut self, ip: usize) -> u64 {
        if let Some(&id) = self.location_ids.get(&ip) {
            return id;
        }
        let id = self.locations.len() as u64 + 1;
        let mut symbols = Vec::new();
        backtrace::resolve(ip as *mut std::ffi::c_void, |symbol| {
            let name = symbol
                .name()
                .map_or_else(|| format!("{ip:#x}"), |n| format!("{n:#}"));
            let file = symbol
                .filename()
                .map_or_else(String::new, |f| f.display().to_string());
            symbols.push((name, file, symbol.lineno().unwrap_or(0)));
        });
        if symbols.is_empty() {
            symbols.push((format!("{ip:#x}"), String::new(), 0));
        }
        // The outermost function of the location decides: allocator code inlined into a
        // caller leaves the caller's location the caller's.
        let kind = symbols
            .last()
            .map_or(Frame::Caller, |(name, _, _)| Frame::of(name));
        let line = symbols
            .into_iter()
            .map(|(name, file, line)| protos::Line {
                function_id: self.function(name, file),
                line: i64::from(line),
            })
            .collect();
        self.locations.push(protos::Location {
            id,
            mapping_id: 0,
            address: ip as u64,
            line,
            is_folded: false,
        });
        self.location_ids.insert(ip, id);
        self.kinds.push(kind);
        id
    }

    fn kind(&self, location: u64) -> Frame {
        self.kinds
            .get(location as usize - 1)
            .copied()
            .unwrap_or(Frame::Caller)
    }
}

/// The part a function plays in a sampled allocation's stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    /// The global allocator's entry point (the recording runs inside it).
    Entry,
    /// A collection's allocation helper, between its caller and the entry point.
    Helper,
    /// Code that asked for memory, and its callers.
    Caller,
}

impl Frame {
    fn of(function: &str) -> Frame {
        const ENTRY: [&str; 4] = [
            "__rust_alloc",
            "__rust_alloc_zeroed",
            "__rust_realloc",
            "as core::alloc::global::GlobalAlloc>::",
        ];
        const HELPERS: [&str; 5] = [
            "alloc::alloc::",
            "<alloc::alloc::Global",
            "alloc::raw_vec::",
            "<alloc::raw_vec::",
            "alloc::boxed::box_new",
        ];
        if ENTRY.iter().any(|e| function.contains(e)) {
            Frame::Entry
        } else if HELPERS.iter().any(|h| function.starts_with(h)) {
            Frame::Helper
        } else {
            Frame::Caller
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_undo_the_sampling_probability() {
        let rate = DEFAULT_RATE;
        // A block of `rate` bytes is sampled with probability 1 - 1/e.
        let (n, bytes) = scale(1, rate as i64, rate);
        let factor = 1.0 / (1.0 - (-1.0f64).exp());
        assert_eq!(n, factor as i64);
        assert_eq!(bytes, (rate as f64 * factor) as i64);
        // Large blocks are nearly always sampled: counted about once.
        let large = 2 * 64 * rate as i64;
        assert_eq!(scale(2, large, rate), (2, large));
        assert_eq!(scale(0, 0, rate), (0, 0));
    }

    #[test]
    fn gaps_average_the_rate() {
        let n = 20_000;
        let total: i64 = (0..n).map(|_| next_gap()).sum();
        let mean = total as f64 / n as f64;
        assert!(
            (mean - DEFAULT_RATE as f64).abs() < DEFAULT_RATE as f64 * 0.05,
            "mean gap {mean}"
        );
    }

    #[test]
    fn live_blocks_are_counted_until_freed() {
        let mut state = State::default();
        assert!(state.add(0x1000, 100, &[1, 2, 3]));
        assert!(state.add(0x2000, 50, &[1, 2, 3]));
        assert!(state.add(0x3000, 10, &[4]));
        assert!(state.forget(0x2000));
        assert!(!state.forget(0x2000), "forgotten once");
        assert!(!state.forget(0x9000), "never sampled");
        let t = &state.totals[0];
        assert_eq!(
            (t.allocs, t.alloc_bytes, t.inuse, t.inuse_bytes),
            (2, 150, 1, 100)
        );
        let t = &state.totals[1];
        assert_eq!((t.allocs, t.inuse_bytes), (1, 10));
        // An address reused before its free was seen replaces the old block.
        assert!(!state.add(0x3000, 20, &[1, 2, 3]));
        assert_eq!(state.totals[1].inuse, 0);
        assert_eq!(state.totals[0].inuse_bytes, 120);
    }

    #[test]
    fn a_profile_names_the_functions_of_its_stacks() {
        let mut frames = Vec::new();
        backtrace::trace(|f| {
            frames.push(f.ip() as usize);
            frames.len() < 16
        });
        let mut state = State::default();
        state.add(0x1000, 4096, &frames);
        let profile = encode(&state, std::time::SystemTime::now(), DEFAULT_RATE);
        let names: Vec<&str> = profile
            .sample_type
            .iter()
            .map(|t| profile.string_table[t.ty as usize].as_str())
            .collect();
        assert_eq!(
            names,
            [
                "alloc_objects",
                "alloc_space",
                "inuse_objects",
                "inuse_space"
            ]
        );
        assert_eq!(
            profile.string_table[profile.default_sample_type as usize],
            "inuse_space"
        );
        assert_eq!(profile.sample.len(), 1);
        let sample = &profile.sample[0];
        assert!(sample.value[3] >= 4096, "{:?}", sample.value);
        let functions: Vec<&str> = sample
            .location_id
            .iter()
            .flat_map(|id| &profile.location[*id as usize - 1].line)
            .map(|l| {
                let f = &profile.function[l.function_id as usize - 1];
                profile.string_table[f.name as usize].as_str()
            })
            .collect();
        assert!(
            functions
                .iter()
                .any(|f| f.contains("a_profile_names_the_functions_of_its_stacks")),
            "{functions:?}"
        );
    }
}
