//! The bounded flow ring and its subscribers.
//!
//! Writers never wait: `record` takes a mutex held only for an O(1) push and a broadcast
//! send (no I/O, no allocation beyond the record's `Arc`), and a subscriber that falls
//! behind loses records (and is told how many) instead of slowing writers down.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures::Stream;
use tokio::sync::broadcast;

use super::{FlowRecord, FlowVerdict};

/// Records kept for replay, and the depth of each subscriber's live queue: at ~500 bytes
/// a record that is ~2 MiB, a few seconds of a busy node's requests, enough for `meshctl
/// observe` to show what just happened.
pub const DEFAULT_CAPACITY: usize = 4096;

/// Which records a subscriber wants; `None` fields match anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// The source's or the destination's namespace.
    pub namespace: Option<String>,
    /// The source's or the destination's pod name.
    pub pod: Option<String>,
    /// The verdict.
    pub verdict: Option<FlowVerdict>,
    /// The policy, `<namespace>/<name>`.
    pub policy: Option<String>,
}

impl Filter {
    /// Whether `r` passes the filter. Namespace and pod must hold for the same end, so
    /// `namespace: a, pod: x` does not match pod `x` of namespace `b` calling into `a`.
    pub fn matches(&self, r: &FlowRecord) -> bool {
        let end_ok = |e: &super::Endpoint| {
            self.namespace
                .as_deref()
                .is_none_or(|ns| e.namespace.as_deref() == Some(ns))
                && self
                    .pod
                    .as_deref()
                    .is_none_or(|p| e.pod.as_deref() == Some(p))
        };
        (end_ok(&r.source) || end_ok(&r.destination))
            && self.verdict.is_none_or(|v| v == r.verdict)
            && self
                .policy
                .as_deref()
                .is_none_or(|p| r.policy.as_deref() == Some(p))
    }
}

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlowEvent {
    /// A record that passed the filter.
    Record(Arc<FlowRecord>),
    /// The subscriber fell behind and this many records (filtered or not) were skipped.
    Lagged(u64),
}

/// Counters of the ring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowsStats {
    /// Records written since start.
    pub recorded: u64,
    /// Records pushed out of the ring by newer ones.
    pub dropped: u64,
    /// Records in the ring now.
    pub len: usize,
}

#[derive(Debug)]
struct Inner {
    capacity: usize,
    ring: Mutex<VecDeque<Arc<FlowRecord>>>,
    live: broadcast::Sender<Arc<FlowRecord>>,
    recorded: AtomicU64,
    dropped: AtomicU64,
}

/// The flow ring; cheap to clone (all clones share one ring).
#[derive(Debug, Clone)]
pub struct Flows {
    inner: Arc<Inner>,
}

impl Default for Flows {
    fn default() -> Flows {
        Flows::new(DEFAULT_CAPACITY)
    }
}

impl Flows {
    /// A ring that keeps the last `capacity` records (at least one).
    pub fn new(capacity: usize) -> Flows {
        let capacity = capacity.max(1);
        let (live, _) = broadcast::channel(capacity);
        Flows {
            inner: Arc::new(Inner {
                capacity,
                ring: Mutex::new(VecDeque::with_capacity(capacity)),
                live,
                recorded: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
            }),
        }
    }

    /// Adds a record, dropping the oldest when full; never waits on a subscriber.
    pub fn record(&self, record: FlowRecord) {
        let record = Arc::new(record);
        let inner = &self.inner;
        // A panic elsewhere while holding the lock leaves a consistent deque (push and pop
        // are each whole), so a poisoned lock is still usable.
        let mut ring = inner.ring.lock().unwrap_or_else(PoisonError::into_inner);
        if ring.len() >= inner.capacity {
            ring.pop_front();
            inner.dropped.fetch_add(1, Ordering::Relaxed);
        }
        ring.push_back(Arc::clone(&record));
        // Sent under the lock, so a subscriber that snapshots the ring under it sees each
        // record exactly once (in the replay or live). No receiver is not an error.
        let _ = inner.live.send(record);
        drop(ring);
        inner.recorded.fetch_add(1, Ordering::Relaxed);
    }

    /// The ring's counters.
    pub fn stats(&self) -> FlowsStats {
        let len = self
            .inner
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        FlowsStats {
            recorded: self.inner.recorded.load(Ordering::Relaxed),
            dropped: self.inner.dropped.load(Ordering::Relaxed),
            len,
        }
    }

    /// The records in the ring that pass `filter`, oldest first.
    pub fn snapshot(&self, filter: &Filter) -> Vec<Arc<FlowRecord>> {
        let ring = self
            .inner
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        ring.iter().filter(|r| filter.matches(r)).cloned().collect()
    }

