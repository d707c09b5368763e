//! The `sqlite` secrets provider: secrets in the spindle database, sealed with XChaCha20-Poly1305.
//!
//! The Go spindle stores values in plaintext (B22). Here every value is encrypted with a key that is
//! not in the database (`BOBBIN_SECRETS_KEY` or `BOBBIN_SECRETS_KEY_FILE`), under a fresh random
//! 192-bit nonce, with the row's (scope, key) as associated data: a ciphertext copied into another
//! row or repo fails to open instead of leaking into the wrong pipeline.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use futures::future::BoxFuture;

use super::{SecretEntry, SecretValues, SecretsError, SecretsManager};
use crate::config::Config;
use crate::store::Store;

/// Variable holding the key inline (base64 of 32 bytes).
pub const KEY_VAR: &str = "BOBBIN_SECRETS_KEY";
/// Variable naming a file that holds the key (base64 of 32 bytes), e.g. a mounted Kubernetes Secret.
pub const KEY_FILE_VAR: &str = "BOBBIN_SECRETS_KEY_FILE";

const NONCE_LEN: usize = 24;

/// Why the encryption key cannot be used. Each message names the variable to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "{KEY_VAR} (or {KEY_FILE_VAR}) is required with the sqlite secrets provider: \
         set it to 32 random bytes in base64, e.g. the output of `head -c 32 /dev/urandom | base64`"
    )]
    Missing,
    #[error("{KEY_VAR} and {KEY_FILE_VAR} are both set; set only one")]
    Ambiguous,
    #[error("{variable}: cannot read {path}: {message}")]
    Unreadable { variable: &'static str, path: String, message: String },
    #[error("{variable}: not valid base64: {message}")]
    NotBase64 { variable: &'static str, message: String },
    #[error("{variable}: the key must be 32 bytes, got {len}")]
    WrongLength { variable: &'static str, len: usize },
}

impl KeyError {
    pub fn label(&self) -> &'static str {
        match self {
            KeyError::Missing => "missing",
            KeyError::Ambiguous => "ambiguous",
            KeyError::Unreadable { .. } => "unreadable",
            KeyError::NotBase64 { .. } => "not_base64",
            KeyError::WrongLength { .. } => "wrong_length",
        }
    }
}

/// The 256-bit key that seals secret values. Its `Debug` never shows the bytes.
#[derive(Clone)]
pub struct SecretsKey([u8; 32]);

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretsKey(…)")
    }
}

impl SecretsKey {
    /// Decode a base64 key (standard or URL-safe alphabet, padding optional); surrounding
    /// whitespace, such as a file's trailing newline, is ignored.
    pub fn from_base64(variable: &'static str, text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let engines = [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::STANDARD_NO_PAD,
            base64::engine::general_purpose::URL_SAFE,
            base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ];
        let mut last_error = String::new();
        for engine in engines {
            match engine.decode(text) {
                Ok(bytes) => {
                    let len = bytes.len();
                    return bytes
                        .try_into()
                        .map(SecretsKey)
                        .map_err(|_| KeyError::WrongLength { variable, len });
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        Err(KeyError::NotBase64 { variable, message: last_error })
    }

    /// The key from the configuration: `BOBBIN_SECRETS_KEY`, or the file `BOBBIN_SECRETS_KEY_FILE`.
    pub fn from_config(config: &Config) -> Result<Self, KeyError> {
        match (&config.secrets_key, &config.secrets_key_file) {
            (Some(_), Some(_)) => Err(KeyError::Ambiguous),
            (Some(inline), None) => Self::from_base64(KEY_VAR, inline),
            (None, Some(path)) => Self::from_file(path),
            (None, None) => Err(KeyError::Missing),
        }
    }

    fn from_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeyError::Unreadable {
            variable: KEY_FILE_VAR,
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_base64(KEY_FILE_VAR, &text)
    }

    /// A fresh random key (tests, and `bobbin` tooling that generates one).
    pub fn generate() -> Result<Self, SecretsError> {
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes)
            .map_err(|e| SecretsError::Backend(format!("no randomness for a key: {e}")))?;
        Ok(SecretsKey(bytes))
    }
}

/// Associated data binding a ciphertext to its row: an injective encoding of (scope, key).
fn associated_data(scope: &str, key: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(16 + scope.len() + key.len());
    aad.extend_from_slice(b"bobbin-secret-v1");
    aad.extend_from_slice(&(scope.len() as u64).to_be_bytes());
    aad.extend_from_slice(scope.as_bytes());
    aad.extend_from_slice(key.as_bytes());
    aad
}

/// Secrets sealed in the spindle's SQLite database.
#[derive(Clone)]
pub struct SqliteSecrets {
    store: Store,
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for SqliteSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteSecrets").field("store", &self.store).finish_non_exhaustive()
    }
}

