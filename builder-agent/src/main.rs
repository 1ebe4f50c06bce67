//! `builder-agent`: runs on a build machine, dials the queue runner and
//! builds the steps it is given with the local Nix.
//!
//! Not built yet: the end-to-end issue brings registration, assignment,
//! input fetch, builds and output upload. Until then this binary refuses to
//! start rather than pretend.

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "builder-agent",
    version,
    about = "Sluice builder agent (not functional yet: it exits with an error)"
)]
struct Cli {}

fn main() -> ExitCode {
    let _cli = Cli::parse();
    eprintln!("error: the builder agent is not implemented yet");
    ExitCode::FAILURE
}
