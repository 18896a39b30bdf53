//! A real aws-sdk-rust client for the end-to-end tests: takes credentials from the instance
//! metadata service with aws-config's IMDS provider (IMDSv2, 169.254.169.254 unless
//! AWS_EC2_METADATA_SERVICE_ENDPOINT says otherwise), then prints the caller's ARN from STS
//! GetCallerIdentity (AWS_ENDPOINT_URL_STS points at the emulator).
#![forbid(unsafe_code)]

use aws_credential_types::provider::ProvideCredentials;
use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let provider = aws_config::imds::credentials::ImdsCredentialsProvider::builder().build();
    let credentials = match provider.provide_credentials().await {
        Ok(c) => c,
        Err(error) => {
            eprintln!(
                "no credentials from IMDS: {}",
                aws_smithy_types::error::display::DisplayErrorContext(&error)
            );
            return ExitCode::from(2);
        }
    };
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .credentials_provider(credentials)
        .region(aws_config::Region::new(std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into())))
        .load()
        .await;
    match aws_sdk_sts::Client::new(&config).get_caller_identity().send().await {
        Ok(identity) => {
            println!("{}", identity.arn().unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!(
                "GetCallerIdentity failed: {}",
                aws_smithy_types::error::display::DisplayErrorContext(&error)
            );
            ExitCode::from(3)
        }
    }
}
