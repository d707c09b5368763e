//! Live fan-out of appended log bytes to `/logs` viewers.
//!
//! One topic per log file. The follower appends to the file first and then publishes the same
//! bytes with their file offset, so a viewer that subscribes, then reads the file, then takes live
//! chunks at or past the offset it read up to never misses or repeats a line. Each viewer has a
//! bounded buffer (a tokio broadcast ring): the writer never waits for anyone, and a viewer that
//! falls behind sees `Lagged` and is dropped by the server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, watch};

/// Whole lines appended to a log file, as one chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// File offset of the first byte.
    pub offset: u64,
    /// One or more complete NDJSON lines, each ending in `\n`.
    pub bytes: Arc<[u8]>,
}

impl Appended {
    pub fn end(&self) -> u64 {
        self.offset + self.bytes.len() as u64
    }
}

/// Whether a follower is writing a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// Nobody is writing (never started, or finished and drained everything).
    Idle,
    /// A follower is appending.
    Active,
}

struct Topic {
    lines: broadcast::Sender<Appended>,
    writer: watch::Sender<Writer>,
}

/// What a viewer holds: live chunks plus the writer state.
pub struct Subscription {
    pub lines: broadcast::Receiver<Appended>,
    pub writer: watch::Receiver<Writer>,
}

/// The hub; cheap to clone.
#[derive(Clone)]
pub struct LogHub {
    topics: Arc<Mutex<HashMap<String, Topic>>>,
    capacity: usize,
    metrics: super::metrics::LogMetrics,
}

impl std::fmt::Debug for LogHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogHub").field("capacity", &self.capacity).finish()
    }
}

impl LogHub {
    /// `capacity`: how many unsent chunks one viewer may fall behind before it is dropped.
    pub fn new(capacity: usize) -> Self {
        LogHub {
            topics: Arc::new(Mutex::new(HashMap::new())),
            capacity: capacity.max(1),
            metrics: super::metrics::LogMetrics::default(),
        }
    }

    /// The log metrics, shared by everything that holds this hub (followers and `/logs`).
    pub fn metrics(&self) -> &super::metrics::LogMetrics {
        &self.metrics
    }

    fn with_topic<T>(&self, key: &str, f: impl FnOnce(&Topic) -> T) -> T {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let topic = topics.entry(key.to_owned()).or_insert_with(|| Topic {
            lines: broadcast::channel(self.capacity).0,
            writer: watch::channel(Writer::Idle).0,
        });
        f(topic)
    }

    /// Subscribe to `key` (a log file name).
    pub fn subscribe(&self, key: &str) -> Subscription {
        self.with_topic(key, |t| Subscription { lines: t.lines.subscribe(), writer: t.writer.subscribe() })
    }

    /// Publish appended bytes; never blocks.
    pub fn publish(&self, key: &str, appended: Appended) {
        let topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = topics.get(key) {
            // No receivers is fine: nobody is watching.
            let _ = t.lines.send(appended);
        }
    }

    /// Publish the chunk `make` builds, building it only when someone watches `key`: with no
    /// viewer (the common case) the writer skips copying every chunk. A viewer that subscribes
    /// after this check subscribed after the bytes were appended to the file, so its file read
    /// covers them.
    pub fn publish_with(&self, key: &str, make: impl FnOnce() -> Appended) {
        let topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = topics.get(key)
            && t.lines.receiver_count() > 0
        {
            let _ = t.lines.send(make());
        }
    }

    /// Mark a follower as writing `key`.
    pub fn writer_active(&self, key: &str) {
        self.with_topic(key, |t| t.writer.send_replace(Writer::Active));
    }

    /// The follower of `key` has written everything it will write.
    pub fn writer_done(&self, key: &str) {
        self.with_topic(key, |t| t.writer.send_replace(Writer::Idle));
    }

    /// A new run replaced the file: end every current subscription (their offsets are stale).
    pub fn reset(&self, key: &str) {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = topics.remove(key) {
            let state = *old.writer.borrow();
            topics.insert(
                key.to_owned(),
                Topic { lines: broadcast::channel(self.capacity).0, writer: watch::channel(state).0 },
            );
        }
    }

    /// Forget topics nobody watches and nobody writes.
    pub fn gc(&self) {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics.retain(|_, t| t.lines.receiver_count() > 0 || *t.writer.borrow() == Writer::Active);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(offset: u64, s: &str) -> Appended {
        Appended { offset, bytes: Arc::from(s.as_bytes()) }
    }

    #[tokio::test]
    async fn fans_out_and_drops_slow_viewers_without_blocking() {
        let hub = LogHub::new(2);
        let mut fast = hub.subscribe("w.log");
        let mut slow = hub.subscribe("w.log");
        hub.writer_active("w.log");
        assert_eq!(*fast.writer.borrow_and_update(), Writer::Active);
        for i in 0..3u64 {
            hub.publish("w.log", chunk(i * 2, "x\n"));
            assert_eq!(fast.lines.recv().await.expect("fast keeps up").offset, i * 2);
        }
        // The slow one fell behind by more than its buffer: it learns so instead of stalling us.
        assert!(matches!(slow.lines.recv().await, Err(broadcast::error::RecvError::Lagged(1))));
        hub.writer_done("w.log");
        assert!(fast.writer.has_changed().expect("open"));
        assert_eq!(*fast.writer.borrow_and_update(), Writer::Idle);
        // Reset closes current subscriptions.
        hub.reset("w.log");
        assert!(matches!(fast.lines.recv().await, Err(broadcast::error::RecvError::Closed)));
        hub.gc();
        assert!(hub.topics.lock().expect("lock").get("w.log").is_none());
    }
}
