//! The SQLite store: status events (the `/events` backlog), repos, members, known DIDs, cursors,
//! secrets, log positions.
//!
//! rusqlite is synchronous, so one dedicated thread owns the connection and async callers send it
//! closures ([`Store::call`]); nothing blocks the tokio executor. The database runs in WAL mode with
//! a busy timeout, and [`migrations`] brings any older file up to the current schema on open.

pub mod events;
pub mod intake;
pub mod log_positions;
pub mod migrations;
pub mod permissions;
pub mod secrets;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use rusqlite::Connection;
use tokio::sync::{oneshot, watch};

/// A store failure. The label is stable for metrics.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {path}: {source}")]
    Open { path: PathBuf, source: rusqlite::Error },
    #[error("database migration {version} failed: {source}")]
    Migration { version: usize, source: rusqlite::Error },
    #[error("database {0} was written by a newer bobbin (schema {1}, this build knows {2})")]
    TooNew(PathBuf, usize, usize),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the database thread has stopped")]
    Closed,
}

impl StoreError {
    pub fn label(&self) -> &'static str {
        match self {
            StoreError::Open { .. } => "open",
            StoreError::Migration { .. } => "migration",
            StoreError::TooNew(..) => "too_new",
            StoreError::Sqlite(_) => "sqlite",
            StoreError::Closed => "closed",
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// A handle to the database thread; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    jobs: mpsc::Sender<Job>,
    /// `created` of the newest status event, for `/events` subscribers.
    events_tip: watch::Sender<i64>,
    tids: crate::model::status::TidClock,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.inner.path).finish()
    }
}

impl Store {
    /// Open (creating if needed) and migrate the database at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut conn =
            Connection::open(&path).map_err(|source| StoreError::Open { path: path.clone(), source })?;
        configure(&conn).map_err(|source| StoreError::Open { path: path.clone(), source })?;
        migrations::migrate(&mut conn, &path)?;
        let tip = events::tip(&conn)?;
        let last_tid = events::newest_tid_micros(&conn)?;

        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("bobbin-sqlite".into())
            .spawn(move || {
                let mut conn = conn;
                while let Ok(job) = rx.recv() {
                    job(&mut conn);
                }
            })
            .map_err(|e| StoreError::Open {
                path: path.clone(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        Ok(Store {
            inner: Arc::new(Inner {
                jobs,
                events_tip: watch::channel(tip).0,
                tids: crate::model::status::TidClock::starting_after(last_tid),
                path,
            }),
        })
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Run `f` on the database thread and await its result.
    pub async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = tx.send(f(conn));
        });
        self.inner.jobs.send(job).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Run `f` inside one immediate transaction: all of it commits, or none.
    pub async fn transaction<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<T> + Send + 'static,
    {
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
        .await
    }
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

#[cfg(test)]
pub(crate) fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("spindle.db")).expect("open store");
    (dir, store)
}
