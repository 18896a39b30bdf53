//! scripts/demo.sh's own code path (the imdsgate-demo binary it runs), so the demo cannot rot:
//! the one-shot run, and up/pod/exec/down.

use imdsgate_e2e::e2e_enabled;
use imdsgate_e2e::tools::{k8s_bin_dir, workspace_bin};
use std::process::{Command, Output};

fn demo(state: &std::path::Path, args: &[&str]) -> Output {
    Command::new(workspace_bin("imdsgate-demo").unwrap())
        .args(args)
        .env("IMDSGATE_DEMO_DIR", state)
        .env("IMDSGATE_K8S_BIN_DIR", k8s_bin_dir().unwrap())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Takes the background demo down even when an assertion fails.
struct Down<'a>(&'a std::path::Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        if self.0.join("pid").exists() {
            let _ = demo(self.0, &["down"]);
        }
    }
}

#[tokio::test]
async fn the_one_shot_demo_shows_the_role_and_the_refusal() {
    if !e2e_enabled("the_one_shot_demo_shows_the_role_and_the_refusal") {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let out = demo(state.path(), &["run"]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("\"Arn\": \"arn:aws:sts::123456789012:assumed-role/demo-app/demo.app\""), "{all}");
    assert!(all.contains("Unable to locate credentials"), "{all}");
    assert!(all.contains("pod demo/no-role has no iam.amazonaws.com/role annotation (HTTP 404)"), "{all}");
}

#[tokio::test]
async fn up_pod_exec_down() {
    if !e2e_enabled("up_pod_exec_down") {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let out = demo(state.path(), &["up"]);
    let _down = Down(state.path());
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("imdsgate demo is up"));

    let permits = "arn:aws:iam::123456789012:role/web-.*";
    let out =
        demo(state.path(), &["pod", "team/web", "--role", "web-reader", "--namespace-permits", permits]);
    assert!(out.status.success(), "{}", text(&out));
    let out = demo(state.path(), &["pod", "team/idle"]);
    assert!(out.status.success(), "{}", text(&out));
    // Pods share roles: a second pod with the same role is created like the first.
    let out = demo(state.path(), &["pod", "team/web2", "--role", "web-reader"]);
    assert!(out.status.success(), "{}", text(&out));

    for pod in ["web", "web2"] {
        let who = ["sts", "get-caller-identity", "--query", "Arn", "--output", "text"];
        let out = demo(state.path(), &[&["exec", &format!("team/{pod}"), "--", "aws"][..], &who].concat());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("arn:aws:sts::123456789012:assumed-role/web-reader/team.{pod}"),
            "{}",
            text(&out)
        );
    }
    let out = demo(state.path(), &["exec", "team/idle", "--", "aws", "sts", "get-caller-identity"]);
    assert!(!out.status.success());
    let out = demo(state.path(), &["exec", "team/nobody", "--", "true"]);
    assert!(text(&out).contains("no demo pod team/nobody"), "{}", text(&out));

    let out = demo(state.path(), &["down"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!state.path().join("pid").exists());
    let out = demo(state.path(), &["exec", "team/web", "--", "true"]);
    assert!(text(&out).contains("no demo is up"), "{}", text(&out));
}
