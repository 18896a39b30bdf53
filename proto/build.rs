//! Generates the gRPC code from `proto/imdsgate/v1/*.proto` with a protoc that ships on crates.io,
//! so nothing has to be installed on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().build_client(true).build_server(true).compile_with_config(
        config,
        &["proto/imdsgate/v1/credentials.proto"],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
