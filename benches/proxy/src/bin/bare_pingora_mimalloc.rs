//! The bare Pingora pass-through with mimalloc, the `esper` binary's allocator, so the
//! two are compared with the same allocator.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    esper_bench_proxy::bare_pingora();
}
