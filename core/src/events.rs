//! Warning Events on pods for every refusal, from the agent and from the server, so that
//! `kubectl describe pod` says why a pod gets no credentials. Each Event's `reason` is the
//! refusal's stable code (the same as the metrics' `reason` label) and its note says what to
//! change. A retrying pod cannot flood the apiserver: an Event's name is derived from the pod's
//! UID and the reason, so every agent and server replica writes the same object (a second
//! creation is refused by the apiserver, not duplicated), and each process writes at most once
//! per pod and reason per [`WRITE_EVERY`], carrying the count of refusals seen in `series`.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, Patch, PatchParams, PostParams};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one write per pod and reason this often (per process).
pub const WRITE_EVERY: Duration = Duration::from_secs(60);
/// Pods and reasons remembered at most; the oldest are forgotten first.
const MAX_REMEMBERED: usize = 50_000;
/// How long a (pod, reason) is remembered without a new refusal.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// The pod an Event is about.
#[derive(Clone, Copy, Debug)]
pub struct PodRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
}

struct Seen {
    count: i32,
    written: Option<Instant>,
    last: Instant,
}

/// What to write, decided without the apiserver (unit-testable).
#[derive(Debug, PartialEq, Eq)]
pub enum Write {
    Create,
    /// Update the series with this count.
    Count(i32),
    Nothing,
}

/// Publishes refusal Events, deduplicated. Without a client (tests) it only counts.
pub struct RefusalEvents {
    client: Option<kube::Client>,
    controller: &'static str,
    instance: String,
    seen: Mutex<HashMap<(String, &'static str), Seen>>,
}

impl RefusalEvents {
    /// `controller` names the reporter (`imdsgate.io/agent`, `imdsgate.io/server`); `instance`
    /// this process (node or pod name).
    pub fn new(client: Option<kube::Client>, controller: &'static str, instance: String) -> Self {
        RefusalEvents { client, controller, instance, seen: Mutex::new(HashMap::new()) }
    }

    /// Records a refusal of `pod` for `reason` (a stable code); writes an Event when due.
    /// Returns what it decided to write.
    pub fn refused(
        &self,
        pod: PodRef<'_>,
        reason: &'static str,
        action: &'static str,
        message: &str,
    ) -> Write {
        let write = self.decide(pod.uid, reason, Instant::now());
        let Some(client) = self.client.clone() else { return write };
        if write == Write::Nothing {
            return write;
        }
        let name = event_name(pod.uid, reason);
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let event = Event {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(pod.namespace.to_string()),
                ..Default::default()
            },
            event_time: Some(now.clone()),
            type_: Some("Warning".into()),
            reason: Some(reason.into()),
            action: Some(action.into()),
            note: Some(message.chars().take(1024).collect()),
            reporting_controller: Some(self.controller.into()),
            reporting_instance: Some(self.instance.chars().take(128).collect()),
            regarding: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name.to_string()),
                namespace: Some(pod.namespace.to_string()),
                uid: Some(pod.uid.to_string()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let namespace = pod.namespace.to_string();
        let write_now = match &write {
            Write::Count(count) => Some(*count),
            _ => None,
        };
        tokio::spawn(async move {
            let api = Api::<Event>::namespaced(client, &namespace);
            let result = match write_now {
                None => match api.create(&PostParams::default(), &event).await {
                    // Another agent or replica wrote it first: it is there, which is the point.
                    Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
                    other => other.map(drop),
                },
                Some(count) => {
                    let series = EventSeries { count, last_observed_time: now };
                    let patch = serde_json::json!({ "series": series, "note": event.note });
                    match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                        // Gone (expired, deleted): write it anew.
                        Err(kube::Error::Api(status)) if status.code == 404 => {
                            api.create(&PostParams::default(), &event).await.map(drop)
                        }
                        other => other.map(drop),
                    }
                }
            };
            if let Err(error) = result {
                tracing::warn!(%error, "cannot publish a refusal Event");
            }
        });
        write
    }

    /// Counts the refusal and decides what to write at `now`.
    pub fn decide(&self, uid: &str, reason: &'static str, now: Instant) -> Write {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= MAX_REMEMBERED {
            seen.retain(|_, s| now.duration_since(s.last) < FORGET_AFTER);
            if seen.len() >= MAX_REMEMBERED {
                return Write::Nothing;
            }
        }
        let entry =
            seen.entry((uid.to_string(), reason)).or_insert(Seen { count: 0, written: None, last: now });
        entry.count = entry.count.saturating_add(1);
        entry.last = now;
        match entry.written {
            None => {
                entry.written = Some(now);
                Write::Create
            }
            Some(at) if now.duration_since(at) >= WRITE_EVERY => {
                entry.written = Some(now);
                Write::Count(entry.count)
            }
            Some(_) => Write::Nothing,
        }
    }
}

/// The Event's name: the same in every process for a pod and reason (a valid object name).
pub fn event_name(uid: &str, reason: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect()
    };
    let mut name = format!("imdsgate.{}.{}", clean(uid), clean(reason));
    name.truncate(253);
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_write_per_pod_and_reason_then_counts_at_most_once_a_minute() {
        let events = RefusalEvents::new(None, "imdsgate.io/test", "t".into());
        let t0 = Instant::now();
        assert_eq!(events.decide("uid-a", "NO_ROLE", t0), Write::Create);
        for n in 1..=100 {
            assert_eq!(
                events.decide("uid-a", "NO_ROLE", t0 + Duration::from_millis(n * 100)),
                Write::Nothing
            );
        }
        assert_eq!(
            events.decide("uid-a", "ROLE_MISMATCH", t0),
            Write::Create,
            "another reason, its own Event"
        );
        assert_eq!(events.decide("uid-b", "NO_ROLE", t0), Write::Create, "another pod, its own Event");
        assert_eq!(
            events.decide("uid-a", "NO_ROLE", t0 + WRITE_EVERY + Duration::from_secs(1)),
            Write::Count(102)
        );
    }

    #[test]
    fn names_are_the_same_everywhere_and_valid() {
        let name = event_name("3f1c2b9e-0000-4a4a-9b9b-0123456789ab", "NAMESPACE_FORBIDS");
        assert_eq!(name, "imdsgate.3f1c2b9e-0000-4a4a-9b9b-0123456789ab.namespace-forbids");
        assert!(name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'));
        assert!(event_name(&"x".repeat(400), "R").len() <= 253);
    }
}
