//! Process-wide plumbing: logging set-up (with [`EscapingWriter`], so no log line can be forged or
//! a terminal steered by what a pod, a request or an annotation puts in a field), the shutdown
//! signal, and the exit code for bad configuration.

use std::io::Write;
use std::process::ExitCode;
use tracing_subscriber::fmt::MakeWriter;

/// Exit code for bad flags or files (EX_USAGE); Kubernetes shows it in the pod's last state.
pub const EXIT_BAD_CONFIG: u8 = 64;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global tracing subscriber on stderr; `RUST_LOG` filters (default `info`). No colour
/// codes, and every event goes through [`EscapingWriter`].
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(EscapingWriter::new(format, std::io::stderr));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// A [`MakeWriter`] that never lets a raw control character through: each event is collected
/// whole, every C0 control (newline, carriage return, tab, ESC…), DEL, C1 control and Unicode line
/// or paragraph separator inside it is escaped, and the event goes out as one write ending in one
/// newline. Text events get `\n`, `\r`, `\t` and `\u{1b}`-style escapes; JSON events get JSON
/// escapes (`\u007f`), which keep the line valid JSON (serde already escapes C0 inside strings).
#[derive(Clone, Debug)]
pub struct EscapingWriter<M> {
    format: LogFormat,
    inner: M,
}

impl<M> EscapingWriter<M> {
    pub fn new(format: LogFormat, inner: M) -> EscapingWriter<M> {
        EscapingWriter { format, inner }
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for EscapingWriter<M> {
    type Writer = EscapingEvent<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        EscapingEvent { format: self.format, inner: self.inner.make_writer(), event: Vec::new() }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        EscapingEvent { format: self.format, inner: self.inner.make_writer_for(meta), event: Vec::new() }
    }
}

/// One event being written; escaped and passed on when flushed or dropped.
pub struct EscapingEvent<W: Write> {
    format: LogFormat,
    inner: W,
    event: Vec<u8>,
}

impl<W: Write> EscapingEvent<W> {
    fn emit(&mut self) -> std::io::Result<()> {
        if self.event.is_empty() {
            return Ok(());
        }
        let raw = std::mem::take(&mut self.event);
        let line = escape_event(&String::from_utf8_lossy(&raw), self.format);
        self.inner.write_all(line.as_bytes())?;
        self.inner.flush()
    }
}

impl<W: Write> Write for EscapingEvent<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.event.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.emit()
    }
}

impl<W: Write> Drop for EscapingEvent<W> {
    fn drop(&mut self) {
        let _ = self.emit();
    }
}

