//! The bare Pingora pass-through with the system allocator (see the crate docs).

fn main() {
    esper_bench_proxy::bare_pingora();
}
