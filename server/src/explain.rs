//! `imdsgate-server explain`: why a pod gets credentials or not, step by step, before it ever
//! asks. It reads the pod (from the cluster, or a manifest with `--file`), its namespace, its node
//! and the agents, and runs the server's own decision code — role resolution, namespace policy,
//! session name, and the admission webhook — with the server's configuration (the same flags and
//! environment variables, so run inside the server's pod it sees exactly what the server sees).
//! Exits 0 when the pod would get credentials, 1 when it would be refused, 64 on bad input.

use crate::admission::{Admission, Verdict, WebhookMode};
use crate::authz::authorizer::{Ask, Authorizer, Denial};
use crate::authz::namespace_index::NamespaceIndex;
use crate::authz::session::TagConfig;
use crate::grpc::agent_auth::AgentIdentity;
use anyhow::{Context, anyhow, bail};
use clap::Parser;
use imdsgate_core::liveness::Liveness;
use imdsgate_core::pod_index::ROLE_ANNOTATION;
use imdsgate_core::role::{self, BaseArn};
use imdsgate_core::{PodIndex, PodInfo};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::ListParams;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// imdsgate-server explain: says step by step whether a pod gets its role, and why not.
#[derive(Debug, Parser)]
#[command(name = "imdsgate-server explain", bin_name = "imdsgate-server explain", version)]
pub struct ExplainArgs {
    /// The pod, <namespace>/<name> (or <name> with --namespace).
    pub pod: Option<String>,

    /// Explain a manifest instead of a pod in the cluster (for CI: before the pod exists).
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,

    /// Namespace of a pod named without one, or of a manifest without metadata.namespace.
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,

    /// Kubeconfig file; by default the in-cluster ServiceAccount, then $KUBECONFIG.
    #[arg(long, env = "IMDSGATE_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Base joined to role names, as the server's --role-base-arn.
    #[arg(long, env = "IMDSGATE_ROLE_BASE_ARN")]
    pub role_base_arn: Option<String>,

    /// Namespace the imdsgate agents run in.
    #[arg(long, env = "IMDSGATE_AGENT_NAMESPACE", default_value = "imdsgate")]
    pub agent_namespace: String,

    /// Label selector of the agent pods.
    #[arg(long, env = "IMDSGATE_AGENT_SELECTOR", default_value = "app.kubernetes.io/name=imdsgate-agent")]
    pub agent_selector: String,

    #[command(flatten)]
    pub policy: crate::args::PolicyArgs,
}

/// One line of the explanation: passed, refused, or a detail of the line before.
struct Step {
    mark: &'static str,
    text: String,
}

/// The explanation: steps, and whether the pod would be refused.
#[derive(Default)]
pub struct Explanation {
    steps: Vec<Step>,
    refused: bool,
}

impl Explanation {
    fn pass(&mut self, text: impl Into<String>) {
        self.steps.push(Step { mark: "ok     ", text: text.into() });
    }

    fn refuse(&mut self, text: impl Into<String>) {
        self.refused = true;
        self.steps.push(Step { mark: "REFUSED", text: text.into() });
    }

    fn note(&mut self, text: impl Into<String>) {
        self.steps.push(Step { mark: "       ", text: format!("  {}", text.into()) });
    }

    pub fn refused(&self) -> bool {
        self.refused
    }

    /// The text printed to the user.
    pub fn render(&self, title: &str) -> String {
        let mut out = format!("{title}\n");
        for step in &self.steps {
            let _ = writeln!(out, "  {} {}", step.mark, step.text);
        }
        let verdict = if self.refused {
            "the pod would get NO credentials (see REFUSED above)"
        } else {
            "the pod would get credentials"
        };
        let _ = writeln!(out, "verdict: {verdict}");
        out
    }
}

