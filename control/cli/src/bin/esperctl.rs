//! `esperctl`: the admin client of the Esper control-plane API.

use std::process::ExitCode;

use clap::Parser;
use esper_control::ctl::{CtlArgs, esperctl_main};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    esperctl_main(CtlArgs::parse()).await
}
