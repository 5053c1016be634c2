//! EdgeNode events in the cluster: what the status writer tells, published as Kubernetes
//! Events through one bounded queue (an outage's burst never holds status back; past the
//! bound, events are dropped and counted in the log), and the events `describe` lists, read
//! back from the API so any head shows what the writer published.

use crate::control::EventsQuery;
use crate::node::journal::EventLine;
use crate::node::status::Notice;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as KubeEvent;
use kube::api::{Api, ListParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;
use tracing::warn;

/// Events waiting to be published; more are dropped.
const QUEUE: usize = 1024;
/// Events `describe` shows, the latest.
const SHOWN: usize = 50;

/// Publishes and reads EdgeNode events; cheap to clone.
#[derive(Clone)]
pub struct ClusterEvents {
    client: kube::Client,
    queue: mpsc::Sender<(ObjectReference, Notice)>,
    dropped: Arc<AtomicU64>,
}

impl ClusterEvents {
    /// Starts the publisher as a task of `tasks`; `head` names this head in the Events.
    pub fn start(client: kube::Client, head: &str, tasks: &mut crate::daemon::Tasks) -> Self {
        let reporter = Reporter {
            controller: crate::head::users::cluster::REPORTER.into(),
            instance: Some(head.to_string()),
        };
        let recorder = Recorder::new(client.clone(), reporter);
        let (queue, mut waiting) = mpsc::channel::<(ObjectReference, Notice)>(QUEUE);
        let shutdown = tasks.token();
        tasks.spawn(async move {
            loop {
                let (reference, notice) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    next = waiting.recv() => match next {
                        Some(next) => next,
                        None => return,
                    },
                };
                let event = Event {
                    type_: match notice.type_.as_str() {
                        "Warning" => EventType::Warning,
                        _ => EventType::Normal,
                    },
                    reason: notice.reason,
                    note: Some(bounded(notice.message)),
                    action: "Status".into(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&event, &reference).await {
                    let name = reference.name.unwrap_or_default();
                    warn!(edgenode = %name, error = %e, "cannot record an event");
                }
            }
        });
        ClusterEvents {
            client,
            queue,
            dropped: Arc::default(),
        }
    }

    /// Queues what `told` of `regarding` for publishing.
    pub fn publish(&self, regarding: &ObjectReference, told: Vec<Notice>) {
        for notice in told {
            if self.queue.try_send((regarding.clone(), notice)).is_err() {
                let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if dropped.is_power_of_two() {
                    warn!(dropped, "too many events at once; some are not recorded");
                }
            }
        }
    }

    /// The latest events `q` asks for, oldest first: one EdgeNode's, or an edge's (its Edge
    /// and its EdgeNodes, which bear its name).
    pub async fn list(&self, q: &EventsQuery) -> Result<Vec<EventLine>, kube::Error> {
        let (api, selector): (Api<KubeEvent>, String) = match (&q.edge, &q.namespace, &q.name) {
            (Some(edge), _, _) => (
                Api::all(self.client.clone()),
                format!("regarding.name={edge}"),
            ),
            (None, Some(namespace), Some(name)) => (
                Api::namespaced(self.client.clone(), namespace),
                format!("regarding.kind=EdgeNode,regarding.name={name}"),
            ),
            _ => return Ok(Vec::new()),
        };
        let list = api.list(&ListParams::default().fields(&selector)).await?;
        let mut lines: Vec<EventLine> = list
            .items
            .into_iter()
            .filter_map(|e| line(e).filter(|l| q.wants(&l.object)))
            .collect();
        lines.sort_by(|a, b| a.time.cmp(&b.time));
        let skip = lines.len().saturating_sub(SHOWN);
        Ok(lines.split_off(skip))
    }
}

/// The object reference of EdgeNode `namespace/name` with `uid`.
pub fn edgenode_reference(namespace: &str, name: &str, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some(crate::crd::API_VERSION.into()),
        kind: Some("EdgeNode".into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        uid,
        ..ObjectReference::default()
    }
}

/// `message` cut to the 1 KiB an Event's note may hold, at a character boundary.
fn bounded(mut message: String) -> String {
    const NOTE_MAX: usize = 1024;
    if message.len() > NOTE_MAX {
        let mut end = NOTE_MAX - '…'.len_utf8();
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

/// A Kubernetes Event as `describe` lists it.
fn line(e: KubeEvent) -> Option<EventLine> {
    let regarding = e.regarding?;
    let kind = regarding.kind?;
    let name = regarding.name?;
    let object = match (kind.as_str(), regarding.namespace) {
        ("EdgeNode", Some(ns)) => format!("EdgeNode {ns}/{name}"),
        (kind, _) => format!("{kind} {name}"),
    };
    let series = e.series.as_ref();
    let time = series
        .map(|s| s.last_observed_time.0.to_string())
        .or_else(|| e.event_time.map(|t| t.0.to_string()))
        .or_else(|| e.deprecated_last_timestamp.map(|t| t.0.to_string()))
        .unwrap_or_default();
    let count = series.map(|s| s.count).or(e.deprecated_count).unwrap_or(1);
    Some(EventLine {
        time,
        type_: e.type_.unwrap_or_default(),
        reason: e.reason.unwrap_or_default(),
        object,
        message: e.note.unwrap_or_default(),
        count: u32::try_from(count).unwrap_or(1),
    })
}
