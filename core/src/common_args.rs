//! The flags the agent and the server take alike, declared once and flattened into each binary's
//! `Args` with `#[command(flatten)]`: one name, environment variable, default, validation and help
//! text for both. Flags that only look alike stay in each binary's own `Args`: `--admin-listen`
//! and `--shutdown-grace` have a different default (and help) in each.

use crate::process::LogFormat;
use std::path::PathBuf;

/// `--kubeconfig` and `--log-format`.
#[derive(Clone, Debug, clap::Args)]
pub struct CommonArgs {
    /// Kubeconfig file; by default the in-cluster ServiceAccount, then $KUBECONFIG.
    // Global so that the agent's subcommands (`wait-daemonset`) take it too; the server has none.
    #[arg(long, env = "IMDSGATE_KUBECONFIG", global = true)]
    pub kubeconfig: Option<PathBuf>,

    /// Log format.
    #[arg(long, env = "IMDSGATE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Bin {
        #[command(flatten)]
        common: CommonArgs,
    }

    #[test]
    fn defaults_and_flags() {
        let bin = Bin::try_parse_from(["bin"]).unwrap();
        assert_eq!((bin.common.kubeconfig, bin.common.log_format), (None, LogFormat::Text));
        let bin = Bin::try_parse_from(["bin", "--kubeconfig", "/k", "--log-format", "json"]).unwrap();
        assert_eq!(bin.common.kubeconfig, Some(PathBuf::from("/k")));
        assert_eq!(bin.common.log_format, LogFormat::Json);
        assert!(Bin::try_parse_from(["bin", "--log-format", "yaml"]).is_err());
    }
}
