//! Warning Events on pods for every refusal, from the agent and from the server, so that
//! `kubectl describe pod` says why a pod gets no credentials. Each Event's `reason` is the
//! refusal's stable code (the same as the metrics' `reason` label) and its note says what to
//! change. A retrying pod cannot flood the apiserver: an Event's name is derived from the pod's
//! UID and the reason, so every agent and server replica writes the same object (a second
//! creation is refused by the apiserver, not duplicated), and each process writes at most once
//! per pod and reason per [`WRITE_EVERY`], carrying the count of refusals it saw in `series`, and
//! at a bounded pace overall (an outage refuses every pod at once).

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, Patch, PatchParams, PostParams};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one write per pod and reason this often (per process).
pub const WRITE_EVERY: Duration = Duration::from_secs(300);
/// Event writes per second at most, per process, whatever the number of pods (an outage makes
/// every pod a refusal at once): a burst of [`WRITE_BURST`], then this pace.
const WRITES_PER_SECOND: f64 = 5.0;
const WRITE_BURST: f64 = 50.0;
/// The longest note the apiserver takes, in bytes.
const MAX_NOTE_BYTES: usize = 1024;
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
    seen: Mutex<Book>,
}

/// What has been seen and written.
struct Book {
    seen: HashMap<(String, &'static str), Seen>,
    /// Write allowance: (tokens, when counted).
    tokens: (f64, Instant),
    swept: Option<Instant>,
}

impl RefusalEvents {
    /// `controller` names the reporter (`imdsgate.io/agent`, `imdsgate.io/server`); `instance`
    /// this process (node or pod name).
    pub fn new(client: Option<kube::Client>, controller: &'static str, instance: String) -> Self {
        let book = Book { seen: HashMap::new(), tokens: (WRITE_BURST, Instant::now()), swept: None };
        RefusalEvents { client, controller, instance, seen: Mutex::new(book) }
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
            note: Some(truncate_bytes(message, MAX_NOTE_BYTES)),
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

    /// Counts the refusal and decides what to write at `now`. The count in `series` is this
    /// process's (agents and replicas each count what they saw).
    pub fn decide(&self, uid: &str, reason: &'static str, now: Instant) -> Write {
        let mut book = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let book = &mut *book;
        let key = (uid.to_string(), reason);
        if book.seen.len() >= MAX_REMEMBERED && !book.seen.contains_key(&key) {
            // Sweep at most every ten seconds: a full book must not cost a scan per refusal.
            if book.swept.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(10)) {
                book.swept = Some(now);
                book.seen.retain(|_, s| now.duration_since(s.last) < FORGET_AFTER);
            }
            if book.seen.len() >= MAX_REMEMBERED {
                return Write::Nothing;
            }
        }
        let entry = book.seen.entry(key).or_insert(Seen { count: 0, written: None, last: now });
        entry.count = entry.count.saturating_add(1);
        entry.last = now;
        let due = match entry.written {
            None => Write::Create,
            Some(at) if now.duration_since(at) >= WRITE_EVERY => Write::Count(entry.count),
            Some(_) => return Write::Nothing,
        };
        // The process-wide pace: a write not made now is made at the pod's next refusal.
        let (tokens, at) = &mut book.tokens;
        *tokens =
            (*tokens + now.saturating_duration_since(*at).as_secs_f64() * WRITES_PER_SECOND).min(WRITE_BURST);
        *at = (*at).max(now);
        if *tokens < 1.0 {
            return Write::Nothing;
        }
        *tokens -= 1.0;
        entry.written = Some(now);
        due
    }
}

/// `s` cut to at most `max` bytes at a character boundary.
fn truncate_bytes(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
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
    fn one_write_per_pod_and_reason_then_counts_at_most_once_per_window() {
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
    fn a_storm_of_refusals_is_written_at_a_bounded_pace() {
        let events = RefusalEvents::new(None, "imdsgate.io/test", "t".into());
        let t0 = Instant::now();
        let written = (0..1000)
            .filter(|n| events.decide(&format!("uid-{n}"), "SERVER_UNREACHABLE", t0) != Write::Nothing)
            .count();
        assert!(
            written <= WRITE_BURST as usize + 1,
            "an outage, every pod refused at once: {written} writes"
        );
        // A pod not written for now is written at its next refusal, once the pace allows.
        assert_eq!(
            events.decide("uid-999", "SERVER_UNREACHABLE", t0 + Duration::from_secs(1)),
            Write::Create
        );
    }

    #[test]
    fn notes_fit_the_apiserver_limit_in_bytes() {
        let long = "é".repeat(1000);
        let cut = truncate_bytes(&long, MAX_NOTE_BYTES);
        assert!(cut.len() <= MAX_NOTE_BYTES && cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn names_are_the_same_everywhere_and_valid() {
        let name = event_name("3f1c2b9e-0000-4a4a-9b9b-0123456789ab", "NAMESPACE_FORBIDS");
        assert_eq!(name, "imdsgate.3f1c2b9e-0000-4a4a-9b9b-0123456789ab.namespace-forbids");
        assert!(name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'));
        assert!(event_name(&"x".repeat(400), "R").len() <= 253);
    }
}
