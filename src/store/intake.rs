//! Intake's tables: members, known DIDs, repos, collaborators, the Jetstream and knot cursors and
//! the pipelines already taken in.
//!
//! The ingestion rules run as synchronous functions over one [`rusqlite::Transaction`] (see
//! `intake::ingest`), so each Jetstream event's effects commit atomically; the async methods here
//! are what the stream loops and the XRPC side call.

use rusqlite::{Connection, OptionalExtension, params};

use super::events::{StoredEvent, insert, latest_in};
use super::{Result, Store};
use crate::model::StatusRecord;

/// A registered repo (spec §2.5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRow {
    pub knot: String,
    pub owner: String,
    pub name: String,
    /// Key of the owner's `sh.tangled.repo` record; collaborator at-uris point at it.
    pub rkey: String,
}

/// One collaborator grant and the record that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollaboratorRow {
    pub repo_owner: String,
    pub repo_name: String,
    pub subject: String,
    /// Author and key of the `sh.tangled.repo.collaborator` record (deletes revoke by these).
    pub author: String,
    pub rkey: String,
}

// ---------------------------------------------------------------------------------------------
// Synchronous queries, used inside transactions by the ingestion rules.
// ---------------------------------------------------------------------------------------------

/// DIDs of current members (subjects of member records).
pub fn member_dids(conn: &Connection) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached("SELECT did FROM known_dids ORDER BY did")?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
}

/// Is `did` the subject of some member record?
pub fn is_member(conn: &Connection, did: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM spindle_members WHERE subject = ?1 LIMIT 1")?
        .query_row(params![did], |_| Ok(()))
        .optional()?
        .is_some())
}

/// The subject of the member record (author, rkey), if stored.
pub fn member_subject(conn: &Connection, author: &str, rkey: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT subject FROM spindle_members WHERE did = ?1 AND rkey = ?2")?
        .query_row(params![author, rkey], |r| r.get(0))
        .optional()?)
}

/// Store member record (author, rkey) → subject, replacing what that record said before (B17).
pub fn put_member(conn: &Connection, author: &str, rkey: &str, instance: &str, subject: &str) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO spindle_members (did, rkey, instance, subject) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (did, rkey) DO UPDATE SET instance = excluded.instance, subject = excluded.subject",
    )?
    .execute(params![author, rkey, instance, subject])?;
    sync_known_dids(conn)
}

/// Remove member record (author, rkey); returns the subject it granted.
pub fn delete_member(conn: &Connection, author: &str, rkey: &str) -> Result<Option<String>> {
    let subject = member_subject(conn, author, rkey)?;
    if subject.is_some() {
        conn.prepare_cached("DELETE FROM spindle_members WHERE did = ?1 AND rkey = ?2")?
            .execute(params![author, rkey])?;
        sync_known_dids(conn)?;
    }
    Ok(subject)
}

/// `known_dids` is exactly the set of member subjects: a subject granted by two records stays a
/// member until both are gone.
fn sync_known_dids(conn: &Connection) -> Result<()> {
    conn.execute("DELETE FROM known_dids WHERE did NOT IN (SELECT subject FROM spindle_members)", [])?;
    conn.execute("INSERT OR IGNORE INTO known_dids (did) SELECT DISTINCT subject FROM spindle_members", [])?;
    Ok(())
}

/// The repo registered from record (owner, rkey).
pub fn repo_by_rkey(conn: &Connection, owner: &str, rkey: &str) -> Result<Option<RepoRow>> {
    Ok(conn
        .prepare_cached("SELECT knot, owner, name, rkey FROM repos WHERE owner = ?1 AND rkey = ?2")?
        .query_row(params![owner, rkey], repo_row)
        .optional()?)
}

fn repo_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RepoRow> {
    Ok(RepoRow { knot: r.get(0)?, owner: r.get(1)?, name: r.get(2)?, rkey: r.get(3)? })
}

