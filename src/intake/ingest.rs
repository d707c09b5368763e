//! The Jetstream ingestion rules (spec §2.5) with the Go spindle's bugs fixed.
//!
//! Each rule is a synchronous function over one store transaction, so an event's effects commit
//! together and the rules are unit-testable without sockets. Only repo registration does network
//! IO: after its transaction commits, the repo's knot becomes an event source and the owner's
//! collaborator records are read from their PDS through [`CollaboratorSource`].
//!
//! Differences from Go, all invisible on the wire:
//! - member records are keyed by (author, rkey), so an update replaces the old subject (B17), and
//!   a member record moved to another instance or deleted revokes membership;
//! - a removed member's repos stay registered (re-adding the member resumes them), but their new
//!   pipelines are refused at pipeline time (B18; see `Store::repo_accepts_pipelines`);
//! - a repo whose `spindle` changes away from us (another host, `[[none]]`, absent) or whose record
//!   is deleted is unregistered, with its collaborators (B18);
//! - collaborator records count only when their author owns the repo the record names (B2), and at
//!   repo registration only records naming *this* repo are honoured, over every page (B3);
//! - collaborator deletes revoke (B18); no handle verification anywhere (B16).

use std::sync::Arc;

use futures::future::BoxFuture;
use rusqlite::Transaction;
use serde::Deserialize;
use serde_json::Value;

use super::knot::KnotSources;
use super::{IntakeError, Result};
use crate::store::intake::{self as q, CollaboratorRow, RepoRow};
use crate::store::{Result as StoreResult, Store};

pub const MEMBER_NSID: &str = "sh.tangled.spindle.member";
pub const REPO_NSID: &str = "sh.tangled.repo";
pub const COLLABORATOR_NSID: &str = "sh.tangled.repo.collaborator";

/// The collections we ask Jetstream for, in Go's order (spec §2.1).
pub const COLLECTIONS: [&str; 3] = [MEMBER_NSID, REPO_NSID, COLLABORATOR_NSID];

/// Most collaborator pages read at repo registration; a PDS that pages forever is cut off here.
const MAX_COLLABORATOR_PAGES: usize = 200;

/// One Jetstream event (spec §2.4).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JetstreamEvent {
    pub did: String,
    pub time_us: i64,
    pub kind: String,
    #[serde(default)]
    pub commit: Option<Commit>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Commit {
    pub operation: String,
    pub collection: String,
    pub rkey: String,
    /// Absent on deletes.
    #[serde(default)]
    pub record: Option<Value>,
}

impl JetstreamEvent {
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("malformed Jetstream event: {e}"))
    }
}

#[derive(Debug, Deserialize)]
struct MemberRecord {
    subject: String,
    instance: String,
}

#[derive(Debug, Deserialize)]
struct RepoRecord {
    name: String,
    knot: String,
    #[serde(default)]
    spindle: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CollaboratorWire {
    subject: String,
    repo: String,
}

/// A collaborator record as listed from a PDS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollaboratorRecord {
    /// The record key.
    pub rkey: String,
    /// The DID given access.
    pub subject: String,
    /// At-uri of the `sh.tangled.repo` record the access is for.
    pub repo: String,
}

/// One page of `com.atproto.repo.listRecords`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CollaboratorPage {
    pub records: Vec<CollaboratorRecord>,
    /// Where the next page starts; `None` on the last page.
    pub cursor: Option<String>,
}

/// Where collaborator records come from: the owner's PDS in production (see
/// `intake::ingest::AtprotoCollaborators`), a fake in tests.
pub trait CollaboratorSource: Send + Sync {
    /// One page of `owner`'s `sh.tangled.repo.collaborator` records, starting at `cursor`.
    fn list_page<'a>(
        &'a self,
        owner: &'a str,
        cursor: Option<&'a str>,
    ) -> BoxFuture<'a, std::result::Result<CollaboratorPage, String>>;
}

/// A parsed `at://authority/collection/rkey`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AtUri<'a> {
    pub authority: &'a str,
    pub collection: &'a str,
    pub rkey: &'a str,
}

pub fn parse_at_uri(uri: &str) -> Option<AtUri<'_>> {
    let rest = uri.strip_prefix("at://")?;
    let mut parts = rest.split('/');
    let (authority, collection, rkey) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || authority.is_empty() || collection.is_empty() || rkey.is_empty() {
        return None;
    }
    Some(AtUri { authority, collection, rkey })
}

/// What an event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Not for us: another collection, another spindle, a non-member author.
    Ignored(String),
    /// A rule refused the record (the reason is logged).
    Refused(String),
    MemberAdded {
        subject: String,
    },
    MemberRemoved {
        subject: String,
    },
    RepoRegistered(RepoRow),
    RepoUnregistered(RepoRow),
    CollaboratorAdded(CollaboratorRow),
    CollaboratorRemoved(CollaboratorRow),
}

/// Who we are, for the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `SPINDLE_SERVER_HOSTNAME`: must equal `instance` of member records and `spindle` of repos.
    pub hostname: String,
    /// `SPINDLE_SERVER_OWNER`.
    pub owner: String,
}

