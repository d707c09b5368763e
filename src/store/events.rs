//! Status events: appended by intake and the controller, served by `/events` (spec §6.2).
//!
//! `created` (unix nanoseconds) is the `/events` cursor. It is assigned on the database thread as
//! `max(now, newest + 1)`, so it is unique and strictly increasing even when the clock stalls or
//! steps back, and "everything after cursor C" never skips or repeats a row.

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::watch;

use super::{Result, Store};
use crate::model::WorkflowId;
use crate::model::status::{STATUS_NSID, StatusFrame, StatusRecord, decode_tid};

/// One stored status event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// The cursor value (unix ns).
    pub created: i64,
    /// The `/events` text frame, exactly as sent.
    pub frame: String,
}

impl Store {
    /// Append `record` unconditionally and wake `/events` subscribers.
    pub async fn append_status(&self, record: StatusRecord) -> Result<StoredEvent> {
        let rkey = self.inner.tids.next();
        let stored = self.call(move |conn| insert(conn, &rkey, &record)).await?;
        self.advance_tip(stored.created);
        Ok(stored)
    }

    /// Append `record` only if it changes the workflow's status (the latest stored status of the
    /// same pipeline and workflow differs). This is what makes each transition appear exactly once,
    /// also when a restarted controller recomputes a status it already reported.
    pub async fn append_transition(&self, record: StatusRecord) -> Result<Option<StoredEvent>> {
        let rkey = self.inner.tids.next();
        let stored = self
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let latest = latest_in(&tx, &record.pipeline, &record.workflow)?;
                if latest.as_ref().is_some_and(|l| l.status == record.status) {
                    return Ok(None);
                }
                let stored = insert(&tx, &rkey, &record)?;
                tx.commit()?;
                Ok(Some(stored))
            })
            .await?;
        if let Some(s) = &stored {
            self.advance_tip(s.created);
        }
        Ok(stored)
    }

    /// Up to `limit` events with `created > cursor`, oldest first.
    pub async fn events_after(&self, cursor: i64, limit: usize) -> Result<Vec<StoredEvent>> {
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT created, rkey, nsid, event FROM events WHERE created > ?1 ORDER BY created LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![cursor, limit as i64], |row| {
                let created: i64 = row.get(0)?;
                let rkey: String = row.get(1)?;
                let nsid: String = row.get(2)?;
                let event: String = row.get(3)?;
                Ok(StoredEvent { created, frame: frame_text(&event, &nsid, &rkey) })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// The workflow's current status: its newest event.
    pub async fn latest_status(&self, id: &WorkflowId) -> Result<Option<StatusRecord>> {
        let (pipeline, workflow) = (id.pipeline_uri(), id.name.clone());
        self.call(move |conn| latest_in(conn, &pipeline, &workflow)).await
    }

    /// Raise the tip to `created`, never lower it: two appends finishing in the opposite order of
    /// their commits must not leave the tip below an event that exists.
    pub(super) fn advance_tip(&self, created: i64) {
        self.inner.events_tip.send_if_modified(|tip| {
            let newer = created > *tip;
            if newer {
                *tip = created;
            }
            newer
        });
    }

    /// `created` of the newest event; changes whenever an event is appended.
    pub fn subscribe_events(&self) -> watch::Receiver<i64> {
        self.inner.events_tip.subscribe()
    }
}

/// `{"event":…,"nsid":…,"rkey":…}` without re-encoding the stored event (nsid and rkey never need
/// escaping: an NSID and a TID).
fn frame_text(event: &str, nsid: &str, rkey: &str) -> String {
    let mut s = String::with_capacity(event.len() + nsid.len() + rkey.len() + 32);
    s.push_str("{\"event\":");
    s.push_str(event);
    s.push_str(",\"nsid\":\"");
    s.push_str(nsid);
    s.push_str("\",\"rkey\":\"");
    s.push_str(rkey);
    s.push_str("\"}");
    s
}

pub(super) fn insert(conn: &Connection, rkey: &str, record: &StatusRecord) -> Result<StoredEvent> {
    let now = jiff::Timestamp::now().as_nanosecond() as i64;
    let created = now.max(tip(conn)? + 1);
    let event = serde_json::to_string(record).unwrap_or_default();
    conn.prepare_cached(
        "INSERT INTO events (rkey, nsid, event, created, pipeline, workflow, status) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        rkey,
        STATUS_NSID,
        event,
        created,
        record.pipeline,
        record.workflow,
        record.status.as_str()
    ])?;
    let frame = StatusFrame::new(rkey.to_owned(), record.clone()).to_json();
    Ok(StoredEvent { created, frame })
}

