//! Versioned schema migrations, tracked in `PRAGMA user_version`. Append new versions at the end;
//! never edit a released one.

use std::path::Path;

use rusqlite::Connection;

use super::{Result, StoreError};

/// Every schema version in order; version N is `MIGRATIONS[N - 1]`.
pub const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r#"
    -- Status events: the /events backlog. `created` (unix ns) is the cursor and strictly increasing.
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        rkey TEXT NOT NULL UNIQUE,
        nsid TEXT NOT NULL,
        event TEXT NOT NULL,
        created INTEGER NOT NULL UNIQUE,
        pipeline TEXT NOT NULL,
        workflow TEXT NOT NULL,
        status TEXT NOT NULL
    );
    CREATE INDEX events_by_workflow ON events (pipeline, workflow, created);

    -- Repos that chose this spindle (spec 2.5.2).
    CREATE TABLE repos (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        knot TEXT NOT NULL,
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        rkey TEXT NOT NULL DEFAULT '',
        added_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
        UNIQUE (owner, name)
    );
    CREATE INDEX repos_by_knot ON repos (knot);

    -- sh.tangled.spindle.member records (spec 2.5.1), keyed by (author, rkey) so updates replace (B17).
    CREATE TABLE spindle_members (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        did TEXT NOT NULL,
        rkey TEXT NOT NULL,
        instance TEXT NOT NULL,
        subject TEXT NOT NULL,
        created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
        UNIQUE (did, rkey)
    );

    -- DIDs whose Jetstream records we process, besides the owner.
    CREATE TABLE known_dids (did TEXT PRIMARY KEY);

    -- Collaborators per repo (spec 2.5.3), with the record that granted them so deletes revoke (B18).
    CREATE TABLE collaborators (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        repo_owner TEXT NOT NULL,
        repo_name TEXT NOT NULL,
        subject TEXT NOT NULL,
        author TEXT NOT NULL,
        rkey TEXT NOT NULL,
        UNIQUE (author, rkey)
    );
    CREATE INDEX collaborators_by_repo ON collaborators (repo_owner, repo_name);

    -- Jetstream cursor: time_us of the last processed event (B8).
    CREATE TABLE jetstream_cursor (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        last_time_us INTEGER NOT NULL
    );

    -- Knot event-stream cursors (unix ns), per knot source key.
    CREATE TABLE knot_cursors (knot TEXT PRIMARY KEY, cursor INTEGER NOT NULL);

    -- Pipelines already taken in, so a replayed knot event never runs twice (B6).
    CREATE TABLE pipelines (
        knot TEXT NOT NULL,
        rkey TEXT NOT NULL,
        received_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
        PRIMARY KEY (knot, rkey)
    );

    -- Repo secrets for the sqlite provider: values are encrypted (XChaCha20-Poly1305), never plain (B22).
    CREATE TABLE secrets (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        repo TEXT NOT NULL,
        key TEXT NOT NULL,
        nonce BLOB NOT NULL,
        ciphertext BLOB NOT NULL,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
        created_by TEXT NOT NULL,
        UNIQUE (repo, key)
    );
    "#,
    // 2: log follower positions, so a restarted bobbin resumes a run's log where it stopped.
    r#"
    CREATE TABLE log_positions (
        log_file TEXT PRIMARY KEY,
        run_uid TEXT NOT NULL,
        file_offset INTEGER NOT NULL,
        state TEXT NOT NULL,
        done INTEGER NOT NULL DEFAULT 0,
        updated_at INTEGER NOT NULL
    );
    "#,
];

/// Bring `conn` up to the newest schema, one transaction per version.
pub fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let current: usize = conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? as usize;
    if current > MIGRATIONS.len() {
        return Err(StoreError::TooNew(path.to_path_buf(), current, MIGRATIONS.len()));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let version = i + 1;
        let tx = conn.transaction().map_err(|source| StoreError::Migration { version, source })?;
        tx.execute_batch(sql).map_err(|source| StoreError::Migration { version, source })?;
        tx.pragma_update(None, "user_version", version as i64)
            .map_err(|source| StoreError::Migration { version, source })?;
        tx.commit().map_err(|source| StoreError::Migration { version, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_once_and_refuses_newer_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        let mut conn = Connection::open(&path).expect("open");
        migrate(&mut conn, &path).expect("first");
        migrate(&mut conn, &path).expect("idempotent");
        let v: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).expect("v");
        assert_eq!(v as usize, MIGRATIONS.len());
        conn.pragma_update(None, "user_version", 999).expect("bump");
        assert!(matches!(migrate(&mut conn, &path), Err(StoreError::TooNew(_, 999, _))));
    }
}