/// Apply one event's store effects inside `tx` (spec §2.5 with B2, B3, B16–B18 fixed).
pub fn apply_in(tx: &Transaction<'_>, me: &Identity, ev: &JetstreamEvent) -> StoreResult<Outcome> {
    if ev.kind != "commit" {
        return Ok(Outcome::Ignored(format!("{} event", ev.kind)));
    }
    let Some(commit) = &ev.commit else {
        return Ok(Outcome::Ignored("commit event without commit".into()));
    };
    if ev.did != me.owner && !q::is_member(tx, &ev.did)? {
        return Ok(Outcome::Ignored(format!("{} is neither the owner nor a member", ev.did)));
    }
    match commit.collection.as_str() {
        MEMBER_NSID => member(tx, me, &ev.did, commit),
        REPO_NSID => repo(tx, me, &ev.did, commit),
        COLLABORATOR_NSID => collaborator(tx, &ev.did, commit),
        other => Ok(Outcome::Ignored(format!("collection {other}"))),
    }
}

fn decode<T: serde::de::DeserializeOwned>(commit: &Commit) -> std::result::Result<T, String> {
    let record = commit.record.clone().ok_or_else(|| format!("{} without a record", commit.operation))?;
    serde_json::from_value(record).map_err(|e| format!("malformed {} record: {e}", commit.collection))
}

fn is_did(s: &str) -> bool {
    s.starts_with("did:") && s.len() > 4 && !s.contains(char::is_whitespace)
}

fn member(tx: &Transaction<'_>, me: &Identity, author: &str, commit: &Commit) -> StoreResult<Outcome> {
    let revoke = |tx: &Transaction<'_>, why: String| -> StoreResult<Outcome> {
        Ok(match q::delete_member(tx, author, &commit.rkey)? {
            Some(subject) => Outcome::MemberRemoved { subject },
            None => Outcome::Ignored(why),
        })
    };
    match commit.operation.as_str() {
        "create" | "update" => {
            let record: MemberRecord = match decode(commit) {
                Ok(r) => r,
                Err(e) => return Ok(Outcome::Refused(e)),
            };
            if record.instance != me.hostname {
                // A record moved to another spindle no longer makes anyone a member here.
                return revoke(tx, format!("member record for instance {:?}", record.instance));
            }
            if author != me.owner {
                return Ok(Outcome::Refused(format!(
                    "{author} is not the spindle owner and cannot add members"
                )));
            }
            if !is_did(&record.subject) {
                return Ok(Outcome::Refused(format!("member subject {:?} is not a DID", record.subject)));
            }
            // Keyed by (author, rkey): an update that changes the subject replaces it (B17).
            q::put_member(tx, author, &commit.rkey, &record.instance, &record.subject)?;
            Ok(Outcome::MemberAdded { subject: record.subject })
        }
        "delete" => revoke(tx, format!("no member record {author}/{}", commit.rkey)),
        other => Ok(Outcome::Ignored(format!("operation {other}"))),
    }
}

fn repo(tx: &Transaction<'_>, me: &Identity, author: &str, commit: &Commit) -> StoreResult<Outcome> {
    let unregister = |tx: &Transaction<'_>, why: String| -> StoreResult<Outcome> {
        Ok(match q::unregister_repo(tx, author, &commit.rkey)? {
            Some(row) => Outcome::RepoUnregistered(row),
            None => Outcome::Ignored(why),
        })
    };
    match commit.operation.as_str() {
        "create" | "update" => {
            let record: RepoRecord = match decode(commit) {
                Ok(r) => r,
                Err(e) => return Ok(Outcome::Refused(e)),
            };
            match record.spindle.as_deref() {
                Some(s) if s == me.hostname => {}
                // Absent, `[[none]]` or another spindle: the repo left us if it was ours (B18).
                other => return unregister(tx, format!("repo spindle is {other:?}")),
            }
            if record.name.is_empty() || record.knot.is_empty() || record.knot.contains(['/', ' ']) {
                return Ok(Outcome::Refused(format!(
                    "repo record needs a name and a knot host (name {:?}, knot {:?})",
                    record.name, record.knot
                )));
            }
            let row = RepoRow {
                knot: record.knot,
                owner: author.to_owned(),
                name: record.name,
                rkey: commit.rkey.clone(),
            };
            q::register_repo(tx, &row)?;
            Ok(Outcome::RepoRegistered(row))
        }
        "delete" => unregister(tx, format!("no repo record {author}/{}", commit.rkey)),
        other => Ok(Outcome::Ignored(format!("operation {other}"))),
    }
}

