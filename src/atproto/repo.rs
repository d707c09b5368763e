//! Repo resolution for the secrets XRPC methods (spec §6.4): at-uri → owner DID → the
//! `sh.tangled.repo` record on the owner's PDS → (owner DID, repo name).

use super::identity::{IdentityError, Resolver};
use super::pds::{PdsClient, PdsError};

/// The collection always fetched, whatever the at-uri names (as Go does).
pub const REPO_COLLECTION: &str = "sh.tangled.repo";

/// `at://<authority>/<collection>/<rkey>`, borrowed from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtUri<'a> {
    pub authority: &'a str,
    pub collection: &'a str,
    pub rkey: &'a str,
}

/// Parse a record at-uri: `at://<DID or handle>/<collection>/<rkey>`, nothing after. The one
/// parser for every at-uri bobbin reads (XRPC arguments, Jetstream records, PDS listings).
///
/// The authority may hold a DID's percent-encoded characters (`did:web:localhost%3A8080`, the
/// form a did:web with a port takes), each `%` followed by two hex digits. Query strings,
/// fragments, empty segments and the record keys `.` and `..` are refused.
pub fn parse_at_uri(s: &str) -> Option<AtUri<'_>> {
    let rest = s.strip_prefix("at://")?;
    let mut parts = rest.split('/');
    let (authority, collection, rkey) = (parts.next()?, parts.next()?, parts.next()?);
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"._:~-".contains(&b);
    let seg_ok = |p: &str| !p.is_empty() && p.bytes().all(plain);
    (parts.next().is_none()
        && s.len() <= 8192
        && authority_ok(authority, plain)
        && seg_ok(collection)
        && seg_ok(rkey)
        && rkey != "."
        && rkey != "..")
        .then_some(AtUri { authority, collection, rkey })
}

/// Plain characters, or `%` and two hex digits.
fn authority_ok(authority: &str, plain: impl Fn(u8) -> bool) -> bool {
    let bytes = authority.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if bytes.get(i + 1..i + 3).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) => i += 3,
            b if plain(b) => i += 1,
            _ => return false,
        }
    }
    !bytes.is_empty()
}

/// Why a repo at-uri could not be resolved. The HTTP layer maps [`RepoError::InvalidUri`] to
/// `400 InvalidRepo` and everything else to `400 Generic` with the Display text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepoError {
    #[error("supplied at-uri is not a repo: {0}")]
    InvalidUri(String),
    #[error("failed to resolve repo owner: {0}")]
    Identity(#[from] IdentityError),
    #[error("repo owner {0} has no PDS in their DID document")]
    NoPds(String),
    #[error("failed to fetch repo record: {0}")]
    Pds(#[from] PdsError),
    #[error("record is not a repo: $type is {0:?}, expected \"sh.tangled.repo\"")]
    NotARepo(String),
    #[error("repo record has an invalid name: {0}")]
    InvalidName(String),
}

impl RepoError {
    pub fn label(&self) -> &'static str {
        match self {
            RepoError::InvalidUri(_) => "invalid_repo",
            RepoError::Identity(_) => "identity",
            RepoError::NoPds(_) => "no_pds",
            RepoError::Pds(_) => "pds",
            RepoError::NotARepo(_) => "not_a_repo",
            RepoError::InvalidName(_) => "invalid_name",
        }
    }
}

/// Resolve `at_uri` to (owner DID, repo name). The name comes from the record, so it is what
/// the repo was ingested under; a handle authority must verify both ways.
pub async fn resolve_repo(
    resolver: &Resolver,
    pds_client: &PdsClient,
    at_uri: &str,
) -> Result<(String, String), RepoError> {
    let uri = parse_at_uri(at_uri).ok_or_else(|| RepoError::InvalidUri(at_uri.to_string()))?;
    let identity = resolver.resolve_authority(uri.authority).await?;
    let pds = identity.pds.as_deref().ok_or_else(|| RepoError::NoPds(identity.did.clone()))?;
    let record = pds_client.get_record(pds, &identity.did, REPO_COLLECTION, uri.rkey).await?;
    let name = repo_name(&record)?;
    Ok((identity.did, name))
}

