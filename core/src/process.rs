//! Process-wide plumbing: logging set-up, the shutdown signal, and the exit code for bad
//! configuration.

use std::process::ExitCode;

/// Exit code for bad flags or files (EX_USAGE); Kubernetes shows it in the pod's last state.
pub const EXIT_BAD_CONFIG: u8 = 64;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global tracing subscriber; `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Runs a binary's main future on a multi-threaded runtime; a failure (an error the future
/// returns) is logged and exits 1, so Kubernetes restarts the process.
pub fn run_to_exit<E: std::fmt::Display>(
    binary: &'static str,
    main: impl std::future::Future<Output = Result<ExitCode, E>>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(error) => return bad_config(format!("cannot start the async runtime: {error}")),
    };
    runtime.block_on(async {
        match main.await {
            Ok(code) => code,
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "{binary} failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// The one shutdown path inside a process: triggered once (on SIGTERM), it tells every listener
/// to stop accepting and drain.
#[derive(Clone, Debug)]
pub struct Shutdown {
    tx: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    rx: tokio::sync::watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        let (tx, rx) = tokio::sync::watch::channel(false);
        Shutdown { tx: std::sync::Arc::new(tx), rx }
    }
}

impl Shutdown {
    /// Starts the shutdown.
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }

    /// Resolves once the shutdown has started.
    pub fn wait(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.rx.clone();
        async move {
            let _ = rx.wait_for(|down| *down).await;
        }
    }
}

/// Waits for SIGTERM or SIGINT (`Ok`), or for the listener or any critical task to end, which
/// they never should (`Err` says which, and the caller exits so Kubernetes restarts it).
pub async fn supervise<L: std::fmt::Debug>(
    listener: &mut tokio::task::JoinHandle<L>,
    critical: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
) -> Result<(), String> {
    let (names, tasks): (Vec<_>, Vec<_>) = critical.into_iter().unzip();
    tokio::select! {
        _ = shutdown_signal() => Ok(()),
        (result, index, _) = futures::future::select_all(tasks) => Err(format!("{} ended: {result:?}", names[index])),
        result = listener => Err(format!("the listener ended: {result:?}")),
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; shutting down"),
    }
}

/// Reports a start-up error the way every imdsgate binary does and returns exit code 64.
pub fn bad_config(error: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::from(EXIT_BAD_CONFIG)
}

/// Parses the command line; on a bad flag prints clap's message and returns exit code 64
/// (`--help` and `--version` print and return success).
pub fn parse_args<T: clap::Parser>() -> Result<T, ExitCode> {
    T::try_parse().map_err(|error| {
        let _ = error.print();
        if error.use_stderr() { ExitCode::from(EXIT_BAD_CONFIG) } else { ExitCode::SUCCESS }
    })
}

/// Parses durations such as `90s`, `15m`, `1h30m` for clap.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 90s, 15m, 1h)"))
}

/// Why no Kubernetes client could be made.
#[derive(Debug, thiserror::Error)]
pub enum KubeClientError {
    #[error("reading kubeconfig {path}: {source}")]
    Read { path: String, source: kube::config::KubeconfigError },
    #[error("no in-cluster config and no usable kubeconfig: {0}")]
    NoConfig(kube::config::KubeconfigError),
    #[error("{0}")]
    Client(#[from] kube::Error),
}

/// A Kubernetes client: from `kubeconfig` when given, else in-cluster, else `$KUBECONFIG` /
/// `~/.kube/config`.
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, KubeClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let read = |source| KubeClientError::Read { path: path.display().to_string(), source };
            let file = kube::config::Kubeconfig::read_from(path).map_err(read)?;
            kube::Config::from_custom_kubeconfig(file, &Default::default()).await.map_err(read)?
        }
        None => match kube::Config::incluster() {
            Ok(config) => config,
            Err(_) => {
                kube::Config::from_kubeconfig(&Default::default()).await.map_err(KubeClientError::NoConfig)?
            }
        },
    };
    Ok(kube::Client::try_from(config)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_critical_task_that_ends_is_named() {
        let mut listener = tokio::spawn(std::future::pending::<()>());
        let critical = vec![
            ("forever", tokio::spawn(std::future::pending::<()>())),
            ("pod watch", tokio::spawn(async {})),
        ];
        let why = supervise(&mut listener, critical).await.unwrap_err();
        assert!(why.starts_with("pod watch ended"), "{why}");
    }

    #[tokio::test]
    async fn a_listener_that_ends_is_reported() {
        let mut listener = tokio::spawn(async {});
        let why = supervise(&mut listener, vec![("forever", tokio::spawn(std::future::pending::<()>()))])
            .await
            .unwrap_err();
        assert!(why.starts_with("the listener ended"), "{why}");
    }

    #[tokio::test]
    async fn shutdown_reaches_every_waiter() {
        let shutdown = Shutdown::default();
        let waiters: Vec<_> = (0..3).map(|_| tokio::spawn(shutdown.wait())).collect();
        shutdown.trigger();
        for w in waiters {
            tokio::time::timeout(std::time::Duration::from_secs(1), w).await.unwrap().unwrap();
        }
    }
}
