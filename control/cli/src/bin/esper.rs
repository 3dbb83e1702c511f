//! `esper`: every Esper service (`server`, `broker`, `worker`, `proxy`), the operator
//! verbs of the seed (`server stop`, `worker status`, `worker autoscale`), and `esper dev`,
//! the whole stack in one process.

fn main() -> std::process::ExitCode {
    esper::cli::main()
}