/// Register (or re-register) the repo of record (owner, rkey). A rename keeps the collaborators;
/// a new record reusing a name replaces the old registration.
pub fn register_repo(conn: &Connection, repo: &RepoRow) -> Result<()> {
    if let Some(old) = repo_by_rkey(conn, &repo.owner, &repo.rkey)?
        && old.name != repo.name
    {
        conn.prepare_cached(
            "UPDATE collaborators SET repo_name = ?3 WHERE repo_owner = ?1 AND repo_name = ?2",
        )?
        .execute(params![repo.owner, old.name, repo.name])?;
    }
    conn.prepare_cached("DELETE FROM repos WHERE owner = ?1 AND (rkey = ?2 OR name = ?3)")?
        .execute(params![repo.owner, repo.rkey, repo.name])?;
    conn.prepare_cached("INSERT INTO repos (knot, owner, name, rkey) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![repo.knot, repo.owner, repo.name, repo.rkey])?;
    Ok(())
}

/// Unregister the repo of record (owner, rkey) and drop its collaborators (B18).
pub fn unregister_repo(conn: &Connection, owner: &str, rkey: &str) -> Result<Option<RepoRow>> {
    let Some(repo) = repo_by_rkey(conn, owner, rkey)? else {
        return Ok(None);
    };
    conn.prepare_cached("DELETE FROM repos WHERE owner = ?1 AND rkey = ?2")?.execute(params![owner, rkey])?;
    conn.prepare_cached("DELETE FROM collaborators WHERE repo_owner = ?1 AND repo_name = ?2")?
        .execute(params![repo.owner, repo.name])?;
    Ok(Some(repo))
}

/// Is (knot, owner, name) registered here? (spec §3.6 step 6)
pub fn repo_registered(conn: &Connection, knot: &str, owner: &str, name: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM repos WHERE knot = ?1 AND owner = ?2 AND name = ?3")?
        .query_row(params![knot, owner, name], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Store a collaborator grant, replacing what record (author, rkey) said before.
pub fn put_collaborator(conn: &Connection, row: &CollaboratorRow) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO collaborators (repo_owner, repo_name, subject, author, rkey) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (author, rkey) DO UPDATE SET
           repo_owner = excluded.repo_owner, repo_name = excluded.repo_name, subject = excluded.subject",
    )?
    .execute(params![row.repo_owner, row.repo_name, row.subject, row.author, row.rkey])?;
    Ok(())
}

/// Revoke the grant made by record (author, rkey); returns it.
pub fn delete_collaborator(conn: &Connection, author: &str, rkey: &str) -> Result<Option<CollaboratorRow>> {
    let row = conn
        .prepare_cached(
            "SELECT repo_owner, repo_name, subject, author, rkey FROM collaborators WHERE author = ?1 AND rkey = ?2",
        )?
        .query_row(params![author, rkey], collaborator_row)
        .optional()?;
    if row.is_some() {
        conn.prepare_cached("DELETE FROM collaborators WHERE author = ?1 AND rkey = ?2")?
            .execute(params![author, rkey])?;
    }
    Ok(row)
}

fn collaborator_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CollaboratorRow> {
    Ok(CollaboratorRow {
        repo_owner: r.get(0)?,
        repo_name: r.get(1)?,
        subject: r.get(2)?,
        author: r.get(3)?,
        rkey: r.get(4)?,
    })
}

/// Make the repo's collaborators exactly `rows` (a complete listing from the owner's PDS).
pub fn replace_collaborators(
    conn: &Connection,
    owner: &str,
    name: &str,
    rows: &[CollaboratorRow],
) -> Result<()> {
    conn.prepare_cached("DELETE FROM collaborators WHERE repo_owner = ?1 AND repo_name = ?2")?
        .execute(params![owner, name])?;
    for row in rows {
        put_collaborator(conn, row)?;
    }
    Ok(())
}

/// The repo's collaborator grants, ordered by subject.
pub fn collaborators(conn: &Connection, owner: &str, name: &str) -> Result<Vec<CollaboratorRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT repo_owner, repo_name, subject, author, rkey FROM collaborators
         WHERE repo_owner = ?1 AND repo_name = ?2 ORDER BY subject, author, rkey",
    )?;
    let rows = stmt.query_map(params![owner, name], collaborator_row)?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

