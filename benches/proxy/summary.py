"""Tables of the proxy benchmarks' results (run.sh and variants.sh).

    python3 summary.py throughput results.csv   # target,req_per_s,p50,p99,cpu_us_per_req[,user_us_per_req,sys_us_per_req]
    python3 summary.py latency latency.csv      # target,sent,errors,late,p50_us,...,max_us

Rows are in the order they were measured; a target's i-th row is its i-th repetition.
Besides medians, each target is paired with bare Pingora by repetition: its i-th run
against bare Pingora's i-th run, moments apart, so the machine's slow drifts (other
work on the host, frequency, the state of its caches) cancel out of the comparison.
The interval is a bootstrap of the median of those pairs (fixed seed: a rerun on the
same data prints the same).
"""

import csv
import random
import statistics
import sys

ORDER = ["direct", "bare-pingora", "bare-pingora-mimalloc", "bare-pingora-idle-timer",
         "esper-empty", "esper-loaded", "esper-event-sink", "esper-no-headers", "nginx", "haproxy"]
NAMES = {"bare-pingora": "bare Pingora", "bare-pingora-mimalloc": "bare Pingora (mimalloc)",
         "bare-pingora-idle-timer": "bare Pingora with the idle timer", "nginx": "nginx"}


def by_target(path):
    by = {}
    for row in csv.DictReader(open(path)):
        by.setdefault(row["target"], []).append(row)
    return dict(sorted(by.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else 99))


def micros(v):
    v = v.strip()
    for suffix, factor in (("us", 1), ("ms", 1000), ("s", 1e6)):
        if v.endswith(suffix):
            return float(v[: -len(suffix)]) * factor
    return float(v)


def paired(a, b, combine):
    """Median of combine(a_i, b_i) over repetitions, with a 90% bootstrap interval."""
    pairs = [combine(x, y) for x, y in zip(a, b)]
    if not pairs:
        return None
    rng = random.Random(1)
    boots = sorted(statistics.median(rng.choices(pairs, k=len(pairs))) for _ in range(2000))
    return statistics.median(pairs), boots[100], boots[1899]


def throughput(path):
    by = by_target(path)
    cpu = {t: [float(r["cpu_us_per_req"]) for r in rs] for t, rs in by.items()}
    med = {t: {"rps": statistics.median(float(r["req_per_s"]) for r in rs),
               "p50": statistics.median(micros(r["p50"]) for r in rs),
               "p99": statistics.median(micros(r["p99"]) for r in rs),
               "cpu": statistics.median(cpu[t])} for t, rs in by.items()}
    bases = [b for b in ("bare-pingora", "bare-pingora-mimalloc", "bare-pingora-idle-timer", "nginx")
             if b in med]
    head = "| target | req/s | p50 µs | p99 µs | CPU µs/req |"
    head += "".join(f" CPU vs {NAMES[b]} (medians) |" for b in bases)
    head += "".join(f" CPU / {NAMES[b]}'s, paired: median [90% interval] |"
                    for b in bases if b != "nginx")
    print(head)
    print("|---" * head.count(" |") + "|")
    for t, m in med.items():
        line = f"| {t} | {m['rps']:.0f} | {m['p50']:.0f} | {m['p99']:.0f} | {m['cpu']:.1f} |"
        line += "".join(f" {m['cpu'] / med[b]['cpu']:.2f} |" for b in bases)
        for b in bases:
            if b == "nginx":
                continue
            mid, lo, hi = paired(cpu[t], cpu[b], lambda x, y: x / y)
            line += f" {mid:.3f} [{lo:.3f}, {hi:.3f}] |"
        print(line)
    print()
    print("CPU µs per request, run by run:")
    for t, runs in cpu.items():
        print(f"  {t}: {', '.join(f'{c:.1f}' for c in runs)}")
    if all(r.get("user_us_per_req") for rs in by.values() for r in rs):
        split(by)


def split(by):
    """User and kernel time apart (variants.sh): user-space work without the kernel's noise."""
    user = {t: [float(r["user_us_per_req"]) for r in rs] for t, rs in by.items()}
    kernel = {t: [float(r["sys_us_per_req"]) for r in rs] for t, rs in by.items()}
    print()
    print("| target | user µs/req | kernel µs/req | user / bare Pingora's, paired: median [90% interval] |")
    print("|---|---|---|---|")
    for t in by:
        mid, lo, hi = paired(user[t], user["bare-pingora"], lambda x, y: x / y)
        print(f"| {t} | {statistics.median(user[t]):.2f} | {statistics.median(kernel[t]):.2f} "
              f"| {mid:.3f} [{lo:.3f}, {hi:.3f}] |")


def latency(path):
    by = by_target(path)
    keys = ("p50_us", "p90_us", "p99_us", "p999_us")
    med = {t: {k: statistics.median(float(r[k]) for r in rs) for k in keys} for t, rs in by.items()}
    base = med["bare-pingora"]
    p99 = {t: [float(r["p99_us"]) for r in rs] for t, rs in by.items()}
    cpu = {t: [float(r["cpu_us_per_req"]) for r in rs if r.get("cpu_us_per_req")] for t, rs in by.items()}
    # CPU is paired with each bare Pingora run with the system allocator.
    cpu_bases = [b for b in ("bare-pingora", "bare-pingora-idle-timer") if cpu.get(b)]
    head = ("| target | p50 µs | p90 µs | p99 µs | p99.9 µs | p99 − bare Pingora's, µs (medians) "
            "| paired p99 difference, µs: median [90% interval] |")
    if cpu_bases:
        head += " CPU µs/req |"
        head += "".join(f" CPU / {NAMES[b]}'s, paired: median [90% interval] |" for b in cpu_bases)
    print(head)
    print("|---" * head.count(" |") + "|")
    for t, m in med.items():
        mid, lo, hi = paired(p99[t], p99["bare-pingora"], lambda x, y: x - y)
        line = (f"| {t} | {m['p50_us']:.0f} | {m['p90_us']:.0f} | {m['p99_us']:.0f} | {m['p999_us']:.0f} | "
                f"{m['p99_us'] - base['p99_us']:+.0f} | {mid:+.0f} [{lo:+.0f}, {hi:+.0f}] |")
        if cpu_bases:
            line += (f" {statistics.median(cpu[t]):.1f} |" if cpu[t] else " |")
        for b in cpu_bases:
            c = paired(cpu[t], cpu[b], lambda x, y: x / y)
            line += (f" {c[0]:.3f} [{c[1]:.3f}, {c[2]:.3f}] |" if c else " |")
        print(line)


if __name__ == "__main__":
    {"throughput": throughput, "latency": latency}[sys.argv[1]](sys.argv[2])
