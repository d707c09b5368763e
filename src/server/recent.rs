//! The newest status events, shared by every `/events` subscriber.
//!
//! Without it, each live event would cost one store query per subscriber (100 subscribers, 100
//! queries, all serialised on the database thread). Here the first subscriber to notice a new tip
//! fetches it once for everyone; the rest read it from memory. The window is bounded: a subscriber
//! whose cursor is older than the window (a backfill, or a reader that fell far behind) pages from
//! the store instead, so memory never depends on the backlog.

use std::collections::VecDeque;
use std::sync::RwLock;

use crate::store::events::StoredEvent;
use crate::store::{Result, Store};

/// Every event with `floor < created <= last`, oldest first, at most `capacity` of them.
#[derive(Debug)]
struct Window {
    floor: i64,
    last: i64,
    events: VecDeque<StoredEvent>,
}

#[derive(Debug)]
pub struct RecentEvents {
    window: RwLock<Window>,
    /// Held while fetching, so concurrent subscribers wait for one query instead of each running it.
    fetching: tokio::sync::Mutex<()>,
    capacity: usize,
}

impl RecentEvents {
    /// An empty window starting at the store's current tip.
    pub fn new(capacity: usize, tip: i64) -> Self {
        RecentEvents {
            window: RwLock::new(Window { floor: tip, last: tip, events: VecDeque::new() }),
            fetching: tokio::sync::Mutex::new(()),
            capacity: capacity.max(1),
        }
    }

    fn last(&self) -> i64 {
        self.window.read().unwrap_or_else(std::sync::PoisonError::into_inner).last
    }

    /// Make the window reach `tip` (the store's newest `created` as last observed).
    pub async fn refresh(&self, store: &Store, tip: i64, page: usize) -> Result<()> {
        if self.last() >= tip {
            return Ok(());
        }
        let _one_fetch = self.fetching.lock().await;
        loop {
            let last = self.last();
            if last >= tip {
                return Ok(());
            }
            let batch = store.events_after(last, page).await?;
            let exhausted = batch.len() < page;
            self.push(batch);
            if exhausted {
                return Ok(());
            }
        }
    }

    fn push(&self, batch: Vec<StoredEvent>) {
        let mut w = self.window.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        for event in batch {
            if event.created <= w.last {
                continue;
            }
            w.last = event.created;
            w.events.push_back(event);
            if w.events.len() > self.capacity
                && let Some(old) = w.events.pop_front()
            {
                w.floor = old.created;
            }
        }
    }

    /// Up to `limit` events with `created > cursor`, or `None` when the window does not reach back
    /// to `cursor` (the caller then reads the store).
    pub fn read(&self, cursor: i64, limit: usize) -> Option<Vec<StoredEvent>> {
        let w = self.window.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cursor < w.floor {
            return None;
        }
        let start = w.events.partition_point(|e| e.created <= cursor);
        Some(w.events.range(start..).take(limit).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{StatusKind, StatusRecord, WorkflowId};
    use crate::store::temp_store;

    #[tokio::test]
    async fn window_follows_the_store_and_stays_bounded() {
        let (_dir, store) = temp_store();
        let id = WorkflowId::new("k", "r", "w.yml");
        let before =
            store.append_status(StatusRecord::new(&id, StatusKind::Pending, jiff::Timestamp::now())).await;
        let before = before.expect("append");
        let recent = RecentEvents::new(3, before.created);
        assert_eq!(recent.read(before.created, 10), Some(vec![]));
        assert_eq!(recent.read(before.created - 1, 10), None, "older than the window");

        let mut appended = Vec::new();
        for _ in 0..5 {
            let rec = StatusRecord::new(&id, StatusKind::Running, jiff::Timestamp::now());
            appended.push(store.append_status(rec).await.expect("append"));
        }
        let tip = appended[4].created;
        recent.refresh(&store, tip, 2).await.expect("refresh");
        // Capacity 3: the newest three are held, older cursors go to the store.
        assert_eq!(recent.read(appended[1].created, 10), Some(appended[2..].to_vec()));
        assert_eq!(recent.read(appended[2].created, 1), Some(vec![appended[3].clone()]));
        assert_eq!(recent.read(appended[0].created, 10), None);
        assert_eq!(recent.read(tip, 10), Some(vec![]));
        recent.refresh(&store, tip, 2).await.expect("no-op when current");
    }
}