impl ExplainArgs {
    /// Parses `imdsgate-server explain …` and runs it.
    pub fn parse_and_run() -> ExitCode {
        let args = match imdsgate_core::process::parse_args_from::<ExplainArgs>(std::env::args_os().skip(1)) {
            Ok(args) => args,
            Err(code) => return code,
        };
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(error) => return imdsgate_core::process::bad_config(format!("runtime: {error}")),
        };
        match runtime.block_on(args.run()) {
            Ok((title, explanation)) => {
                print!("{}", explanation.render(&title));
                if explanation.refused() { ExitCode::from(1) } else { ExitCode::SUCCESS }
            }
            Err(error) => imdsgate_core::process::bad_config(format!("{error:#}")),
        }
    }

    async fn run(&self) -> anyhow::Result<(String, Explanation)> {
        let base_arn =
            self.role_base_arn.as_deref().map(BaseArn::parse).transpose().context("--role-base-arn")?;
        let config = self.policy.admission_config(WebhookMode::Enforce)?;
        let client = imdsgate_core::process::kube_client(self.kubeconfig.as_deref()).await?;
        let (pod, from_file) = match (&self.file, &self.pod) {
            (Some(file), None) => (read_manifest(file, &self.namespace)?, true),
            (None, Some(name)) => {
                let (namespace, name) =
                    name.split_once('/').unwrap_or((self.namespace.as_str(), name.as_str()));
                let pod = kube::Api::<Pod>::namespaced(client.clone(), namespace)
                    .get(name)
                    .await
                    .with_context(|| format!("reading pod {namespace}/{name}"))?;
                (pod, false)
            }
            _ => bail!("name a pod (<namespace>/<name>) or a manifest (--file), not both"),
        };
        let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| self.namespace.clone());
        let name =
            pod.metadata.name.clone().or_else(|| pod.metadata.generate_name.clone()).unwrap_or_default();
        let namespaces = Arc::new(NamespaceIndex::new());
        if let Some(ns) = kube::Api::<Namespace>::all(client.clone()).get_opt(&namespace).await? {
            namespaces.apply(&ns);
        }
        let authorizer = Arc::new(Authorizer {
            pods: Arc::new(PodIndex::new()),
            namespaces,
            base_arn: crate::authz::role_base::RoleBase::fixed(base_arn),
            tags: TagConfig::default(),
        });
        let admission = Admission {
            config,
            authorizer: authorizer.clone(),
            client: Some(client.clone()),
            metrics: crate::metrics::Metrics::new(),
        };
        let mut e = Explanation::default();
        explain_pod(&mut e, &pod, &namespace, from_file, &authorizer);
        self.explain_node(&mut e, &client, &pod, &admission).await;
        match admission.decide(&namespace, &pod).await {
            Verdict::Allow => e.pass("admission webhook: would admit the pod"),
            Verdict::Exempt => e.pass(format!("admission webhook: namespace {namespace} is exempt")),
            Verdict::Deny(reason, message) => {
                e.refuse(format!("admission webhook: would refuse it ({}): {message}", reason.as_str()))
            }
            Verdict::RoleUnchecked(message) => {
                e.pass(format!("admission webhook: would admit it with a warning: {message}"))
            }
        }
        let origin = if from_file { "manifest" } else { "pod" };
        Ok((format!("{origin} {namespace}/{name}"), e))
    }

    async fn explain_node(
        &self,
        e: &mut Explanation,
        client: &kube::Client,
        pod: &Pod,
        admission: &Admission,
    ) {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            e.pass("node: not scheduled yet (the scheduler picks one; the webhook checks the binding)");
            return;
        };
        let labels =
            match kube::Api::<k8s_openapi::api::core::v1::Node>::all(client.clone()).get_opt(&node).await {
                Ok(Some(n)) => n.metadata.labels.unwrap_or_default(),
                Ok(None) => {
                    e.refuse(format!("node {node}: no such node"));
                    return;
                }
                Err(error) => {
                    e.refuse(format!("node {node}: cannot be read ({error})"));
                    return;
                }
            };
        if crate::admission::placement::is_server_node(&admission.config.server_node_labels, &labels) {
            e.refuse(format!("node {node} is an imdsgate server node: ordinary pods must not run there"));
            return;
        }
        let agents = kube::Api::<Pod>::namespaced(client.clone(), &self.agent_namespace)
            .list(
                &ListParams::default().labels(&self.agent_selector).fields(&format!("spec.nodeName={node}")),
            )
            .await;
        match agents {
            Ok(list) => {
                let ready = list.items.iter().find(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                });
                match (ready, list.items.first()) {
                    (Some(agent), _) => e.pass(format!(
                        "node {node}: imdsgate agent {}/{} runs there and is ready",
                        self.agent_namespace,
                        agent.metadata.name.as_deref().unwrap_or_default()
                    )),
                    (None, Some(agent)) => e.refuse(format!(
                        "node {node}: imdsgate agent {}/{} is not ready (pods there get \"connection refused\")",
                        self.agent_namespace,
                        agent.metadata.name.as_deref().unwrap_or_default()
                    )),
                    (None, None) => e.refuse(format!(
                        "node {node}: no imdsgate agent ({} in {}) runs there",
                        self.agent_selector, self.agent_namespace
                    )),
                }
            }
            Err(error) => e.note(format!("node {node}: cannot list the agents ({error})")),
        }
    }
}

