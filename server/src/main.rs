//! The imdsgate-server binary: installs the TLS crypto provider, then [`imdsgate_server::Args`]
//! parses the command line and runs.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .expect("no other rustls crypto provider is installed before main");
    imdsgate_server::Args::parse_and_run()
}