fn pipeline_seen_in(conn: &Connection, knot: &str, rkey: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM pipelines WHERE knot = ?1 AND rkey = ?2")?
        .query_row(params![knot, rkey], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Cursors only move forward: a replayed frame never rewinds them.
fn advance_knot_cursor_in(conn: &Connection, knot: &str, cursor: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO knot_cursors (knot, cursor) VALUES (?1, ?2)
         ON CONFLICT (knot) DO UPDATE SET cursor = MAX(cursor, excluded.cursor)",
    )?
    .execute(params![knot, cursor])?;
    Ok(())
}

impl Store {
    /// Time_us of the last processed Jetstream event, if any.
    pub async fn jetstream_cursor(&self) -> Result<Option<i64>> {
        self.call(|conn| {
            Ok(conn
                .query_row("SELECT last_time_us FROM jetstream_cursor WHERE id = 1", [], |r| r.get(0))
                .optional()?)
        })
        .await
    }

    /// Record that every Jetstream event up to `time_us` has been processed (B8: never wall time).
    pub async fn set_jetstream_cursor(&self, time_us: i64) -> Result<()> {
        self.call(move |conn| {
            conn.prepare_cached(
                "INSERT INTO jetstream_cursor (id, last_time_us) VALUES (1, ?1)
                 ON CONFLICT (id) DO UPDATE SET last_time_us = excluded.last_time_us",
            )?
            .execute(params![time_us])?;
            Ok(())
        })
        .await
    }

    /// The stored cursor for knot source `knot`; 0 when none.
    pub async fn knot_cursor(&self, knot: &str) -> Result<i64> {
        let knot = knot.to_owned();
        self.call(move |conn| {
            Ok(conn
                .prepare_cached("SELECT cursor FROM knot_cursors WHERE knot = ?1")?
                .query_row(params![knot], |r| r.get(0))
                .optional()?
                .unwrap_or(0))
        })
        .await
    }

    /// Move knot `knot`'s cursor forward to `cursor` (never backwards).
    pub async fn advance_knot_cursor(&self, knot: &str, cursor: i64) -> Result<()> {
        let knot = knot.to_owned();
        self.call(move |conn| advance_knot_cursor_in(conn, &knot, cursor)).await
    }

    /// Has pipeline (knot, rkey) been taken in already? (B6)
    pub async fn pipeline_seen(&self, knot: &str, rkey: &str) -> Result<bool> {
        let (knot, rkey) = (knot.to_owned(), rkey.to_owned());
        self.call(move |conn| pipeline_seen_in(conn, &knot, &rkey)).await
    }

    /// In one transaction: mark pipeline (knot, rkey) as taken in and advance the knot's cursor.
    /// Until this commits, a replay of the event redoes (idempotently) everything before it.
    pub async fn mark_pipeline(&self, knot: &str, rkey: &str, cursor: i64) -> Result<()> {
        let (knot, rkey) = (knot.to_owned(), rkey.to_owned());
        self.transaction(move |tx| {
            tx.prepare_cached("INSERT OR IGNORE INTO pipelines (knot, rkey) VALUES (?1, ?2)")?
                .execute(params![knot, rkey])?;
            advance_knot_cursor_in(tx, &knot, cursor)
        })
        .await
    }

    /// Has any status been recorded for pipeline `pipeline_uri`? (Intake started taking it in.)
    pub async fn pipeline_has_statuses(&self, pipeline_uri: &str) -> Result<bool> {
        let uri = pipeline_uri.to_owned();
        self.call(move |conn| {
            Ok(conn
                .prepare_cached("SELECT 1 FROM events WHERE pipeline = ?1 LIMIT 1")?
                .query_row(params![uri], |_| Ok(()))
                .optional()?
                .is_some())
        })
        .await
    }

    /// Every distinct knot of a registered repo: the knot sources at startup (spec §3.1).
    pub async fn repo_knots(&self) -> Result<Vec<String>> {
        self.call(|conn| {
            let mut stmt = conn.prepare_cached("SELECT DISTINCT knot FROM repos ORDER BY knot")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
        })
        .await
    }

    /// Current members (the Jetstream DID filter, besides the owner).
    pub async fn member_dids(&self) -> Result<Vec<String>> {
        self.call(|conn| member_dids(conn)).await
    }

    /// Is (knot, owner, name) a registered repo whose owner is still `server_owner` or a member?
    /// (spec §3.6 step 6, plus B18: a removed member's repos stop taking new pipelines.)
    pub async fn repo_accepts_pipelines(
        &self,
        knot: &str,
        owner: &str,
        name: &str,
        server_owner: &str,
    ) -> Result<bool> {
        let (knot, owner, name, server_owner) =
            (knot.to_owned(), owner.to_owned(), name.to_owned(), server_owner.to_owned());
        self.call(move |conn| {
            Ok(repo_registered(conn, &knot, &owner, &name)?
                && (owner == server_owner || is_member(conn, &owner)?))
        })
        .await
    }

    /// May `did` manage the secrets of repo `owner/name`? True for the repo's owner and its
    /// collaborators while the repo is registered here (spec §2.6 `repo:settings`).
    pub async fn can_manage_repo(&self, owner: &str, name: &str, did: &str) -> Result<bool> {
        let (owner, name, did) = (owner.to_owned(), name.to_owned(), did.to_owned());
        self.call(move |conn| {
            let registered = conn
                .prepare_cached("SELECT 1 FROM repos WHERE owner = ?1 AND name = ?2")?
                .query_row(params![owner, name], |_| Ok(()))
                .optional()?
                .is_some();
            if !registered {
                return Ok(false);
            }
            if did == owner {
                return Ok(true);
            }
            Ok(conn
                .prepare_cached(
                    "SELECT 1 FROM collaborators WHERE repo_owner = ?1 AND repo_name = ?2 AND subject = ?3",
                )?
                .query_row(params![owner, name, did], |_| Ok(()))
                .optional()?
                .is_some())
        })
        .await
    }

    /// Append `record` only if its workflow has no status yet: intake's first status (`pending`
    /// or an intake `failed`) appears exactly once even when a knot event is replayed after the
    /// controller has already moved the workflow on.
    pub async fn append_first_status(&self, record: StatusRecord) -> Result<Option<StoredEvent>> {
        let rkey = self.inner.tids.next();
        let stored = self
            .transaction(move |tx| {
                if latest_in(tx, &record.pipeline, &record.workflow)?.is_some() {
                    return Ok(None);
                }
                Ok(Some(insert(tx, &rkey, &record)?))
            })
            .await?;
        if let Some(s) = &stored {
            self.advance_tip(s.created);
        }
        Ok(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{StatusKind, WorkflowId};
    use crate::store::temp_store;

    #[tokio::test]
    async fn cursors_only_move_forward_and_marks_are_atomic() {
        let (_dir, store) = temp_store();
        assert_eq!(store.knot_cursor("k").await.expect("c"), 0);
        store.mark_pipeline("k", "r1", 100).await.expect("mark");
        store.advance_knot_cursor("k", 50).await.expect("adv");
        assert_eq!(store.knot_cursor("k").await.expect("c"), 100);
        assert!(store.pipeline_seen("k", "r1").await.expect("seen"));
        assert!(!store.pipeline_seen("other", "r1").await.expect("seen"));
        store.mark_pipeline("k", "r1", 200).await.expect("mark again");
        assert_eq!(store.knot_cursor("k").await.expect("c"), 200);

        assert_eq!(store.jetstream_cursor().await.expect("j"), None);
        store.set_jetstream_cursor(42).await.expect("set");
        assert_eq!(store.jetstream_cursor().await.expect("j"), Some(42));
    }

    #[tokio::test]
    async fn first_status_is_appended_once() {
        let (_dir, store) = temp_store();
        let id = WorkflowId::new("k", "r", "w.yml");
        let rec = |s| StatusRecord::new(&id, s, jiff::Timestamp::now());
        assert!(store.append_first_status(rec(StatusKind::Pending)).await.expect("p").is_some());
        assert!(store.append_first_status(rec(StatusKind::Pending)).await.expect("p").is_none());
        store.append_status(rec(StatusKind::Running)).await.expect("r");
        assert!(store.append_first_status(rec(StatusKind::Pending)).await.expect("p").is_none());
        assert_eq!(store.events_after(0, 10).await.expect("all").len(), 2);
    }

    #[tokio::test]
    async fn members_and_repos() {
        let (_dir, store) = temp_store();
        store
            .transaction(|tx| {
                put_member(tx, "owner", "m1", "h", "alice")?;
                put_member(tx, "owner", "m2", "h", "alice")?;
                put_member(tx, "owner", "m1", "h", "bob")?;
                assert_eq!(member_dids(tx)?, ["alice", "bob"]);
                delete_member(tx, "owner", "m2")?;
                assert_eq!(member_dids(tx)?, ["bob"]);
                register_repo(
                    tx,
                    &RepoRow { knot: "k".into(), owner: "bob".into(), name: "a".into(), rkey: "r".into() },
                )?;
                put_collaborator(
                    tx,
                    &CollaboratorRow {
                        repo_owner: "bob".into(),
                        repo_name: "a".into(),
                        subject: "carol".into(),
                        author: "bob".into(),
                        rkey: "c1".into(),
                    },
                )?;
                // Rename via the same record: collaborators follow.
                register_repo(
                    tx,
                    &RepoRow { knot: "k".into(), owner: "bob".into(), name: "b".into(), rkey: "r".into() },
                )?;
                assert_eq!(collaborators(tx, "bob", "b")?.len(), 1);
                assert!(repo_registered(tx, "k", "bob", "b")?);
                assert!(!repo_registered(tx, "k", "bob", "a")?);
                Ok(())
            })
            .await
            .expect("tx");
        assert!(store.can_manage_repo("bob", "b", "carol").await.expect("q"));
        assert!(store.can_manage_repo("bob", "b", "bob").await.expect("q"));
        assert!(!store.can_manage_repo("bob", "b", "mallory").await.expect("q"));
        assert!(store.repo_accepts_pipelines("k", "bob", "b", "owner").await.expect("q"));
        assert_eq!(store.repo_knots().await.expect("knots"), ["k"]);
        store.transaction(|tx| unregister_repo(tx, "bob", "r")).await.expect("unreg");
        assert!(!store.can_manage_repo("bob", "b", "carol").await.expect("q"));
        assert!(!store.repo_accepts_pipelines("k", "bob", "b", "owner").await.expect("q"));
    }
}