/// Check the record's type and take its name (pure; B25: an unexpected record is an error).
pub fn repo_name(record: &serde_json::Value) -> Result<String, RepoError> {
    let kind = record.get("$type").and_then(|t| t.as_str()).unwrap_or("");
    if kind != REPO_COLLECTION {
        let shown = match record.get("$type") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => "<missing>".to_string(),
        };
        return Err(RepoError::NotARepo(shown));
    }
    let name = match record.get("name") {
        Some(serde_json::Value::String(s)) => s.as_str(),
        Some(_) => return Err(RepoError::InvalidName("name is not a string".into())),
        None => return Err(RepoError::InvalidName("name is missing".into())),
    };
    // The name is joined as "<did>/<name>" for permissions: it must stay one path segment.
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\', '\0']) {
        return Err(RepoError::InvalidName(format!("{name:?}")));
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atproto::identity::tests::{ALICE, did_doc, resolver, test_http};
    use crate::atproto::keys::PublicKey;
    use crate::atproto::keys::tests::k256_key;
    use crate::atproto::testserver::TestServer;
    use serde_json::json;

    #[test]
    fn at_uri_parsing() {
        assert_eq!(
            parse_at_uri("at://did:plc:rjnvgfygwwqc5hyfsxmecosf/sh.tangled.repo/3m6pd65mx7k2b"),
            Some(AtUri {
                authority: "did:plc:rjnvgfygwwqc5hyfsxmecosf",
                collection: "sh.tangled.repo",
                rkey: "3m6pd65mx7k2b"
            })
        );
        for bad in [
            "",
            "did:plc:x/sh.tangled.repo/r",
            "at://did:plc:x",
            "at://did:plc:x/sh.tangled.repo",
            "at://did:plc:x/sh.tangled.repo/",
            "at://did:plc:x/sh.tangled.repo/r/extra",
            "at:///sh.tangled.repo/r",
            "at://did:plc:x/sh.tangled.repo/r?x=1",
            "at://did:plc:x/sh.tangled.repo/..",
            "at://did:plc:x/sh.tangled.repo/a b",
            "at://did:web:localhost%3/sh.tangled.repo/r",
            "at://did:web:localhost%zz80/sh.tangled.repo/r",
            "at://did:web:localhost%/sh.tangled.repo/r",
            "at://did:plc:x/sh.tangled%2Erepo/r",
            "at://did:plc:x/sh.tangled.repo/r%20",
            "at://user@example.com/sh.tangled.repo/r",
            "at://did:plc:x/sh.tangled.repo/r#frag",
        ] {
            assert_eq!(parse_at_uri(bad), None, "{bad}");
        }
    }

    #[test]
    fn at_uri_authority_may_be_a_percent_encoded_did_web_or_a_handle() {
        let u = parse_at_uri("at://did:web:localhost%3A8080/sh.tangled.repo/3m6pd65mx7k2b").expect("did:web");
        assert_eq!(u.authority, "did:web:localhost%3A8080");
        let u = parse_at_uri("at://alice.tngl.sh/sh.tangled.repo/self").expect("handle");
        assert_eq!((u.authority, u.collection, u.rkey), ("alice.tngl.sh", "sh.tangled.repo", "self"));
    }

    #[test]
    fn repo_name_checks_type_and_name() {
        assert_eq!(repo_name(&json!({"$type": "sh.tangled.repo", "name": "bobbin"})), Ok("bobbin".into()));
        let cases = [
            (json!({"$type": "sh.tangled.repo.collaborator", "name": "x"}), "not_a_repo"),
            (json!({"name": "x"}), "not_a_repo"),
            (json!({"$type": 7, "name": "x"}), "not_a_repo"),
            (json!("just a string"), "not_a_repo"),
            (json!({"$type": "sh.tangled.repo"}), "invalid_name"),
            (json!({"$type": "sh.tangled.repo", "name": ""}), "invalid_name"),
            (json!({"$type": "sh.tangled.repo", "name": 3}), "invalid_name"),
            (json!({"$type": "sh.tangled.repo", "name": "../other"}), "invalid_name"),
            (json!({"$type": "sh.tangled.repo", "name": ".."}), "invalid_name"),
        ];
        for (record, label) in cases {
            assert_eq!(repo_name(&record).expect_err("must fail").label(), label, "{record}");
        }
    }

    const RKEY: &str = "3m6pd65mx7k2b";

    async fn setup() -> (TestServer, Resolver, PdsClient) {
        let srv = TestServer::start().await;
        let key = PublicKey::K256(*k256_key("alice").verifying_key());
        srv.set_json(&format!("/plc/{ALICE}"), &did_doc(ALICE, &key, &srv.url("/pds/"), "alice.test"));
        let r = resolver(&srv);
        let pds = PdsClient::new(test_http(&srv));
        (srv, r, pds)
    }

    fn get_record_path() -> String {
        format!(
            "/pds/xrpc/com.atproto.repo.getRecord?repo=did%3Aplc%3Aaliceaaaaaaaaaaaaaaaaaaa&collection=sh.tangled.repo&rkey={RKEY}"
        )
    }

    #[tokio::test]
    async fn resolves_owner_and_name() {
        let (srv, r, pds) = setup().await;
        srv.set_json(
            &get_record_path(),
            &json!({"value": {"$type": "sh.tangled.repo", "name": "bobbin", "knot": "k"}}),
        );
        let got = resolve_repo(&r, &pds, &format!("at://{ALICE}/sh.tangled.repo/{RKEY}")).await;
        assert_eq!(got, Ok((ALICE.to_string(), "bobbin".to_string())));

        // A handle authority that verifies both ways works the same.
        srv.set("/.well-known/atproto-did", 200, ALICE);
        let got = resolve_repo(&r, &pds, &format!("at://alice.test/sh.tangled.repo/{RKEY}")).await;
        assert_eq!(got, Ok((ALICE.to_string(), "bobbin".to_string())));
    }

    #[tokio::test]
    async fn error_cases_are_specific() {
        let (srv, r, pds) = setup().await;
        let uri = format!("at://{ALICE}/sh.tangled.repo/{RKEY}");

        let err = resolve_repo(&r, &pds, "https://example.com").await.expect_err("bad uri");
        assert_eq!(err.to_string(), "supplied at-uri is not a repo: https://example.com");

        // B25: a record of another type is a clear error, not a panic.
        srv.set_json(
            &get_record_path(),
            &json!({"value": {"$type": "sh.tangled.repo.collaborator", "subject": "x"}}),
        );
        let err = resolve_repo(&r, &pds, &uri).await.expect_err("not a repo");
        assert_eq!(err.label(), "not_a_repo");
        assert!(err.to_string().contains("sh.tangled.repo.collaborator"), "{err}");

        srv.set(&get_record_path(), 400, r#"{"error":"RecordNotFound","message":"Could not locate record"}"#);
        let err = resolve_repo(&r, &pds, &uri).await.expect_err("missing record");
        assert_eq!(err.label(), "pds");
        assert!(err.to_string().contains("RecordNotFound"), "{err}");

        let unknown = "did:plc:nobodyyyyyyyyyyyyyyyyyyy";
        let err = resolve_repo(&r, &pds, &format!("at://{unknown}/sh.tangled.repo/{RKEY}"))
            .await
            .expect_err("unknown owner");
        assert_eq!(err, RepoError::Identity(IdentityError::NotFound(unknown.into())));

        let err = resolve_repo(&r, &pds, &format!("at://mallory.test/sh.tangled.repo/{RKEY}"))
            .await
            .expect_err("handle without well-known");
        assert_eq!(err.label(), "identity");
        assert!(err.to_string().contains("failed to resolve handle"), "{err}");

        let nopds = "did:plc:nopdssssssssssssssssssss";
        srv.set_json(&format!("/plc/{nopds}"), &json!({"id": nopds}));
        let err = resolve_repo(&r, &pds, &format!("at://{nopds}/sh.tangled.repo/{RKEY}"))
            .await
            .expect_err("no pds");
        assert_eq!(err, RepoError::NoPds(nopds.into()));
    }
}
