//! `--memprofile`'s recording through a real allocator: this test binary allocates
//! through `Sampling`, as the `esper` binary does, and checks the profile's estimates
//! against what it allocated, held and freed (on another thread) itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use esper::memprofile::{MemProfile, Sampling};
use pprof::protos::Message;

#[global_allocator]
static GLOBAL: Sampling<std::alloc::System> = Sampling(std::alloc::System);

const BLOCK: usize = 4096;
const BLOCKS: usize = 16_384;

#[inline(never)]
fn hold_blocks(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|_| vec![1u8; BLOCK]).collect()
}

#[test]
fn the_profile_estimates_what_is_held_and_names_who_allocated_it() {
    let dir = std::env::temp_dir().join(format!("esper-memprofile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mem.prof");
    // A sample per 16 KiB: about 3,600 of the 16,384 blocks, for estimates within 2%.
    let profile = MemProfile::start(&file, 16 * 1024).unwrap();
    let again = MemProfile::start(&dir.join("other.prof"), 16 * 1024);
    assert!(again.is_err(), "one profile at a time");

    let mut blocks = hold_blocks(BLOCKS);
    // Half of them freed, on another thread.
    let half = blocks.split_off(BLOCKS / 2);
    std::thread::spawn(move || drop(half)).join().unwrap();
    profile.write().unwrap();
    drop(blocks);

    let body = std::fs::read(&file).unwrap();
    let profile = pprof::protos::Profile::decode(body.as_slice()).unwrap();
    let text = |i: i64| profile.string_table[i as usize].as_str();
    let functions = |location: u64| -> Vec<&str> {
        profile.location[location as usize - 1]
            .line
            .iter()
            .map(|l| text(profile.function[l.function_id as usize - 1].name))
            .collect()
    };
    let (mut allocated, mut held) = (0i64, 0i64);
    for sample in &profile.sample {
        let stack: Vec<&str> = sample
            .location_id
            .iter()
            .flat_map(|id| functions(*id))
            .collect();
        if !stack.iter().any(|f| f.contains("hold_blocks")) {
            continue;
        }
        // The stack starts at the code that asked for memory (the function a leaf
        // location belongs to, its outermost line; helpers inlined into it are lines
        // of it), not in the recording or the allocator.
        let leaf = functions(sample.location_id[0]);
        let owner = leaf.last().copied().unwrap_or_default();
        for machinery in ["memprofile::", "backtrace::", "__rust", "alloc::raw_vec::"] {
            assert!(!owner.contains(machinery), "{leaf:?} in {stack:?}");
        }
        allocated += sample.value[1];
        held += sample.value[3];
    }
    let within = |estimate: i64, truth: usize| {
        let truth = truth as f64;
        (estimate as f64 - truth).abs() < truth * 0.1
    };
    let total = BLOCK * BLOCKS;
    assert!(within(allocated, total), "allocated {allocated} of {total}");
    assert!(within(held, total / 2), "held {held} of {}", total / 2);

    // Stopped: another profile may start, and records from nothing.
    let next = MemProfile::start(&dir.join("next.prof"), 16 * 1024).unwrap();
    next.write().unwrap();
    let body = std::fs::read(dir.join("next.prof")).unwrap();
    let next = pprof::protos::Profile::decode(body.as_slice()).unwrap();
    let held: i64 = next.sample.iter().map(|s| s.value[3]).sum();
    assert!(held < (total / 100) as i64, "held {held}");
    std::fs::remove_dir_all(&dir).unwrap();
}
