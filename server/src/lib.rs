//! imdsgate server: skeleton wiring; the server issue fills it in.
#![forbid(unsafe_code)]

use clap::Parser;
use std::process::ExitCode;

/// Command-line flags of imdsgate-server.
#[derive(Debug, Parser)]
#[command(name = "imdsgate-server", version, about)]
pub struct Args {
    /// Log format: text or json.
    #[arg(long, env = "IMDSGATE_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

impl Args {
    /// Parses the command line and runs until shutdown; returns the process exit code.
    pub fn parse_and_run() -> ExitCode {
        let _args = Args::parse();
        ExitCode::SUCCESS
    }
}
