//! Where each workflow's log follower stands: which run owns the log file, how many bytes of it
//! are committed, and the follower's own progress (an opaque JSON document owned by
//! `logs::follower`). One row per log file, so a new run of the same workflow replaces the row.

use rusqlite::{OptionalExtension, params};

use super::{Result, Store};

/// One stored position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPosition {
    /// The log file name (`WorkflowId::log_file_name`).
    pub log_file: String,
    /// The WorkflowRun uid that wrote it.
    pub run_uid: String,
    /// Bytes of the file that are covered by `state`.
    pub file_offset: u64,
    /// The follower's progress, JSON.
    pub state: String,
    /// The follower finished this run.
    pub done: bool,
}

impl Store {
    /// The position recorded for `log_file`, if any.
    pub async fn log_position(&self, log_file: &str) -> Result<Option<LogPosition>> {
        let log_file = log_file.to_owned();
        self.call(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT log_file, run_uid, file_offset, state, done FROM log_positions WHERE log_file = ?1",
                )?
                .query_row(params![log_file], row)
                .optional()?)
        })
        .await
    }

    /// Record (insert or replace) a position.
    pub async fn save_log_position(&self, pos: LogPosition) -> Result<()> {
        self.call(move |conn| {
            conn.prepare_cached(
                "INSERT INTO log_positions (log_file, run_uid, file_offset, state, done, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (log_file) DO UPDATE SET run_uid = excluded.run_uid,
                   file_offset = excluded.file_offset, state = excluded.state, done = excluded.done,
                   updated_at = excluded.updated_at",
            )?
            .execute(params![
                pos.log_file,
                pos.run_uid,
                pos.file_offset as i64,
                pos.state,
                pos.done,
                jiff::Timestamp::now().as_second()
            ])?;
            Ok(())
        })
        .await
    }

    /// Positions of followers that have not finished (to resume after a restart).
    pub async fn unfinished_log_positions(&self) -> Result<Vec<LogPosition>> {
        self.call(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT log_file, run_uid, file_offset, state, done FROM log_positions WHERE done = 0 ORDER BY log_file",
            )?;
            let rows = stmt.query_map([], row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LogPosition> {
    Ok(LogPosition {
        log_file: r.get(0)?,
        run_uid: r.get(1)?,
        file_offset: r.get::<_, i64>(2)?.max(0) as u64,
        state: r.get(3)?,
        done: r.get(4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::temp_store;

    #[tokio::test]
    async fn positions_are_replaced_per_file() {
        let (_dir, store) = temp_store();
        assert_eq!(store.log_position("a.log").await.expect("get"), None);
        let mut pos = LogPosition {
            log_file: "a.log".into(),
            run_uid: "uid-1".into(),
            file_offset: 10,
            state: "{}".into(),
            done: false,
        };
        store.save_log_position(pos.clone()).await.expect("save");
        assert_eq!(store.log_position("a.log").await.expect("get"), Some(pos.clone()));
        assert_eq!(store.unfinished_log_positions().await.expect("list"), vec![pos.clone()]);
        pos.run_uid = "uid-2".into();
        pos.done = true;
        store.save_log_position(pos.clone()).await.expect("replace");
        assert_eq!(store.log_position("a.log").await.expect("get"), Some(pos));
        assert!(store.unfinished_log_positions().await.expect("list").is_empty());
    }
}
