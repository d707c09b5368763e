//! The production [`CollaboratorSource`]: the repo owner's PDS, found through their DID document.
//! Only the DID and its PDS matter; the handle is never verified (B16).

use futures::future::BoxFuture;

use super::ingest::{COLLABORATOR_NSID, CollaboratorPage, CollaboratorRecord, CollaboratorSource};
use crate::atproto::{PdsClient, Resolver, parse_at_uri};

/// Records per `listRecords` page (the lexicon's maximum).
const PAGE_SIZE: u32 = 100;

/// Lists `sh.tangled.repo.collaborator` records from the owner's PDS.
#[derive(Debug, Clone)]
pub struct AtprotoCollaborators {
    resolver: Resolver,
    pds: PdsClient,
}

impl AtprotoCollaborators {
    pub fn new(resolver: Resolver, pds: PdsClient) -> Self {
        AtprotoCollaborators { resolver, pds }
    }
}

impl CollaboratorSource for AtprotoCollaborators {
    fn list_page<'a>(
        &'a self,
        owner: &'a str,
        cursor: Option<&'a str>,
    ) -> BoxFuture<'a, Result<CollaboratorPage, String>> {
        Box::pin(async move {
            let identity =
                self.resolver.resolve(owner).await.map_err(|e| format!("resolving {owner}: {e}"))?;
            let pds = identity.pds.ok_or_else(|| format!("{owner} has no PDS in its DID document"))?;
            let (listed, next) = self
                .pds
                .list_records(&pds, owner, COLLABORATOR_NSID, PAGE_SIZE, cursor)
                .await
                .map_err(|e| format!("listing collaborators on {pds}: {e}"))?;
            // A record that does not have the collaborator shape grants nothing; skip it.
            let records = listed
                .into_iter()
                .filter_map(|r| {
                    let rkey = parse_at_uri(&r.uri)?.rkey.to_owned();
                    let subject = r.value.get("subject")?.as_str()?.to_owned();
                    let repo = r.value.get("repo")?.as_str()?.to_owned();
                    Some(CollaboratorRecord { rkey, subject, repo })
                })
                .collect();
            Ok(CollaboratorPage { records, cursor: next })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atproto::identity::tests::{did_doc, resolver, test_http};
    use crate::atproto::keys::PublicKey;
    use crate::atproto::keys::tests::k256_key;
    use crate::atproto::testserver::TestServer;

    const MEMBER: &str = "did:plc:rjnvgfygwwqc5hyfsxmecosf";
    const REPO_URI: &str = "at://did:plc:rjnvgfygwwqc5hyfsxmecosf/sh.tangled.repo/3m6pd65mx7k2b";

    fn listed(rkey: &str, subject: &str, repo: &str) -> serde_json::Value {
        serde_json::json!({
            "uri": format!("at://{MEMBER}/{COLLABORATOR_NSID}/{rkey}"),
            "cid": "bafy",
            "value": {"$type": COLLABORATOR_NSID, "subject": subject, "repo": repo, "createdAt": "2025-11-29T10:42:31Z"}
        })
    }

    #[tokio::test]
    async fn lists_pages_from_the_owners_pds() {
        let srv = TestServer::start().await;
        let key = PublicKey::K256(*k256_key("member").verifying_key());
        srv.set_json(&format!("/plc/{MEMBER}"), &did_doc(MEMBER, &key, &srv.origin(), "handle.invalid"));
        let base = "/xrpc/com.atproto.repo.listRecords?repo=did%3Aplc%3Arjnvgfygwwqc5hyfsxmecosf&collection=sh.tangled.repo.collaborator&limit=100";
        srv.set_json(
            base,
            &serde_json::json!({"records": [listed("c1", "did:plc:one", REPO_URI), {"uri": "at://x/y/z", "value": {"subject": 3}}], "cursor": "c1"}),
        );
        srv.set_json(
            &format!("{base}&cursor=c1"),
            &serde_json::json!({"records": [listed("c2", "did:plc:two", REPO_URI)]}),
        );
        let source = AtprotoCollaborators::new(resolver(&srv), PdsClient::new(test_http(&srv)));

        let first = source.list_page(MEMBER, None).await.expect("page 1");
        assert_eq!(
            first.records,
            [CollaboratorRecord { rkey: "c1".into(), subject: "did:plc:one".into(), repo: REPO_URI.into() }]
        );
        assert_eq!(first.cursor.as_deref(), Some("c1"));
        let second = source.list_page(MEMBER, Some("c1")).await.expect("page 2");
        assert_eq!(second.records[0].subject, "did:plc:two");
        assert_eq!(second.cursor, None);

        let err = source.list_page("did:plc:unknownunknownunknown", None).await.expect_err("no such DID");
        assert!(err.contains("resolving did:plc:unknownunknownunknown"), "{err}");
    }
}