/// The steps that need only the pod, its namespace's policy and the server's role settings: the
/// server's own decision, made by the same code a request goes through. A pod in the cluster is
/// put in a pod index of its own and asked for as its node's agent would ask (from its IP, for the
/// role name its annotation names, read as the agent reads it); a manifest, which has no IP or node
/// yet, goes through the part of the decision that depends on the pod alone
/// ([`Authorizer::session_for`], which every request ends in).
pub fn explain_pod(
    e: &mut Explanation,
    pod: &Pod,
    namespace: &str,
    from_file: bool,
    authorizer: &Authorizer,
) {
    // Whether the server would find the pod at all: the pod index's rules.
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        e.refuse("hostNetwork: true: the pod's requests never pass the imdsgate agent (and reach the node's own role)");
    }
    let liveness = Liveness::of(pod);
    if liveness != Liveness::Live {
        e.refuse(format!("the pod is {}: such pods get nothing", liveness.describe()));
    }
    let mut info = PodInfo::describe(pod);
    info.namespace = namespace.to_string();
    if info.uid.is_empty() {
        info.uid = "manifest".into();
    }
    if let Some(annotation) = &info.role {
        e.pass(format!("annotation {ROLE_ANNOTATION}: {annotation:?}"));
    }
    let decision = match info.ips.first() {
        Some(&pod_ip) if !from_file => {
            authorizer.pods.apply(pod);
            let role = info.role.as_deref().and_then(|a| role::role_name(a).ok()).unwrap_or_default();
            let ask = Ask { pod_ip, pod_uid: info.uid.clone(), role: role.to_string() };
            let agent = AgentIdentity { username: "explain".into(), node: info.node.clone() };
            authorizer.authorize(&ask, &agent).map(|(_, key)| key).map_err(|refusal| refusal.denial)
        }
        _ => authorizer.session_for(&info),
    };
    match decision {
        Ok(key) => {
            e.pass(format!("role ARN: {}", key.role_arn));
            e.pass(format!(
                "namespace {namespace} permits it: {}",
                authorizer.namespaces.policy(namespace).describe()
            ));
            e.pass(format!("session name: {}", key.session_name));
        }
        Err(denial) => {
            e.refuse(format!("{denial} (reason {})", denial.reason().as_str()));
            match &denial {
                Denial::NoRole { .. } => {
                    e.note(format!("add a {ROLE_ANNOTATION} annotation naming the role"))
                }
                Denial::NamespaceForbids { .. } if !authorizer.namespaces.contains(namespace) => {
                    e.note(format!("namespace {namespace} does not exist, so it permits nothing"))
                }
                Denial::NamespaceForbids { .. } => e.note(format!(
                    "namespace policy: {}",
                    authorizer.namespaces.policy(namespace).describe()
                )),
                _ => {}
            }
        }
    }
}

