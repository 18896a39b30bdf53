//! The imdsgate-agent binary: picks the TLS crypto provider and hands over to `Args::parse_and_run`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .expect("no other rustls crypto provider is installed before main");
    imdsgate_agent::Args::parse_and_run()
}
