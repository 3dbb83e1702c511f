//! `esperctl`: the admin client of the Esper control-plane API.

use std::process::ExitCode;

use esper_control::ctl::esperctl_main;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    esperctl_main(esper::cli::parse_args()).await
}