/// Whether a character must never reach a log raw.
fn must_escape(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// One formatted event with every control character escaped and exactly one final newline.
pub fn escape_event(event: &str, format: LogFormat) -> String {
    let body = event.strip_suffix('\n').unwrap_or(event);
    let mut out = String::with_capacity(body.len() + 1);
    for c in body.chars() {
        if !must_escape(c) {
            out.push(c);
            continue;
        }
        match (c, format) {
            ('\n', _) => out.push_str("\\n"),
            ('\r', _) => out.push_str("\\r"),
            ('\t', _) => out.push_str("\\t"),
            (c, LogFormat::Text) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            (c, LogFormat::Json) => out.push_str(&format!("\\u{:04x}", c as u32)),
        }
    }
    out.push('\n');
    out
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
/// they never should: `Err` says which, and is logged; the caller exits so Kubernetes restarts it.
pub async fn supervise<L: std::fmt::Debug>(
    listener: &mut tokio::task::JoinHandle<L>,
    critical: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
) -> Result<(), String> {
    let (names, tasks): (Vec<_>, Vec<_>) = critical.into_iter().unzip();
    let died = tokio::select! {
        _ = shutdown_signal() => return Ok(()),
        (result, index, _) = futures::future::select_all(tasks) => format!("{} ended: {result:?}", names[index]),
        result = listener => format!("the listener ended: {result:?}"),
    };
    tracing::error!(why = died, "a critical task died; exiting so Kubernetes restarts this process");
    Err(died)
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
    parse_args_from(std::env::args_os())
}

/// [`parse_args`] over given arguments (the first is the program's name), e.g. a subcommand's.
pub fn parse_args_from<T: clap::Parser>(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Result<T, ExitCode> {
    T::try_parse_from(args).map_err(|error| {
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

/// The limit on open file descriptors, as [`raise_fd_limit`] found and left it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit before.
    pub was: u64,
    /// The soft limit now: what this process may open.
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft limit on open file descriptors (`RLIMIT_NOFILE`) to the hard limit. Many nodes
/// start containers with a soft limit of 1024, which a few hundred idle connections exhaust;
/// the hard limit is what the operator (or the container runtime) actually allows. Call it once
/// at start, before any listener: every connection, watch and file counts against it.
pub fn raise_fd_limit() -> std::io::Result<FdLimit> {
    let (was, hard) = rlimit::Resource::NOFILE.get()?;
    let soft = rlimit::increase_nofile_limit(hard)?;
    Ok(FdLimit { was, soft, hard })
}

/// [`raise_fd_limit`], logged: a failure is a warning, never fatal (the process runs with the
/// limit it has). Returns the soft limit in force.
pub fn raise_fd_limit_logged() -> Option<u64> {
    match raise_fd_limit() {
        Ok(limit) if limit.was != limit.soft => {
            tracing::info!(
                from = limit.was,
                to = limit.soft,
                hard = limit.hard,
                "raised the open-file limit"
            );
            Some(limit.soft)
        }
        Ok(limit) => {
            tracing::debug!(
                soft = limit.soft,
                hard = limit.hard,
                "open-file limit already at its hard limit"
            );
            Some(limit.soft)
        }
        Err(error) => {
            tracing::warn!(%error, "cannot read or raise the open-file limit; running with the one inherited");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What the logging set-up writes for one event with a hostile field and message, in `format`.
    fn logged(format: LogFormat) -> String {
        let sink = Sink::default();
        let out = sink.clone();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(EscapingWriter::new(format, move || sink.clone()));
        let hostile = "x\n2026-01-01T00:00:00Z  INFO credentials issued namespace=victim\r\t\u{1b}[31mred\u{7f}\u{85}\u{2028}end";
        let emit = || {
            tracing::info!(role_arn = %hostile, debug = ?hostile, "issued {hostile}");
            tracing::info!("second");
        };
        match format {
            LogFormat::Text => tracing::subscriber::with_default(builder.finish(), emit),
            LogFormat::Json => {
                tracing::subscriber::with_default(builder.json().flatten_event(true).finish(), emit)
            }
        }
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn no_format_writes_a_raw_control_character_and_each_event_is_one_line() {
        for format in [LogFormat::Text, LogFormat::Json] {
            let text = logged(format);
            let lines: Vec<&str> = text.split_terminator('\n').collect();
            assert_eq!(lines.len(), 2, "{format:?}: one line per event: {text:?}");
            assert!(text.ends_with('\n'));
            assert!(lines[1].contains("second"), "{format:?}: {text:?}");
            for line in &lines {
                assert!(!line.chars().any(must_escape), "{format:?}: raw control character in {line:?}");
                assert!(!line.starts_with("2026-01-01T00:00:00Z"), "{format:?}: forged line");
            }
            assert!(lines[0].contains("namespace=victim"), "the content is kept, escaped: {text:?}");
            if format == LogFormat::Json {
                let event: serde_json::Value = serde_json::from_str(lines[0]).expect("still valid JSON");
                let field = event["role_arn"].as_str().unwrap();
                assert!(
                    field.contains('\u{7f}') && field.contains('\n'),
                    "JSON escapes decode back: {field:?}"
                );
            }
        }
    }

    #[test]
    fn escapes_are_readable_and_one_newline_ends_the_event() {
        assert_eq!(
            escape_event("a\nb\rc\td\u{1b}e\u{7f}f\u{9b}g\n", LogFormat::Text),
            "a\\nb\\rc\\td\\u{1b}e\\u{7f}f\\u{9b}g\n"
        );
        assert_eq!(escape_event("\"\u{7f}\u{2029}\"\n", LogFormat::Json), "\"\\u007f\\u2029\"\n");
        assert_eq!(escape_event("no newline", LogFormat::Text), "no newline\n");
        assert_eq!(escape_event("two\n\n", LogFormat::Text), "two\\n\n");
        assert_eq!(escape_event("ünïcode ✓\n", LogFormat::Text), "ünïcode ✓\n", "printable text stays");
    }

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

    #[test]
    fn the_soft_open_file_limit_is_raised_to_the_hard_limit() {
        let (soft, hard) = rlimit::Resource::NOFILE.get().unwrap();
        // Start from a low soft limit, as many nodes give containers (other tests of this process
        // never hold more than a few hundred descriptors).
        let low = hard.min(1024).min(soft.max(512));
        rlimit::Resource::NOFILE.set(low, hard).unwrap();
        let limit = raise_fd_limit().unwrap();
        assert_eq!(limit, FdLimit { was: low, soft: hard, hard });
        assert_eq!(rlimit::Resource::NOFILE.get().unwrap(), (hard, hard));
        assert_eq!(raise_fd_limit().unwrap().was, hard, "a second call changes nothing");
    }
}
