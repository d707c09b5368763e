//! Rows of the sqlite secrets provider. Values arrive here already encrypted: this layer only ever
//! sees nonces and ciphertexts (B22).

use rusqlite::params;

use super::{Result, Store};

/// One stored secret, still sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedSecret {
    pub key: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    /// RFC 3339, seconds, UTC (set by SQLite on insert).
    pub created_at: String,
    pub created_by: String,
}

impl Store {
    /// Insert a sealed secret; `false` when `(repo, key)` already exists (nothing is changed then).
    pub async fn insert_secret(
        &self,
        repo: &str,
        key: &str,
        nonce: Vec<u8>,
        ciphertext: Vec<u8>,
        created_by: &str,
    ) -> Result<bool> {
        let (repo, key, created_by) = (repo.to_owned(), key.to_owned(), created_by.to_owned());
        self.call(move |conn| {
            let n = conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO secrets (repo, key, nonce, ciphertext, created_by)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![repo, key, nonce, ciphertext, created_by])?;
            Ok(n == 1)
        })
        .await
    }

    /// Delete `(repo, key)`; `false` when there was no such secret.
    pub async fn delete_secret(&self, repo: &str, key: &str) -> Result<bool> {
        let (repo, key) = (repo.to_owned(), key.to_owned());
        self.call(move |conn| {
            let n = conn
                .prepare_cached("DELETE FROM secrets WHERE repo = ?1 AND key = ?2")?
                .execute(params![repo, key])?;
            Ok(n == 1)
        })
        .await
    }

    /// Every secret of `repo` in storage (insertion) order.
    pub async fn sealed_secrets(&self, repo: &str) -> Result<Vec<SealedSecret>> {
        let repo = repo.to_owned();
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT key, nonce, ciphertext, created_at, created_by FROM secrets WHERE repo = ?1 ORDER BY id",
            )?;
            let rows = stmt.query_map([repo], |r| {
                Ok(SealedSecret {
                    key: r.get(0)?,
                    nonce: r.get(1)?,
                    ciphertext: r.get(2)?,
                    created_at: r.get(3)?,
                    created_by: r.get(4)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use crate::store::temp_store;

    #[tokio::test]
    async fn insert_is_unique_per_repo_and_key() {
        let (_dir, store) = temp_store();
        let by = "did:plc:alice";
        assert!(store.insert_secret("did:plc:alice/r", "K", vec![1], vec![2], by).await.expect("1"));
        assert!(!store.insert_secret("did:plc:alice/r", "K", vec![3], vec![4], by).await.expect("dup"));
        assert!(store.insert_secret("did:plc:alice/s", "K", vec![5], vec![6], by).await.expect("other repo"));
        let rows = store.sealed_secrets("did:plc:alice/r").await.expect("list");
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].nonce.clone(), rows[0].ciphertext.clone()), (vec![1], vec![2]));
        assert!(rows[0].created_at.ends_with('Z'), "{}", rows[0].created_at);
        assert!(store.delete_secret("did:plc:alice/r", "K").await.expect("del"));
        assert!(!store.delete_secret("did:plc:alice/r", "K").await.expect("del again"));
        assert!(store.sealed_secrets("did:plc:alice/r").await.expect("list").is_empty());
    }
}