fn collaborator(tx: &Transaction<'_>, author: &str, commit: &Commit) -> StoreResult<Outcome> {
    match commit.operation.as_str() {
        "create" | "update" => {
            let refuse = |tx: &Transaction<'_>, why: String| -> StoreResult<Outcome> {
                // An update that no longer grants anything revokes what the record granted before.
                q::delete_collaborator(tx, author, &commit.rkey)?;
                Ok(Outcome::Refused(why))
            };
            let record: CollaboratorWire = match decode(commit) {
                Ok(r) => r,
                Err(e) => return refuse(tx, e),
            };
            if !is_did(&record.subject) {
                return refuse(tx, format!("collaborator subject {:?} is not a DID", record.subject));
            }
            let Some(uri) = parse_at_uri(&record.repo).filter(|u| u.collection == REPO_NSID) else {
                return refuse(
                    tx,
                    format!("collaborator repo {:?} is not an sh.tangled.repo at-uri", record.repo),
                );
            };
            // B2: only the repo's owner may grant access to it.
            if uri.authority != author {
                return refuse(
                    tx,
                    format!("{author} cannot add collaborators to {}'s repo {}", uri.authority, record.repo),
                );
            }
            let Some(repo) = q::repo_by_rkey(tx, uri.authority, uri.rkey)? else {
                return refuse(tx, format!("repo {} is not registered on this spindle", record.repo));
            };
            let row = CollaboratorRow {
                repo_owner: repo.owner,
                repo_name: repo.name,
                subject: record.subject,
                author: author.to_owned(),
                rkey: commit.rkey.clone(),
            };
            q::put_collaborator(tx, &row)?;
            Ok(Outcome::CollaboratorAdded(row))
        }
        "delete" => Ok(match q::delete_collaborator(tx, author, &commit.rkey)? {
            Some(row) => Outcome::CollaboratorRemoved(row),
            None => Outcome::Ignored(format!("no collaborator record {author}/{}", commit.rkey)),
        }),
        other => Ok(Outcome::Ignored(format!("operation {other}"))),
    }
}

/// Applies Jetstream events: the store effects, then the knot source and collaborator backfill
/// of a newly registered repo.
#[derive(Clone)]
pub struct Ingester {
    store: Store,
    me: Identity,
    collaborators: Arc<dyn CollaboratorSource>,
    knots: KnotSources,
}

impl Ingester {
    pub fn new(
        store: Store,
        me: Identity,
        collaborators: Arc<dyn CollaboratorSource>,
        knots: KnotSources,
    ) -> Self {
        Ingester { store, me, collaborators, knots }
    }

    pub fn identity(&self) -> &Identity {
        &self.me
    }

    /// Apply one event. A failed collaborator backfill is logged, not returned: the registration
    /// stands, live collaborator events still apply, and the next update of the repo record
    /// backfills again.
    pub async fn apply(&self, ev: &JetstreamEvent) -> Result<Outcome> {
        let me = self.me.clone();
        let event = ev.clone();
        let outcome = self.store.transaction(move |tx| apply_in(tx, &me, &event)).await?;
        if let Outcome::RepoRegistered(repo) = &outcome {
            self.knots.add(&repo.knot);
            if let Err(e) = self.backfill(repo).await {
                tracing::warn!(error = %e, label = e.label(), repo = %format!("{}/{}", repo.owner, repo.name), "collaborator backfill failed");
            }
        }
        Ok(outcome)
    }

    /// Read every page of the owner's collaborator records and make this repo's collaborators
    /// exactly those that name this repo (B3). Returns how many were granted.
    pub async fn backfill(&self, repo: &RepoRow) -> Result<usize> {
        let this_repo = |uri: &str| {
            parse_at_uri(uri).is_some_and(|u| {
                u.authority == repo.owner && u.collection == REPO_NSID && u.rkey == repo.rkey
            })
        };
        let mut rows = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_COLLABORATOR_PAGES {
            let page = self
                .collaborators
                .list_page(&repo.owner, cursor.as_deref())
                .await
                .map_err(|message| IntakeError::Collaborators { owner: repo.owner.clone(), message })?;
            rows.extend(page.records.into_iter().filter(|r| this_repo(&r.repo) && is_did(&r.subject)).map(
                |r| CollaboratorRow {
                    repo_owner: repo.owner.clone(),
                    repo_name: repo.name.clone(),
                    subject: r.subject,
                    author: repo.owner.clone(),
                    rkey: r.rkey,
                },
            ));
            match page.cursor {
                Some(next) if !next.is_empty() && cursor.as_deref() != Some(next.as_str()) => {
                    cursor = Some(next)
                }
                _ => {
                    let repo = repo.clone();
                    let granted = rows.len();
                    self.store
                        .transaction(move |tx| {
                            // The repo may have left while we were reading.
                            if q::repo_by_rkey(tx, &repo.owner, &repo.rkey)?
                                .is_some_and(|r| r.name == repo.name)
                            {
                                q::replace_collaborators(tx, &repo.owner, &repo.name, &rows)?;
                            }
                            Ok(())
                        })
                        .await?;
                    return Ok(granted);
                }
            }
        }
        Err(IntakeError::Collaborators {
            owner: repo.owner.clone(),
            message: format!("more than {MAX_COLLABORATOR_PAGES} pages of collaborator records"),
        })
    }
}
