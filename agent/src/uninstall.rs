//! Removing imdsgate from nodes: `iptables uninstall --after-agent-exit` (run on every node by the
//! Helm chart's post-delete hook: it waits until the node's agent has stopped, so the agent's rule
//! keeper cannot put the rule back, then removes the rule), and `wait-daemonset`, which the hook's
//! Job runs to wait until that happened on every node.

use k8s_openapi::api::apps::v1::DaemonSet;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Waits until nothing accepts connections on `agent_admin` (the node's agent has exited), for at
/// most `timeout`; `Err` says why it gave up.
pub async fn wait_agent_exit(agent_admin: SocketAddr, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        // Refused: nothing listens any more. A connection, or no answer at all, means wait on.
        let attempt =
            tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(agent_admin));
        if let Ok(Err(_)) = attempt.await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "an agent still answers on {agent_admin} after {timeout:?}; the rule stays (it would be put back)"
            ));
        }
        eprintln!("waiting for the agent on {agent_admin} to exit before removing the rule");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Whether a DaemonSet's current generation runs and is ready on every node it is meant for, and
/// if not, what it waits for.
pub fn rolled_out(ds: &DaemonSet) -> Result<(), String> {
    let generation = ds.metadata.generation.unwrap_or(0);
    let status = ds.status.clone().unwrap_or_default();
    if status.observed_generation.unwrap_or(0) < generation {
        return Err("the DaemonSet controller has not seen the latest generation".into());
    }
    let desired = status.desired_number_scheduled;
    let (updated, ready) = (status.updated_number_scheduled.unwrap_or(0), status.number_ready);
    if updated < desired || ready < desired {
        return Err(format!("{ready} of {desired} pods ready ({updated} updated)"));
    }
    Ok(())
}

/// `imdsgate-agent wait-daemonset <namespace>/<name>`: exits 0 once [`rolled_out`], 1 after
/// `timeout` (saying what is missing), 64 on a bad argument.
pub async fn wait_daemonset(
    kubeconfig: Option<&std::path::Path>,
    target: &str,
    timeout: Duration,
) -> ExitCode {
    let Some((namespace, name)) = target.split_once('/').filter(|(n, d)| !n.is_empty() && !d.is_empty())
    else {
        return imdsgate_core::process::bad_config(format!(
            "wait-daemonset: {target:?} is not <namespace>/<name>"
        ));
    };
    let client = match imdsgate_core::process::kube_client(kubeconfig).await {
        Ok(c) => c,
        Err(error) => return imdsgate_core::process::bad_config(format!("Kubernetes client: {error:#}")),
    };
    let api = kube::Api::<DaemonSet>::namespaced(client, namespace);
    let deadline = Instant::now() + timeout;
    loop {
        let why = match api.get(name).await {
            Ok(ds) => match rolled_out(&ds) {
                Ok(()) => {
                    eprintln!("daemonset {target}: every pod ready");
                    return ExitCode::SUCCESS;
                }
                Err(why) => why,
            },
            Err(error) => format!("cannot read it: {error}"),
        };
        if Instant::now() >= deadline {
            eprintln!("error: daemonset {target} not rolled out after {timeout:?}: {why}");
            return ExitCode::FAILURE;
        }
        eprintln!("daemonset {target}: {why}");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DaemonSetStatus;

    fn ds(generation: i64, observed: i64, desired: i32, updated: i32, ready: i32) -> DaemonSet {
        let mut ds = DaemonSet::default();
        ds.metadata.generation = Some(generation);
        ds.status = Some(DaemonSetStatus {
            observed_generation: Some(observed),
            desired_number_scheduled: desired,
            updated_number_scheduled: Some(updated),
            number_ready: ready,
            ..Default::default()
        });
        ds
    }

    #[test]
    fn rolled_out_only_when_every_pod_of_the_latest_generation_is_ready() {
        assert_eq!(rolled_out(&ds(1, 1, 3, 3, 3)), Ok(()));
        assert_eq!(rolled_out(&ds(1, 1, 0, 0, 0)), Ok(()), "no node to run on: nothing to wait for");
        assert_eq!(rolled_out(&ds(1, 1, 3, 3, 2)), Err("2 of 3 pods ready (3 updated)".into()));
        assert_eq!(rolled_out(&ds(1, 1, 3, 2, 3)), Err("3 of 3 pods ready (2 updated)".into()));
        assert!(rolled_out(&ds(2, 1, 3, 3, 3)).unwrap_err().contains("latest generation"));
    }

    #[tokio::test]
    async fn waits_while_something_listens_and_returns_once_it_is_gone() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let err = wait_agent_exit(addr, Duration::from_millis(100)).await.unwrap_err();
        assert!(err.contains("still answers"), "{err}");
        drop(listener);
        wait_agent_exit(addr, Duration::from_secs(5)).await.unwrap();
    }
}
