//! The `kubernetes` secrets provider: one Kubernetes Secret per repo in bobbin's namespace.
//!
//! The Secret's name is derived from the scope by SHA-256 (`bobbin-repo-<64 hex>`), so different
//! repos never share a Secret (unlike OpenBao's lossy path sanitising, B23); the scope itself is kept
//! in an annotation and checked on every read. Each secret key is a `data` key; when and by whom it
//! was added is kept in one JSON annotation, because secret keys are not valid annotation names.
//! Writes use the Secret's resourceVersion, so two concurrent adds cannot overwrite each other.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{DeleteParams, PostParams, Preconditions};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{SecretEntry, SecretValues, SecretsError, SecretsManager};

/// Annotation holding the repo scope (`<owner did>/<repo name>`) the Secret belongs to.
pub const SCOPE_ANNOTATION: &str = "bobbin.dev/secret-scope";
/// Annotation holding `{"<KEY>": {"createdAt": …, "createdBy": …}}`.
pub const KEYS_ANNOTATION: &str = "bobbin.dev/secret-keys";
/// Attempts before a write that keeps conflicting gives up.
const ATTEMPTS: usize = 5;
/// What `listSecrets` reports for a key added behind bobbin's back (Go's zero time).
const UNKNOWN_TIME: &str = "0001-01-01T00:00:00Z";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct KeyMeta {
    #[serde(rename = "createdAt")]
    created_at: String,
    #[serde(rename = "createdBy")]
    created_by: String,
}

/// The name of the Secret holding `scope`'s secrets.
pub fn secret_name(scope: &str) -> String {
    let digest = Sha256::digest(scope.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("bobbin-repo-{hex}")
}

/// Secrets as Kubernetes Secrets, through the API server.
#[derive(Clone)]
pub struct KubeSecrets {
    api: Api<Secret>,
}

impl std::fmt::Debug for KubeSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSecrets").finish_non_exhaustive()
    }
}

fn api_error(action: &str, name: &str, e: kube::Error) -> SecretsError {
    SecretsError::Backend(format!("cannot {action} Secret {name}: {e}"))
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_conflict() || s.is_already_exists() || s.is_not_found())
}

impl KubeSecrets {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        KubeSecrets { api: Api::namespaced(client, namespace) }
    }

    /// The scope's Secret, or `None`; an error if the name is taken by another scope.
    async fn load(&self, scope: &str) -> Result<Option<Secret>, SecretsError> {
        let name = secret_name(scope);
        let secret = self.api.get_opt(&name).await.map_err(|e| api_error("read", &name, e))?;
        if let Some(s) = &secret {
            let owner = s.metadata.annotations.as_ref().and_then(|a| a.get(SCOPE_ANNOTATION));
            if owner.map(String::as_str) != Some(scope) {
                return Err(SecretsError::Backend(format!(
                    "Secret {name} does not belong to {scope} (annotation {SCOPE_ANNOTATION} is {owner:?})"
                )));
            }
        }
        Ok(secret)
    }

    fn new_secret(scope: &str) -> Secret {
        let labels = BTreeMap::from([
            ("app.kubernetes.io/managed-by".to_owned(), "bobbin".to_owned()),
            ("bobbin.dev/secret-kind".to_owned(), "repo".to_owned()),
        ]);
        let annotations = BTreeMap::from([(SCOPE_ANNOTATION.to_owned(), scope.to_owned())]);
        Secret {
            metadata: ObjectMeta {
                name: Some(secret_name(scope)),
                labels: Some(labels),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".to_owned()),
            ..Secret::default()
        }
    }
}

fn key_meta(secret: &Secret) -> BTreeMap<String, KeyMeta> {
    secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(KEYS_ANNOTATION))
        .and_then(|json| serde_json::from_str(json).ok())
        .unwrap_or_default()
}

fn set_key_meta(secret: &mut Secret, meta: &BTreeMap<String, KeyMeta>) {
    let json = serde_json::to_string(meta).unwrap_or_default();
    secret.metadata.annotations.get_or_insert_with(BTreeMap::new).insert(KEYS_ANNOTATION.to_owned(), json);
}