/// A Pod from a YAML or JSON manifest.
fn read_manifest(path: &PathBuf, namespace: &str) -> anyhow::Result<Pod> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut pod: Pod =
        serde_yaml::from_str(&text).with_context(|| format!("{} is not a Pod manifest", path.display()))?;
    if pod.metadata.namespace.is_none() {
        pod.metadata.namespace = Some(namespace.to_string());
    }
    if pod.spec.is_none() {
        return Err(anyhow!("{} has no spec", path.display()));
    }
    Ok(pod)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::fixtures::authorizer;
    use imdsgate_core::fixtures;

    /// A manifest `team/web`: no UID, IP, node or status.
    fn manifest(annotations: &[(&str, &str)]) -> Pod {
        let mut pod = fixtures::pod("", "web").node(None).build();
        pod.metadata.uid = None;
        pod.status = None;
        let annotations = annotations.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        pod.metadata.annotations = Some(annotations.collect());
        pod
    }

    fn explain(p: &Pod, from_file: bool) -> (bool, String) {
        let mut e = Explanation::default();
        explain_pod(&mut e, p, "team", from_file, &authorizer());
        (e.refused(), e.render("team/web"))
    }

    #[test]
    fn an_allowed_pod_is_explained_step_by_step() {
        let (refused, text) = explain(&manifest(&[(ROLE_ANNOTATION, "app")]), true);
        assert!(!refused, "{text}");
        for line in [
            "ok      annotation iam.amazonaws.com/role: \"app\"",
            "ok      role ARN: arn:aws:iam::123456789012:role/app",
            "ok      namespace team permits it: iam.amazonaws.com/permitted: \"arn:aws:iam::123456789012:role/app\"",
            "ok      session name: team.web",
            "verdict: the pod would get credentials",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }

    #[test]
    fn each_refusal_says_why_with_the_servers_reason() {
        let role = |r: &'static str| vec![(ROLE_ANNOTATION, r)];
        let cases = [
            (manifest(&[]), "has no iam.amazonaws.com/role annotation (reason NO_ROLE)"),
            (manifest(&role("arn:aws:iam::x:role/a")), "(reason ROLE_INVALID)"),
            (manifest(&role("app/")), "ends in `/`"),
            (manifest(&role("admin")), "(reason NAMESPACE_FORBIDS)"),
            (
                manifest(&[(ROLE_ANNOTATION, "app"), ("iam.amazonaws.com/session-name", "a b")]),
                "(reason SESSION_NAME_INVALID)",
            ),
            (fixtures::pod("u", "web").host_network().role("app").build(), "hostNetwork: true"),
        ];
        for (p, needle) in cases {
            let (refused, text) = explain(&p, true);
            assert!(refused, "{needle}: {text}");
            assert!(text.contains(needle) && text.contains("REFUSED"), "{needle} not in:\n{text}");
            assert!(text.contains("verdict: the pod would get NO credentials"), "{text}");
        }
    }

    /// A pod in the cluster is decided as the server decides its request: the same pod index rules
    /// (the run-once rule included) and the same authorizer.
    #[test]
    fn a_pod_in_the_cluster_gets_the_servers_own_answer() {
        let live = fixtures::pod("u-web", "web").ip("10.0.9.1").role("app");
        let (refused, text) = explain(&live.clone().build(), false);
        assert!(!refused, "{text}");
        let finished_run_once =
            live.clone().spec_field("restartPolicy", "Never".into()).containers_terminated(&[true]).build();
        let deleting = live.clone().deleting().build();
        for (pod, needle) in
            [(finished_run_once, "the pod is finished"), (deleting, "the pod is being deleted")]
        {
            let (refused, text) = explain(&pod, false);
            assert!(refused, "{text}");
            assert!(text.contains(needle), "{needle} not in:\n{text}");
            assert!(text.contains("(reason POD_NOT_FOUND)"), "{text}");
        }
        let (refused, text) = explain(&live.role("app-reader/").build(), false);
        assert!(refused && text.contains("(reason ROLE_INVALID)"), "{text}");
    }
}
