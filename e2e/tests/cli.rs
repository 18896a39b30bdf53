//! Start-up errors as an operator sees them: a clear message naming what is wrong, and exit code
//! 64, before any socket is bound.

use imdsgate_e2e::tools::workspace_bin;
use std::process::Command;

fn run(bin: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(workspace_bin(bin).unwrap())
        .args(args)
        .env_remove("KUBECONFIG")
        .env("NODE_NAME", "")
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn server_refuses_bad_configuration_with_exit_code_64() {
    let missing = [
        "--tls-cert=/nonexistent/tls.crt",
        "--tls-key=/nonexistent/tls.key",
        "--tls-client-ca=/nonexistent/ca.crt",
    ];
    let (code, err) = run("imdsgate-server", &missing);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("/nonexistent/"), "names the file: {err}");

    let (code, err) = run("imdsgate-server", &[]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--tls-cert"), "{err}");

    let mut args = missing.to_vec();
    args.push("--session-duration=5m");
    let (code, err) = run("imdsgate-server", &args);
    assert_eq!(code, Some(64));
    assert!(err.contains("between 15m and 12h"), "{err}");

    let (code, err) = run("imdsgate-server", &["--session-duration=soon"]);
    assert_eq!(code, Some(64));
    assert!(err.contains("--session-duration"), "{err}");

    let (code, _) = run("imdsgate-server", &["--help"]);
    assert_eq!(code, Some(0));
}

#[test]
fn agent_refuses_bad_configuration_with_exit_code_64() {
    let (code, err) = run("imdsgate-agent", &[]);
    assert_eq!(code, Some(64));
    assert!(err.contains("--node-name (NODE_NAME) is required"), "{err}");

    let (code, err) = run("imdsgate-agent", &["--node-name=n", "--server=http://plain:8443"]);
    assert_eq!(code, Some(64));
    assert!(err.contains("https://"), "{err}");

    let (code, err) = run("imdsgate-agent", &["--host-interface=bad name"]);
    assert_eq!(code, Some(64));
    assert!(err.contains("not an interface name"), "{err}");

    let (code, err) = run(
        "imdsgate-agent",
        &[
            "--node-name=n",
            "--server=https://s:8443",
            "--tls-cert=/nonexistent/c",
            "--tls-key=/nonexistent/k",
            "--tls-ca=/nonexistent/ca",
        ],
    );
    assert_eq!(code, Some(64));
    assert!(err.contains("/nonexistent/"), "{err}");
}