impl SecretValues for KubeSecrets {
    fn values<'a>(&'a self, scope: &'a str) -> BoxFuture<'a, Result<BTreeMap<String, String>, SecretsError>> {
        Box::pin(async move {
            let Some(secret) = self.load(scope).await? else { return Ok(BTreeMap::new()) };
            secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, ByteString(v))| {
                    let v = String::from_utf8(v)
                        .map_err(|_| SecretsError::Backend(format!("secret {k} of {scope} is not UTF-8")))?;
                    Ok((k, v))
                })
                .collect()
        })
    }
}

impl SecretsManager for KubeSecrets {
    fn add<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        value: &'a str,
        created_by: &'a str,
    ) -> BoxFuture<'a, Result<(), SecretsError>> {
        Box::pin(async move {
            let name = secret_name(scope);
            let meta = KeyMeta {
                created_at: crate::model::status::rfc3339_seconds(jiff::Timestamp::now()),
                created_by: created_by.to_owned(),
            };
            let mut last = None;
            for _ in 0..ATTEMPTS {
                let existing = self.load(scope).await?;
                let creating = existing.is_none();
                let mut secret = existing.unwrap_or_else(|| Self::new_secret(scope));
                let data = secret.data.get_or_insert_with(BTreeMap::new);
                if data.contains_key(key) {
                    return Err(SecretsError::AlreadyPresent);
                }
                data.insert(key.to_owned(), ByteString(value.as_bytes().to_vec()));
                let mut all = key_meta(&secret);
                all.insert(key.to_owned(), meta.clone());
                set_key_meta(&mut secret, &all);
                let written = if creating {
                    self.api.create(&PostParams::default(), &secret).await
                } else {
                    self.api.replace(&name, &PostParams::default(), &secret).await
                };
                match written {
                    Ok(_) => return Ok(()),
                    Err(e) if is_conflict(&e) => last = Some(e),
                    Err(e) => return Err(api_error("write", &name, e)),
                }
            }
            Err(SecretsError::Backend(format!(
                "Secret {name} kept changing while adding {key}: {}",
                last.map(|e| e.to_string()).unwrap_or_default()
            )))
        })
    }

    fn remove<'a>(&'a self, scope: &'a str, key: &'a str) -> BoxFuture<'a, Result<(), SecretsError>> {
        Box::pin(async move {
            let name = secret_name(scope);
            let mut last = None;
            for _ in 0..ATTEMPTS {
                let Some(mut secret) = self.load(scope).await? else { return Err(SecretsError::NotFound) };
                let data = secret.data.get_or_insert_with(BTreeMap::new);
                if data.remove(key).is_none() {
                    return Err(SecretsError::NotFound);
                }
                let written = if data.is_empty() {
                    let dp = DeleteParams {
                        preconditions: Some(Preconditions {
                            resource_version: secret.metadata.resource_version.clone(),
                            uid: None,
                        }),
                        ..DeleteParams::default()
                    };
                    self.api.delete(&name, &dp).await.map(|_| ())
                } else {
                    let mut all = key_meta(&secret);
                    all.remove(key);
                    set_key_meta(&mut secret, &all);
                    self.api.replace(&name, &PostParams::default(), &secret).await.map(|_| ())
                };
                match written {
                    Ok(()) => return Ok(()),
                    Err(e) if is_conflict(&e) => last = Some(e),
                    Err(e) => return Err(api_error("write", &name, e)),
                }
            }
            Err(SecretsError::Backend(format!(
                "Secret {name} kept changing while removing {key}: {}",
                last.map(|e| e.to_string()).unwrap_or_default()
            )))
        })
    }

    fn list<'a>(&'a self, scope: &'a str) -> BoxFuture<'a, Result<Vec<SecretEntry>, SecretsError>> {
        Box::pin(async move {
            let Some(secret) = self.load(scope).await? else { return Ok(Vec::new()) };
            let meta = key_meta(&secret);
            Ok(secret
                .data
                .unwrap_or_default()
                .into_keys()
                .map(|key| {
                    let m = meta.get(&key).cloned().unwrap_or_default();
                    SecretEntry {
                        created_at: if m.created_at.is_empty() {
                            UNKNOWN_TIME.to_owned()
                        } else {
                            m.created_at
                        },
                        created_by: m.created_by,
                        key,
                    }
                })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;

    const SCOPE: &str = "did:plc:rjnvgfygwwqc5hyfsxmecosf/hello-spindle";
    const BY: &str = "did:plc:rjnvgfygwwqc5hyfsxmecosf";

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn client() -> (KubeSecrets, Handle) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        (KubeSecrets::new(client, "bobbin"), handle)
    }

    fn json(status: StatusCode, body: serde_json::Value) -> Response<Body> {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).expect("json")))
            .expect("response")
    }

    fn status(code: u16, reason: &str) -> Response<Body> {
        json(
            StatusCode::from_u16(code).expect("code"),
            serde_json::json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":reason,"code":code,"message":reason}),
        )
    }

    /// Answer the next request, which must be `method path`; returns the request body as JSON.
    async fn expect(
        handle: &mut Handle,
        method: Method,
        path: &str,
        respond: impl FnOnce(&serde_json::Value) -> Response<Body>,
    ) -> serde_json::Value {
        let (req, send) = tokio::time::timeout(std::time::Duration::from_secs(5), handle.next_request())
            .await
            .expect("a request in time")
            .expect("a request");
        assert_eq!(req.method(), method, "{}", req.uri());
        assert_eq!(req.uri().path(), path);
        let bytes = http_body_util::BodyExt::collect(req.into_body()).await.expect("body").to_bytes();
        let body = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("json body")
        };
        send.send_response(respond(&body));
        body
    }

    /// Answer a GET of `path` with the Secret as it is stored now.
    async fn get_current(handle: &mut Handle, path: &str, current: &serde_json::Value) {
        let current = current.clone();
        expect(handle, Method::GET, path, move |_| json(StatusCode::OK, current)).await;
    }

    /// `body` as the API server stores it: at resourceVersion `rv`.
    fn at_version(body: &serde_json::Value, rv: &str) -> serde_json::Value {
        let mut body = body.clone();
        body["metadata"]["resourceVersion"] = rv.into();
        body
    }

    #[test]
    fn names_are_per_scope_and_valid() {
        let a = secret_name(SCOPE);
        assert_eq!(a, secret_name(SCOPE));
        assert_ne!(a, secret_name("did:plc:rjnvgfygwwqc5hyfsxmecosf/hello_spindle"));
        assert!(a.len() <= 253 && a.starts_with("bobbin-repo-"));
        assert!(a.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
    }

    #[tokio::test]
    async fn add_list_remove_round_trip() {
        let (secrets, mut handle) = client();
        let name = secret_name(SCOPE);
        let path = format!("/api/v1/namespaces/bobbin/secrets/{name}");
        let collection = "/api/v1/namespaces/bobbin/secrets";

        let server = async {
            // add NPM_TOKEN: no Secret yet → create.
            expect(&mut handle, Method::GET, &path, |_| status(404, "NotFound")).await;
            let created = expect(&mut handle, Method::POST, collection, |b| {
                json(StatusCode::CREATED, at_version(b, "1"))
            })
            .await;
            assert_eq!(created["metadata"]["name"], name.as_str());
            assert_eq!(created["metadata"]["annotations"][SCOPE_ANNOTATION], SCOPE);
            assert_eq!(created["metadata"]["labels"]["app.kubernetes.io/managed-by"], "bobbin");
            assert_eq!(created["data"]["NPM_TOKEN"], "bnBtXzljMWYwYjdlNWQyYTRjOGU=", "base64 of the value");
            let meta: serde_json::Value = serde_json::from_str(
                created["metadata"]["annotations"][KEYS_ANNOTATION].as_str().expect("keys annotation"),
            )
            .expect("json");
            assert_eq!(meta["NPM_TOKEN"]["createdBy"], BY);
            let current = at_version(&created, "1");

            // add B: the Secret exists → replace with its resourceVersion; first a conflict, then a retry.
            get_current(&mut handle, &path, &current).await;
            expect(&mut handle, Method::PUT, &path, |b| {
                assert_eq!(b["metadata"]["resourceVersion"], "1");
                status(409, "Conflict")
            })
            .await;
            get_current(&mut handle, &path, &current).await;
            let replaced =
                expect(&mut handle, Method::PUT, &path, |b| json(StatusCode::OK, at_version(b, "2"))).await;
            assert_eq!(replaced["data"]["B"], "dHdv");
            assert_eq!(replaced["data"]["NPM_TOKEN"], "bnBtXzljMWYwYjdlNWQyYTRjOGU=");
            let current = at_version(&replaced, "2");

            // duplicate add: read only, no write.
            get_current(&mut handle, &path, &current).await;
            // list, values.
            for _ in 0..2 {
                get_current(&mut handle, &path, &current).await;
            }
            // remove B → replace without it.
            get_current(&mut handle, &path, &current).await;
            let after =
                expect(&mut handle, Method::PUT, &path, |b| json(StatusCode::OK, at_version(b, "3"))).await;
            assert!(after["data"].get("B").is_none());
            let keys: serde_json::Value = serde_json::from_str(
                after["metadata"]["annotations"][KEYS_ANNOTATION].as_str().expect("keys"),
            )
            .expect("json");
            assert!(keys.get("B").is_none() && keys.get("NPM_TOKEN").is_some());
            let current = at_version(&after, "3");
            // remove the last key → delete the Secret, guarded by its resourceVersion.
            get_current(&mut handle, &path, &current).await;
            let del = expect(&mut handle, Method::DELETE, &path, |_| {
                json(
                    StatusCode::OK,
                    serde_json::json!({"kind":"Status","apiVersion":"v1","status":"Success"}),
                )
            })
            .await;
            assert_eq!(del["preconditions"]["resourceVersion"], "3");
            // remove again → not found; list → empty.
            expect(&mut handle, Method::GET, &path, |_| status(404, "NotFound")).await;
            expect(&mut handle, Method::GET, &path, |_| status(404, "NotFound")).await;
        };

        let client = async {
            secrets.add(SCOPE, "NPM_TOKEN", "npm_9c1f0b7e5d2a4c8e", BY).await.expect("add");
            secrets.add(SCOPE, "B", "two", BY).await.expect("add b after a conflict");
            assert_eq!(secrets.add(SCOPE, "B", "x", BY).await, Err(SecretsError::AlreadyPresent));
            let list = secrets.list(SCOPE).await.expect("list");
            assert_eq!(list.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(), ["B", "NPM_TOKEN"]);
            assert!(list.iter().all(|e| e.created_by == BY && e.created_at.ends_with('Z')));
            let values = secrets.values(SCOPE).await.expect("values");
            assert_eq!(values.get("NPM_TOKEN").map(String::as_str), Some("npm_9c1f0b7e5d2a4c8e"));
            secrets.remove(SCOPE, "B").await.expect("remove b");
            secrets.remove(SCOPE, "NPM_TOKEN").await.expect("remove last");
            assert_eq!(secrets.remove(SCOPE, "NPM_TOKEN").await, Err(SecretsError::NotFound));
            assert!(secrets.list(SCOPE).await.expect("empty").is_empty());
        };
        tokio::join!(server, client);
    }

    #[tokio::test]
    async fn a_secret_of_another_scope_is_never_used() {
        let (secrets, mut handle) = client();
        let path = format!("/api/v1/namespaces/bobbin/secrets/{}", secret_name(SCOPE));
        let server = expect(&mut handle, Method::GET, &path, |_| {
            json(
                StatusCode::OK,
                serde_json::json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"x","annotations":{SCOPE_ANNOTATION:"did:plc:other/repo"}},"data":{"A":"YQ=="}}),
            )
        });
        let (_, got) = tokio::join!(server, secrets.values(SCOPE));
        let e = got.expect_err("foreign Secret");
        assert!(e.to_string().contains("does not belong"), "{e}");
    }
}
