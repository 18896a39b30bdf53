//! Whether a pod is live: the one rule every part of imdsgate asks (the pod index, the server's
//! pending pods and server-node scan, the agent's look-ups of unknown addresses, `explain`).

use k8s_openapi::api::core::v1::Pod;

/// Where a pod is in its life, as far as credentials go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// Running or about to: it may be served.
    Live,
    /// `metadata.deletionTimestamp` is set: its IP may be handed to another pod before the
    /// deletion completes, so it is served no more.
    Terminating,
    /// Phase Succeeded or Failed, or a pod that never restarts (`restartPolicy: Never`) whose
    /// containers have all ended, before the kubelet reports its phase: its sandbox and IP may
    /// already be going.
    Finished,
}

impl Liveness {
    pub fn of(pod: &Pod) -> Liveness {
        if pod.metadata.deletion_timestamp.is_some() {
            return Liveness::Terminating;
        }
        let status = pod.status.as_ref();
        if matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded") | Some("Failed")) {
            return Liveness::Finished;
        }
        let statuses = status.and_then(|s| s.container_statuses.as_deref()).unwrap_or_default();
        let runs_once = pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()) == Some("Never");
        if runs_once
            && !statuses.is_empty()
            && statuses.iter().all(|c| c.state.as_ref().is_some_and(|s| s.terminated.is_some()))
        {
            return Liveness::Finished;
        }
        Liveness::Live
    }

    /// Why a pod that is not live gets nothing, in a sentence's words.
    pub fn describe(self) -> &'static str {
        match self {
            Liveness::Live => "live",
            Liveness::Terminating => "being deleted",
            Liveness::Finished => "finished",
        }
    }
}

/// Whether `pod` is live ([`Liveness::Live`]).
pub fn is_live(pod: &Pod) -> bool {
    Liveness::of(pod) == Liveness::Live
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    fn pod(phase: &str, restart: &str, terminated: &[bool]) -> Pod {
        fixtures::pod("u", "p")
            .phase(phase)
            .spec_field("restartPolicy", restart.into())
            .containers_terminated(terminated)
            .build()
    }

    #[test]
    fn running_and_pending_pods_are_live() {
        assert_eq!(Liveness::of(&pod("Running", "Always", &[false])), Liveness::Live);
        assert_eq!(Liveness::of(&pod("Pending", "Never", &[])), Liveness::Live);
        // A restarting pod whose only container ended will run again.
        assert_eq!(Liveness::of(&pod("Running", "Always", &[true])), Liveness::Live);
        assert_eq!(Liveness::of(&pod("Running", "OnFailure", &[true])), Liveness::Live);
    }

    #[test]
    fn finished_pods_are_not_live() {
        assert_eq!(Liveness::of(&pod("Succeeded", "Always", &[])), Liveness::Finished);
        assert_eq!(Liveness::of(&pod("Failed", "Always", &[])), Liveness::Finished);
    }

    #[test]
    fn a_run_once_pod_whose_containers_all_ended_is_finished_before_its_phase_says_so() {
        assert_eq!(Liveness::of(&pod("Running", "Never", &[true, true])), Liveness::Finished);
        assert_eq!(Liveness::of(&pod("Running", "Never", &[true, false])), Liveness::Live);
    }

    #[test]
    fn a_pod_being_deleted_is_not_live() {
        let mut going = pod("Running", "Always", &[false]);
        going.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert_eq!(Liveness::of(&going), Liveness::Terminating);
        assert!(!is_live(&going));
    }
}