impl SqliteSecrets {
    pub fn new(store: Store, key: &SecretsKey) -> Self {
        SqliteSecrets { store, cipher: XChaCha20Poly1305::new(&key.0.into()) }
    }

    fn seal(&self, scope: &str, key: &str, value: &str) -> Result<(Vec<u8>, Vec<u8>), SecretsError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce)
            .map_err(|e| SecretsError::Backend(format!("no randomness for a nonce: {e}")))?;
        let aad = associated_data(scope, key);
        let ciphertext = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: value.as_bytes(), aad: &aad })
            .map_err(|_| SecretsError::Backend("cannot encrypt secret".into()))?;
        Ok((nonce.to_vec(), ciphertext))
    }

    fn open(&self, scope: &str, key: &str, nonce: &[u8], ciphertext: &[u8]) -> Result<String, SecretsError> {
        if nonce.len() != NONCE_LEN {
            return Err(SecretsError::Backend(format!("secret {key} of {scope} has a malformed nonce")));
        }
        let aad = associated_data(scope, key);
        let plain = self
            .cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ciphertext, aad: &aad })
            .map_err(|_| {
                SecretsError::Backend(format!(
                    "secret {key} of {scope} cannot be decrypted (wrong BOBBIN_SECRETS_KEY, or the row was tampered with)"
                ))
            })?;
        String::from_utf8(plain)
            .map_err(|_| SecretsError::Backend(format!("secret {key} of {scope} is not UTF-8")))
    }
}

fn backend(e: crate::store::StoreError) -> SecretsError {
    SecretsError::Backend(e.to_string())
}

impl SecretValues for SqliteSecrets {
    fn values<'a>(&'a self, scope: &'a str) -> BoxFuture<'a, Result<BTreeMap<String, String>, SecretsError>> {
        Box::pin(async move {
            let rows = self.store.sealed_secrets(scope).await.map_err(backend)?;
            rows.into_iter()
                .map(|r| Ok((r.key.clone(), self.open(scope, &r.key, &r.nonce, &r.ciphertext)?)))
                .collect()
        })
    }
}