    /// Replays the ring's records that pass `filter`, then follows new ones. A subscriber
    /// more than the ring's capacity behind gets [`FlowEvent::Lagged`] and continues with
    /// the oldest record still queued.
    pub fn subscribe(&self, filter: Filter) -> impl Stream<Item = FlowEvent> + Send + 'static {
        let (replay, rx) = {
            let ring = self
                .inner
                .ring
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let replay: VecDeque<Arc<FlowRecord>> =
                ring.iter().filter(|r| filter.matches(r)).cloned().collect();
            (replay, self.inner.live.subscribe())
        };
        futures::stream::unfold(
            (replay, rx, filter),
            |(mut replay, mut rx, filter)| async move {
                if let Some(r) = replay.pop_front() {
                    return Some((FlowEvent::Record(r), (replay, rx, filter)));
                }
                loop {
                    match rx.recv().await {
                        Ok(r) if filter.matches(&r) => {
                            return Some((FlowEvent::Record(r), (replay, rx, filter)))
                        }
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            return Some((FlowEvent::Lagged(n), (replay, rx, filter)))
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;

    use futures::StreamExt;

    use super::*;
    use crate::flows::{Endpoint, FlowKind};

    fn rec(i: u8, ns: &str, pod: &str, verdict: FlowVerdict) -> FlowRecord {
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, i));
        let mut src = Endpoint::new(ip, None, None);
        src.namespace = Some(ns.into());
        src.pod = Some(pod.into());
        let dst = Endpoint::new(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1)), Some(80), None);
        let mut r = FlowRecord::new(FlowKind::Http, verdict, src, dst);
        r.policy = Some(format!("{ns}/p"));
        r.latency_us = u64::from(i);
        r
    }

    async fn next(s: &mut (impl Stream<Item = FlowEvent> + Unpin)) -> FlowEvent {
        tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("no event"))
    }

    #[test]
    fn proxy_flows_ring_is_bounded_under_a_flood() {
        let flows = Flows::new(16);
        for i in 0..10_000u32 {
            flows.record(rec((i % 200) as u8, "a", "x", FlowVerdict::Allow));
        }
        let s = flows.stats();
        assert_eq!((s.recorded, s.dropped, s.len), (10_000, 10_000 - 16, 16));
        // The newest are kept.
        let kept = flows.snapshot(&Filter::default());
        assert_eq!(
            kept.last().map(|r| r.latency_us),
            Some(u64::from((9_999 % 200) as u8))
        );
    }

    #[tokio::test]
    async fn proxy_flows_subscribe_replays_then_follows_with_filters() {
        let flows = Flows::new(64);
        flows.record(rec(1, "a", "x", FlowVerdict::Allow));
        flows.record(rec(2, "b", "y", FlowVerdict::Deny));
        flows.record(rec(3, "a", "z", FlowVerdict::Deny));
        let only_a = Filter {
            namespace: Some("a".into()),
            ..Filter::default()
        };
        let mut s = Box::pin(flows.subscribe(only_a));
        let deny = Filter {
            verdict: Some(FlowVerdict::Deny),
            policy: Some("b/p".into()),
            ..Filter::default()
        };
        let mut d = Box::pin(flows.subscribe(deny));
        let lat = |e: FlowEvent| match e {
            FlowEvent::Record(r) => r.latency_us,
            FlowEvent::Lagged(n) => panic!("lagged {n}"),
        };
        assert_eq!(lat(s.next().await.expect("replay")), 1);
        assert_eq!(lat(s.next().await.expect("replay")), 3);
        assert_eq!(lat(d.next().await.expect("replay")), 2);
        flows.record(rec(4, "b", "y", FlowVerdict::Allow));
        flows.record(rec(5, "a", "x", FlowVerdict::AuditDeny));
        flows.record(rec(6, "b", "q", FlowVerdict::Deny));
        assert_eq!(lat(s.next().await.expect("live")), 5);
        assert_eq!(lat(d.next().await.expect("live")), 6);
        // Namespace and pod must name the same end.
        let f = Filter {
            namespace: Some("a".into()),
            pod: Some("y".into()),
            ..Filter::default()
        };
        assert!(flows.snapshot(&f).is_empty());
        // The destination end counts too.
        let mut r = rec(7, "c", "c", FlowVerdict::Allow);
        r.destination.namespace = Some("a".into());
        assert!(Filter {
            namespace: Some("a".into()),
            ..Filter::default()
        }
        .matches(&r));
    }

    #[tokio::test]
    async fn proxy_flows_lagging_subscriber_does_not_block_writers() {
        let flows = Flows::new(8);
        let mut s = Box::pin(flows.subscribe(Filter::default()));
        // Nobody reads while 1000 records go in: writers must not wait.
        let start = std::time::Instant::now();
        for i in 0..1000u32 {
            flows.record(rec((i % 250) as u8, "a", "x", FlowVerdict::Allow));
        }
        assert!(start.elapsed() < Duration::from_secs(2));
        match next(&mut s).await {
            FlowEvent::Lagged(n) => assert_eq!(n, 1000 - 8),
            other => panic!("expected a lag marker, got {other:?}"),
        }
        // Then the newest records follow.
        assert!(matches!(next(&mut s).await, FlowEvent::Record(_)));
    }

    #[test]
    fn proxy_flows_record_serialises_as_one_json_object() {
        let r = rec(1, "a", "x", FlowVerdict::AuditDeny);
        let json = serde_json::to_value(&r).expect("serialises");
        assert_eq!(json["verdict"], "audit-deny");
        assert_eq!(json["kind"], "http");
        assert_eq!(json["source"]["namespace"], "a");
        let back: FlowRecord = serde_json::from_value(json).expect("parses back");
        assert_eq!(back, r);
    }
}
