//! A fixed-rate load generator for latency: requests leave on a fixed schedule (RATE per
//! second spread over CONNECTIONS keep-alive connections), each latency runs from the
//! moment its request is written to the moment its response is read. Below saturation
//! the percentiles compare proxies' own latency rather than queueing in a saturated
//! closed-loop run. (Latency is not counted from the scheduled time: the runtime's timer
//! wakes up to a millisecond late, which would swamp microsecond differences; a request
//! that is late because the previous answer was slow is reported in `late`.)
//!
//! Usage: `fixed-rate ADDR PATH RATE SECONDS [CONNECTIONS [STATUS]]`, e.g.
//! `fixed-rate 127.0.0.1:18083 /index.html 5000 10 20`. Prints one CSV line:
//! `sent,errors,late,p50_us,p90_us,p99_us,p999_us,max_us`. Any answer but STATUS (200 by
//! default; 403 to measure a proxy's blocked answers) fails its connection.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `count` requests on one connection, the i-th at `start + offset + i * every`;
/// returns each latency in microseconds and how many requests left a whole interval
/// late, or why the connection failed.
async fn run_connection(
    addr: String,
    request: Vec<u8>,
    start: Instant,
    offset: Duration,
    every: Duration,
    count: u64,
    status: u16,
) -> Result<(Vec<u64>, u64), String> {
    let mut tcp = TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut latencies = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let mut buf = vec![0u8; 64 * 1024];
    let mut late = 0;
    for i in 0..count {
        let due = start + offset + every.mul_f64(i as f64);
        if Instant::now() >= due + every {
            late += 1;
        }
        tokio::time::sleep_until(due.into()).await;
        let sent = Instant::now();
        tcp.write_all(&request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        read_response(&mut tcp, &mut buf, status).await?;
        latencies.push(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX));
    }
    Ok((latencies, late))
}

/// Reads one response with a `Content-Length` body; any status but `status` is an error.
async fn read_response(tcp: &mut TcpStream, buf: &mut [u8], status: u16) -> Result<(), String> {
    let expected = format!("HTTP/1.1 {status} ");
    let mut filled = 0;
    loop {
        let n = tcp
            .read(&mut buf[filled..])
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed".into());
        }
        filled += n;
        let Some(end) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") else {
            if filled == buf.len() {
                return Err("response head too large".into());
            }
            continue;
        };
        let head = std::str::from_utf8(&buf[..end]).map_err(|_| "response head not UTF-8")?;
        if !head.starts_with(&expected) {
            return Err(format!(
                "answer: {}",
                head.lines().next().unwrap_or_default()
            ));
        }
        let length = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())
                    .flatten()
            })
            .ok_or("no Content-Length")?;
        let mut have = filled - (end + 4);
        while have < length {
            let n = tcp.read(buf).await.map_err(|e| format!("read body: {e}"))?;
            if n == 0 {
                return Err("connection closed in the body".into());
            }
            have += n;
        }
        return Ok(());
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let parsed = (|| {
        let addr = args.get(1)?.clone();
        let path = args.get(2)?.clone();
        let rate: f64 = args.get(3)?.parse().ok()?;
        let secs: f64 = args.get(4)?.parse().ok()?;
        let conns: u64 = match args.get(5) {
            Some(c) => c.parse().ok()?,
            None => 20,
        };
        let status: u16 = match args.get(6) {
            Some(s) => s.parse().ok()?,
            None => 200,
        };
        (rate > 0.0 && secs > 0.0 && conns > 0).then_some((addr, path, rate, secs, conns, status))
    })();
    let Some((addr, path, rate, secs, conns, status)) = parsed else {
        eprintln!("usage: fixed-rate ADDR PATH RATE SECONDS [CONNECTIONS [STATUS]]");
        std::process::exit(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start a runtime: {e}");
            std::process::exit(1);
        }
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").into_bytes();
    let per_conn = rate / conns as f64;
    let every = Duration::from_secs_f64(1.0 / per_conn);
    let count = (per_conn * secs).round() as u64;
    let result = runtime.block_on(async move {
        // Start a little later so every connection is open when the schedule begins.
        let start = Instant::now() + Duration::from_millis(200);
        let tasks: Vec<_> = (0..conns)
            .map(|c| {
                // Connections take turns: the schedule is even across the whole rate.
                let offset = every.mul_f64(c as f64 / conns as f64);
                tokio::spawn(run_connection(
                    addr.clone(),
                    request.clone(),
                    start,
                    offset,
                    every,
                    count,
                    status,
                ))
            })
            .collect();
        let mut all = Vec::new();
        let mut errors = 0u64;
        let mut late = 0u64;
        for t in tasks {
            match t.await {
                Ok(Ok((l, n))) => {
                    all.extend(l);
                    late += n;
                }
                Ok(Err(e)) => {
                    eprintln!("{e}");
                    errors += 1;
                }
                Err(e) => {
                    eprintln!("{e}");
                    errors += 1;
                }
            }
        }
        (all, errors, late)
    });
    let (mut all, errors, late) = result;
    all.sort_unstable();
    println!(
        "{},{},{},{},{},{},{},{}",
        all.len(),
        errors,
        late,
        percentile(&all, 50.0),
        percentile(&all, 90.0),
        percentile(&all, 99.0),
        percentile(&all, 99.9),
        all.last().copied().unwrap_or(0)
    );
}