impl SecretsManager for SqliteSecrets {
    fn add<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        value: &'a str,
        created_by: &'a str,
    ) -> BoxFuture<'a, Result<(), SecretsError>> {
        Box::pin(async move {
            let (nonce, ciphertext) = self.seal(scope, key, value)?;
            match self.store.insert_secret(scope, key, nonce, ciphertext, created_by).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(SecretsError::AlreadyPresent),
                Err(e) => Err(backend(e)),
            }
        })
    }

    fn remove<'a>(&'a self, scope: &'a str, key: &'a str) -> BoxFuture<'a, Result<(), SecretsError>> {
        Box::pin(async move {
            match self.store.delete_secret(scope, key).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(SecretsError::NotFound),
                Err(e) => Err(backend(e)),
            }
        })
    }

    fn list<'a>(&'a self, scope: &'a str) -> BoxFuture<'a, Result<Vec<SecretEntry>, SecretsError>> {
        Box::pin(async move {
            let rows = self.store.sealed_secrets(scope).await.map_err(backend)?;
            Ok(rows
                .into_iter()
                .map(|r| SecretEntry { key: r.key, created_at: r.created_at, created_by: r.created_by })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::temp_store;

    const SCOPE: &str = "did:plc:rjnvgfygwwqc5hyfsxmecosf/hello-spindle";
    const BY: &str = "did:plc:rjnvgfygwwqc5hyfsxmecosf";

    fn provider(store: Store) -> SqliteSecrets {
        SqliteSecrets::new(store, &SecretsKey::generate().expect("key"))
    }

    #[tokio::test]
    async fn add_list_values_remove() {
        let (_dir, store) = temp_store();
        let secrets = provider(store);
        secrets.add(SCOPE, "NPM_TOKEN", "npm_9c1f0b7e5d2a4c8e", BY).await.expect("add");
        secrets.add(SCOPE, "B", "two", BY).await.expect("add b");
        assert_eq!(secrets.add(SCOPE, "B", "again", BY).await, Err(SecretsError::AlreadyPresent));
        let list = secrets.list(SCOPE).await.expect("list");
        assert_eq!(list.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(), ["NPM_TOKEN", "B"]);
        assert_eq!(list[0].created_by, BY);
        let values = secrets.values(SCOPE).await.expect("values");
        assert_eq!(values.get("NPM_TOKEN").map(String::as_str), Some("npm_9c1f0b7e5d2a4c8e"));
        assert_eq!(values.get("B").map(String::as_str), Some("two"));
        secrets.remove(SCOPE, "B").await.expect("remove");
        assert_eq!(secrets.remove(SCOPE, "B").await, Err(SecretsError::NotFound));
        assert!(secrets.values("did:plc:other/repo").await.expect("none").is_empty());
    }

    #[tokio::test]
    async fn ciphertexts_cannot_move_between_rows_or_keys() {
        let (_dir, store) = temp_store();
        let secrets = provider(store.clone());
        secrets.add(SCOPE, "A", "alpha", BY).await.expect("a");
        secrets.add("did:plc:mallory/repo", "A", "mine", BY).await.expect("m");
        // Copy the victim's sealed value into the attacker's row.
        store
            .call(|c| {
                c.execute(
                    "UPDATE secrets SET nonce = (SELECT nonce FROM secrets WHERE repo = ?1),
                                        ciphertext = (SELECT ciphertext FROM secrets WHERE repo = ?1)
                     WHERE repo = 'did:plc:mallory/repo'",
                    [SCOPE],
                )?;
                Ok(())
            })
            .await
            .expect("swap");
        let e = secrets.values("did:plc:mallory/repo").await.expect_err("swapped row must not open");
        assert!(e.to_string().contains("cannot be decrypted"), "{e}");
        // A different key cannot open it either.
        let other = provider(store);
        assert!(other.values(SCOPE).await.is_err());
    }

    #[test]
    fn key_errors_name_the_variable() {
        let mut config = Config::for_tests();
        config.secrets_key = None;
        config.secrets_key_file = None;
        let e = SecretsKey::from_config(&config).expect_err("missing");
        assert!(e.to_string().contains("BOBBIN_SECRETS_KEY"), "{e}");
        config.secrets_key = Some("not base64!".into());
        let e = SecretsKey::from_config(&config).expect_err("bad");
        assert!(e.to_string().starts_with("BOBBIN_SECRETS_KEY: not valid base64"), "{e}");
        config.secrets_key = Some(base64::engine::general_purpose::STANDARD.encode([7u8; 16]));
        assert_eq!(
            SecretsKey::from_config(&config).expect_err("short"),
            KeyError::WrongLength { variable: KEY_VAR, len: 16 }
        );
        config.secrets_key = Some(base64::engine::general_purpose::STANDARD.encode([7u8; 32]));
        assert!(SecretsKey::from_config(&config).is_ok());

        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("key");
        std::fs::write(&file, format!("{}\n", base64::engine::general_purpose::STANDARD.encode([9u8; 32])))
            .expect("write");
        config.secrets_key_file = Some(file.clone());
        assert_eq!(SecretsKey::from_config(&config).expect_err("both"), KeyError::Ambiguous);
        config.secrets_key = None;
        assert!(SecretsKey::from_config(&config).is_ok(), "file with trailing newline");
        config.secrets_key_file = Some(dir.path().join("missing"));
        let e = SecretsKey::from_config(&config).expect_err("unreadable");
        assert!(e.to_string().starts_with("BOBBIN_SECRETS_KEY_FILE: cannot read"), "{e}");
        assert!(!format!("{:?}", SecretsKey([1; 32])).contains('1'));
    }
}