pub(super) fn latest_in(conn: &Connection, pipeline: &str, workflow: &str) -> Result<Option<StatusRecord>> {
    let event: Option<String> = conn
        .prepare_cached(
            "SELECT event FROM events WHERE pipeline = ?1 AND workflow = ?2 ORDER BY created DESC LIMIT 1",
        )?
        .query_row(params![pipeline, workflow], |r| r.get(0))
        .optional()?;
    Ok(event.and_then(|e| serde_json::from_str(&e).ok()))
}

/// `created` of the newest event, 0 when there is none.
pub(super) fn tip(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row("SELECT COALESCE(MAX(created), 0) FROM events", [], |r| r.get(0))?)
}

/// The microseconds of the newest stored TID, so a restarted process never reuses an rkey.
pub(super) fn newest_tid_micros(conn: &Connection) -> Result<u64> {
    let rkey: Option<String> =
        conn.query_row("SELECT rkey FROM events ORDER BY rkey DESC LIMIT 1", [], |r| r.get(0)).optional()?;
    Ok(rkey.and_then(|r| decode_tid(&r)).map(|(micros, _)| micros).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::StatusKind;
    use crate::store::temp_store;

    fn record(id: &WorkflowId, status: StatusKind) -> StatusRecord {
        StatusRecord::new(id, status, jiff::Timestamp::now())
    }

    #[tokio::test]
    async fn appends_page_and_report_latest() {
        let (_dir, store) = temp_store();
        let id = WorkflowId::new("knot1.tangled.sh", "3m734z2gwll22", "build.yml");
        let mut tip = store.subscribe_events();
        let a = store.append_status(record(&id, StatusKind::Pending)).await.expect("a");
        let b = store.append_status(record(&id, StatusKind::Running)).await.expect("b");
        assert!(b.created > a.created);
        assert!(tip.has_changed().expect("open"));
        assert_eq!(*tip.borrow_and_update(), b.created);

        let page = store.events_after(0, 100).await.expect("page");
        assert_eq!(page, vec![a.clone(), b.clone()]);
        let frame: StatusFrame = serde_json::from_str(&page[0].frame).expect("frame json");
        assert_eq!(frame.event.status, StatusKind::Pending);
        assert_eq!(store.events_after(a.created, 100).await.expect("after a"), vec![b.clone()]);
        assert_eq!(store.events_after(0, 1).await.expect("limit").len(), 1);

        let latest = store.latest_status(&id).await.expect("latest").expect("some");
        assert_eq!(latest.status, StatusKind::Running);
    }

    #[tokio::test]
    async fn transitions_are_recorded_once_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        let id = WorkflowId::new("k", "r", "w.yml");
        let first_rkey;
        {
            let store = Store::open(&path).expect("open");
            assert!(store.append_transition(record(&id, StatusKind::Pending)).await.expect("p").is_some());
            assert!(store.append_transition(record(&id, StatusKind::Pending)).await.expect("p2").is_none());
            let s = store.append_transition(record(&id, StatusKind::Running)).await.expect("r");
            first_rkey = serde_json::from_str::<StatusFrame>(&s.expect("some").frame).expect("f").rkey;
        }
        let store = Store::open(&path).expect("reopen");
        assert!(store.append_transition(record(&id, StatusKind::Running)).await.expect("r2").is_none());
        let s = store.append_transition(record(&id, StatusKind::Success)).await.expect("s").expect("some");
        let rkey = serde_json::from_str::<StatusFrame>(&s.frame).expect("f").rkey;
        assert!(rkey > first_rkey, "TIDs keep increasing across restarts");
        assert_eq!(store.events_after(0, 100).await.expect("all").len(), 3);
    }
}
