//! `scripts/demo.sh`: imdsgate end to end on this machine, in one command or step by step.
#![forbid(unsafe_code)]

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use imdsgate_e2e::demo::{self, Demo};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// imdsgate demo: a real apiserver, STS emulator, server and agent, with pods as network namespaces.
#[derive(Parser)]
#[command(name = "demo.sh")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Everything in one go: start, show demo/app getting its role and demo/no-role refused, stop.
    Run,
    /// Start everything and leave it running in the background.
    Up,
    /// Create a pod object and its network namespace on the demo node.
    Pod {
        /// <namespace>/<name>
        pod: String,
        /// The pod's iam.amazonaws.com/role annotation.
        #[arg(long)]
        role: Option<String>,
        /// Annotate the pod's namespace with iam.amazonaws.com/permitted=REGEX (created if missing).
        #[arg(long = "namespace-permits")]
        namespace_permits: Option<String>,
    },
    /// Run a command inside a pod's network namespace (AWS region and STS endpoint set).
    Exec {
        /// <namespace>/<name>
        pod: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Stop what `up` started and remove it.
    Down,
    /// (internal) the background process behind `up`.
    #[command(hide = true)]
    Serve,
}

fn say(line: &str) {
    println!("==> {line}");
}

fn main() -> ExitCode {
    rustls::crypto::aws_lc_rs::default_provider().install_default().ok();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let outcome = match cli.command.unwrap_or(Cmd::Run) {
        Cmd::Run => runtime.block_on(async {
            let started = Instant::now();
            demo::run(&say).await?;
            say(&format!("done in {:.1}s; nothing is left behind", started.elapsed().as_secs_f64()));
            Ok(())
        }),
        Cmd::Up => up(),
        Cmd::Serve => runtime.block_on(serve()),
        Cmd::Pod { pod, role, namespace_permits } => runtime
            .block_on(request(
                serde_json::json!({ "op": "pod", "pod": pod, "role": role, "permits": namespace_permits }),
            ))
            .map(|answer| {
                let field = |k: &str| answer[k].as_str().unwrap_or_default().to_string();
                println!("pod {pod} has IP {} (network namespace {})", field("ip"), field("netns"))
            }),
        Cmd::Exec { pod, command } => runtime
            .block_on(request(serde_json::json!({ "op": "lookup", "pod": pod })))
            .and_then(|answer| exec(&answer, &command)),
        Cmd::Down => down(),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("demo: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn up() -> Result<()> {
    let dir = demo::state_dir();
    if dir.join("pid").exists() {
        bail!("a demo is already up (state in {}); run `{} down` first", dir.display(), demo::script());
    }
    std::fs::create_dir_all(&dir)?;
    let log = std::fs::File::create(dir.join("demo.log"))?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()?;
    std::fs::write(dir.join("pid"), child.id().to_string())?;
    say(&format!("starting in the background (log: {})", dir.join("demo.log").display()));
    let deadline = Instant::now() + Duration::from_secs(300);
    while !dir.join("ready").exists() {
        if child.try_wait()?.is_some() || Instant::now() > deadline {
            let _ = std::fs::remove_file(dir.join("pid"));
            bail!(
                "the demo did not come up:\n{}",
                imdsgate_e2e::process::log_tail(&dir.join("demo.log"), 30)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    print!("{}", std::fs::read_to_string(dir.join("ready"))?);
    Ok(())
}

async fn serve() -> Result<()> {
    let dir = demo::state_dir();
    let demo = Demo::up(&say).await?;
    let socket = dir.join("control.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket)?;
    let script = demo::script();
    let usage = format!(
        "imdsgate demo is up.\n  apiserver: {url} (kubeconfig: {kc})\n\
         Try:\n  {script} pod team/web --role web-reader --namespace-permits 'arn:aws:iam::123456789012:role/web-.*'\n  \
         {script} exec team/web -- aws sts get-caller-identity\n  \
         {script} exec team/web -- curl -s http://169.254.169.254/latest/meta-data/iam/security-credentials/\n  \
         {script} down\n",
        url = demo.cluster().url(),
        kc = demo.cluster().admin_kubeconfig().display(),
    );
    std::fs::write(dir.join("ready"), &usage)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                let mut reader = tokio::io::BufReader::new(read);
                if reader.read_line(&mut line).await.is_err() { continue; }
                let answer = match control(&demo, &line).await {
                    Ok(answer) => answer,
                    Err(error) => serde_json::json!({ "ok": false, "error": format!("{error:#}") }),
                };
                let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
            }
        }
    }
    say("stopping");
    drop(demo);
    for file in ["control.sock", "ready", "pid"] {
        let _ = std::fs::remove_file(dir.join(file));
    }
    Ok(())
}

async fn control(demo: &Demo, line: &str) -> Result<serde_json::Value> {
    let request: serde_json::Value = serde_json::from_str(line).context("bad request")?;
    let key = request["pod"].as_str().context("no pod")?.to_string();
    let (namespace, name) = key.split_once('/').context("pods are named <namespace>/<name>")?;
    match request["op"].as_str() {
        Some("pod") => {
            if let Some(role) = request["role"].as_str()
                && !role.starts_with("arn:")
            {
                demo.create_role(role.rsplit('/').next().unwrap_or(role))?;
            }
            let pod =
                demo.add_pod(namespace, name, request["role"].as_str(), request["permits"].as_str()).await?;
            Ok(serde_json::json!({ "ok": true, "ip": pod.ip.to_string(), "netns": pod.name }))
        }
        Some("lookup") => {
            let pod = demo.pod(&key)?;
            // Variables set, and variables removed (null), as a program in the pod sees them.
            let env: Vec<(String, Option<String>)> = demo
                .command_in(&pod, "true")?
                .get_envs()
                .map(|(k, v)| (k.to_string_lossy().into_owned(), v.map(|v| v.to_string_lossy().into_owned())))
                .collect();
            Ok(serde_json::json!({ "ok": true, "netns": pod.name, "env": env }))
        }
        _ => bail!("unknown request"),
    }
}

async fn request(body: serde_json::Value) -> Result<serde_json::Value> {
    let socket = demo::state_dir().join("control.sock");
    let stream = std::os::unix::net::UnixStream::connect(&socket).with_context(|| {
        format!("no demo is up ({} missing); run `{} up` first", socket.display(), demo::script())
    })?;
    (&stream).write_all(format!("{body}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let answer: serde_json::Value = serde_json::from_str(&line).context("no answer from the demo")?;
    if answer["ok"] != true {
        bail!("{}", answer["error"].as_str().unwrap_or("failed"));
    }
    Ok(answer)
}

fn exec(answer: &serde_json::Value, command: &[String]) -> Result<()> {
    let netns = answer["netns"].as_str().context("no netns")?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns]).args(command);
    for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"] {
        cmd.env_remove(var);
    }
    for pair in answer["env"].as_array().into_iter().flatten() {
        match (pair[0].as_str(), pair[1].as_str()) {
            (Some(k), Some(v)) => cmd.env(k, v),
            (Some(k), None) => cmd.env_remove(k),
            _ => &mut cmd,
        };
    }
    Err(cmd.exec()).context("running the command")
}

fn down() -> Result<()> {
    let dir = demo::state_dir();
    let pid = std::fs::read_to_string(dir.join("pid"))
        .with_context(|| format!("no demo is up (no {})", dir.join("pid").display()))?;
    let pid = pid.trim();
    let _ = Command::new("kill").args(["-TERM", pid]).status();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > deadline {
            bail!("the demo (pid {pid}) did not stop within 60s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_file(dir.join("pid"));
    say("the demo is down; nothing is left behind");
    Ok(())
}
