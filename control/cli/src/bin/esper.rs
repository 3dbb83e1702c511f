//! `esper`: every Esper service (`server`, `broker`, `worker`, `proxy`), the operator
//! verbs of the seed (`server stop`, `worker status`, `worker autoscale`), and `esper dev`,
//! the whole stack in one process.

/// The proxy allocates dozens of small objects per request; mimalloc serves them with
/// less CPU than the system allocator (figures in benches/README.md, `## Proxy`).
/// Wrapped for `--memprofile`, which costs nothing else while no profile runs.
#[global_allocator]
static GLOBAL: esper::memprofile::Sampling<mimalloc::MiMalloc> =
    esper::memprofile::Sampling(mimalloc::MiMalloc);

fn main() -> std::process::ExitCode {
    esper::cli::main()
}
