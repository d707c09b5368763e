//! Who may manage a repo's secrets (spec §2.6): the owner of a registered repo, or a collaborator
//! on it. Intake writes `repos` and `collaborators` (with the B2/B3/B16 fixes); this only reads.

use rusqlite::{Connection, params};

use super::{Result, Store};

impl Store {
    /// Whether `actor` holds `repo:settings` on `owner/name`: the repo must be registered with this
    /// spindle, and the actor must be its owner or one of its collaborators. The server owner has no
    /// implicit access (spec §2.6).
    pub async fn can_manage_secrets(&self, owner: &str, name: &str, actor: &str) -> Result<bool> {
        let (owner, name, actor) = (owner.to_owned(), name.to_owned(), actor.to_owned());
        self.call(move |conn| can_manage(conn, &owner, &name, &actor)).await
    }
}

fn can_manage(conn: &Connection, owner: &str, name: &str, actor: &str) -> Result<bool> {
    let allowed: bool = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM repos WHERE owner = ?1 AND name = ?2)
               AND (?3 = ?1 OR EXISTS (SELECT 1 FROM collaborators
                                       WHERE repo_owner = ?1 AND repo_name = ?2 AND subject = ?3))",
        )?
        .query_row(params![owner, name, actor], |r| r.get(0))?;
    Ok(allowed)
}

#[cfg(test)]
mod tests {
    use crate::store::temp_store;

    const OWNER: &str = "did:plc:rjnvgfygwwqc5hyfsxmecosf";
    const COLLAB: &str = "did:plc:ogyr5xkxwnrekpk5yroudocu";
    const SERVER_OWNER: &str = "did:plc:hbrpoigf3cbfnobm2o4rak3v";

    #[tokio::test]
    async fn owner_and_collaborators_of_registered_repos_only() {
        let (_dir, store) = temp_store();
        assert!(!store.can_manage_secrets(OWNER, "hello-spindle", OWNER).await.expect("q"), "unregistered");
        store
            .call(|c| {
                c.execute(
                    "INSERT INTO repos (knot, owner, name) VALUES ('knot1.tangled.sh', ?1, 'hello-spindle')",
                    [OWNER],
                )?;
                c.execute(
                    "INSERT INTO collaborators (repo_owner, repo_name, subject, author, rkey)
                     VALUES (?1, 'hello-spindle', ?2, ?1, '3m6pdcollab22')",
                    [OWNER, COLLAB],
                )?;
                Ok(())
            })
            .await
            .expect("seed");
        assert!(store.can_manage_secrets(OWNER, "hello-spindle", OWNER).await.expect("q"));
        assert!(store.can_manage_secrets(OWNER, "hello-spindle", COLLAB).await.expect("q"));
        assert!(!store.can_manage_secrets(OWNER, "hello-spindle", SERVER_OWNER).await.expect("q"));
        assert!(!store.can_manage_secrets(OWNER, "other-repo", COLLAB).await.expect("q"), "other repo");
        assert!(!store.can_manage_secrets(COLLAB, "hello-spindle", COLLAB).await.expect("q"), "wrong owner");
    }
}
