//! The SQLite store: status events, repos, members, cursors, secrets.
