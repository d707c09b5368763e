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

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use rusqlite::Transaction;
use serde::Deserialize;
use serde_json::Value;

use super::knot::KnotSources;
use super::{IntakeError, Result};
use crate::atproto::parse_at_uri;
use crate::store::intake::{self as q, CollaboratorRow, RepoRow};
use crate::store::{Result as StoreResult, Store};

pub const MEMBER_NSID: &str = "sh.tangled.spindle.member";
pub const REPO_NSID: &str = "sh.tangled.repo";
pub const COLLABORATOR_NSID: &str = "sh.tangled.repo.collaborator";

/// The collections we ask Jetstream for, in Go's order (spec §2.1).
pub const COLLECTIONS: [&str; 3] = [MEMBER_NSID, REPO_NSID, COLLABORATOR_NSID];

/// Most collaborator pages read at repo registration; a PDS that pages forever is cut off here.
const MAX_COLLABORATOR_PAGES: usize = 200;

/// A failed collaborator backfill is tried again after this, doubling up to
/// [`BACKFILL_RETRY_MAX`], for as long as the repo stays registered.
const BACKFILL_RETRY_FIRST: Duration = Duration::from_secs(30);
const BACKFILL_RETRY_MAX: Duration = Duration::from_secs(15 * 60);

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
/// [`super::AtprotoCollaborators`]), a fake in tests.
pub trait CollaboratorSource: Send + Sync {
    /// One page of `owner`'s `sh.tangled.repo.collaborator` records, starting at `cursor`.
    fn list_page<'a>(
        &'a self,
        owner: &'a str,
        cursor: Option<&'a str>,
    ) -> BoxFuture<'a, std::result::Result<CollaboratorPage, String>>;
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

impl Outcome {
    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ignored(_) => "ignored",
            Outcome::Refused(_) => "refused",
            Outcome::MemberAdded { .. } => "member_added",
            Outcome::MemberRemoved { .. } => "member_removed",
            Outcome::RepoRegistered(_) => "repo_registered",
            Outcome::RepoUnregistered(_) => "repo_unregistered",
            Outcome::CollaboratorAdded(_) => "collaborator_added",
            Outcome::CollaboratorRemoved(_) => "collaborator_removed",
        }
    }
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
    /// Repos `(owner, rkey)` with a backfill retry loop running.
    retrying: Arc<Mutex<HashSet<(String, String)>>>,
    /// First and longest delay between backfill retries.
    retry_delays: (Duration, Duration),
}

impl Ingester {
    pub fn new(
        store: Store,
        me: Identity,
        collaborators: Arc<dyn CollaboratorSource>,
        knots: KnotSources,
    ) -> Self {
        Ingester {
            store,
            me,
            collaborators,
            knots,
            retrying: Arc::default(),
            retry_delays: (BACKFILL_RETRY_FIRST, BACKFILL_RETRY_MAX),
        }
    }

    /// Shorter backfill retry delays (tests).
    #[cfg(test)]
    fn with_retry_delays(mut self, first: Duration, max: Duration) -> Self {
        self.retry_delays = (first, max);
        self
    }

    pub fn identity(&self) -> &Identity {
        &self.me
    }

    /// Apply one event. A failed collaborator backfill is logged, not returned: the registration
    /// stands, live collaborator events still apply, and the backfill is retried in the
    /// background (see [`Ingester::retry_backfill`]).
    pub async fn apply(&self, ev: &JetstreamEvent) -> Result<Outcome> {
        let me = self.me.clone();
        let event = ev.clone();
        let outcome = self.store.transaction(move |tx| apply_in(tx, &me, &event)).await?;
        match &outcome {
            Outcome::RepoRegistered(repo) => {
                self.knots.add(&repo.knot);
                // An update may have moved the repo off its previous knot.
                self.knots.recheck();
                if let Err(e) = self.backfill(repo).await {
                    tracing::warn!(error = %e, label = e.label(), repo = %format!("{}/{}", repo.owner, repo.name), "collaborator backfill failed; retrying in the background");
                    self.retry_backfill(repo);
                }
            }
            Outcome::RepoUnregistered(_) => self.knots.recheck(),
            _ => {}
        }
        Ok(outcome)
    }

    /// Try a failed backfill again (the owner's PDS may be down for a while) with doubling
    /// delays, until it succeeds or the repo is no longer registered; each attempt backfills the
    /// repo as it is registered then. One loop per repo: a loop already running covers later
    /// failures too.
    fn retry_backfill(&self, repo: &RepoRow) {
        let key = (repo.owner.clone(), repo.rkey.clone());
        if !self.retrying.lock().unwrap_or_else(PoisonError::into_inner).insert(key.clone()) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let (mut delay, max) = this.retry_delays;
            loop {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(max);
                let (owner, rkey) = key.clone();
                let current = match this.store.call(move |c| q::repo_by_rkey(c, &owner, &rkey)).await {
                    Ok(Some(repo)) => repo,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the repo for a collaborator backfill retry failed");
                        continue;
                    }
                };
                let name = format!("{}/{}", current.owner, current.name);
                match this.backfill(&current).await {
                    Ok(granted) => {
                        tracing::info!(repo = %name, granted, "collaborator backfill succeeded on retry");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, label = e.label(), repo = %name, retry_in = ?delay, "collaborator backfill failed again");
                    }
                }
            }
            this.retrying.lock().unwrap_or_else(PoisonError::into_inner).remove(&key);
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::knot::KnotChange;
    use crate::intake::testkit::{FakeCollaborators, collab, eventually, jetstream_frame};
    use crate::store::temp_store;

    const OWNER: &str = "did:plc:hbrpoigf3cbfnobm2o4rak3v";
    const MEMBER: &str = "did:plc:rjnvgfygwwqc5hyfsxmecosf";
    const COLLAB: &str = "did:plc:ogyr5xkxwnrekpk5yroudocu";
    const MALLORY: &str = "did:plc:mallorymallorymallory00";
    const REPO_URI: &str = "at://did:plc:rjnvgfygwwqc5hyfsxmecosf/sh.tangled.repo/3m6pd65mx7k2b";

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Store,
        ingester: Ingester,
        knots: tokio::sync::mpsc::UnboundedReceiver<KnotChange>,
        source: Arc<FakeCollaborators>,
    }

    fn setup(source: FakeCollaborators) -> Fixture {
        let (dir, store) = temp_store();
        let (sources, knots) = KnotSources::channel();
        let source = Arc::new(source);
        let me = Identity { hostname: "spindle.example.com".into(), owner: OWNER.into() };
        let ingester = Ingester::new(store.clone(), me, source.clone(), sources);
        Fixture { _dir: dir, store, ingester, knots, source }
    }

    fn event(name: &str) -> JetstreamEvent {
        JetstreamEvent::parse(&jetstream_frame(name)).expect("fixture parses")
    }

    fn commit(did: &str, op: &str, collection: &str, rkey: &str, record: Option<Value>) -> JetstreamEvent {
        JetstreamEvent {
            did: did.into(),
            time_us: 1,
            kind: "commit".into(),
            commit: Some(Commit {
                operation: op.into(),
                collection: collection.into(),
                rkey: rkey.into(),
                record,
            }),
        }
    }

    fn member_record(subject: &str, instance: &str) -> Option<Value> {
        Some(
            serde_json::json!({"$type": MEMBER_NSID, "subject": subject, "instance": instance, "createdAt": "2025-11-27T08:12:44Z"}),
        )
    }

    fn repo_record(name: &str, spindle: Option<&str>) -> Option<Value> {
        let mut v = serde_json::json!({"$type": REPO_NSID, "name": name, "knot": "knot1.tangled.sh", "createdAt": "2025-11-20T12:31:09Z"});
        if let Some(s) = spindle {
            v["spindle"] = s.into();
        }
        Some(v)
    }

    fn collab_record(subject: &str, repo: &str) -> Option<Value> {
        Some(
            serde_json::json!({"$type": COLLABORATOR_NSID, "subject": subject, "repo": repo, "createdAt": "2025-11-29T10:42:31Z"}),
        )
    }

    async fn apply(f: &Fixture, ev: &JetstreamEvent) -> Outcome {
        f.ingester.apply(ev).await.expect("apply")
    }

    async fn can(f: &Fixture, did: &str) -> bool {
        f.store.can_manage_repo(MEMBER, "hello-spindle", did).await.expect("query")
    }

    async fn accepts(f: &Fixture) -> bool {
        f.store
            .repo_accepts_pipelines("knot1.tangled.sh", MEMBER, "hello-spindle", OWNER)
            .await
            .expect("query")
    }

    /// Member added by the owner, their repo registered with a paginated collaborator backfill.
    async fn onboard(f: &mut Fixture) {
        assert_eq!(
            apply(f, &event("sh.tangled.spindle.member.create.json")).await,
            Outcome::MemberAdded { subject: MEMBER.into() }
        );
        assert!(matches!(apply(f, &event("sh.tangled.repo.update.json")).await, Outcome::RepoRegistered(_)));
        assert_eq!(
            f.knots.try_recv().expect("knot source added"),
            KnotChange::Add("knot1.tangled.sh".into())
        );
        assert_eq!(f.knots.try_recv().expect("recheck"), KnotChange::Recheck);
    }

    #[tokio::test]
    async fn fixtures_register_member_repo_and_collaborator() {
        let mut f = setup(FakeCollaborators::default());
        // Before the member record, the member's repo is not ours to take.
        assert!(matches!(apply(&f, &event("sh.tangled.repo.update.json")).await, Outcome::Ignored(_)));
        onboard(&mut f).await;
        assert_eq!(f.store.member_dids().await.expect("members"), [MEMBER]);
        assert!(accepts(&f).await);
        assert!(can(&f, MEMBER).await);
        assert!(!can(&f, COLLAB).await);
        let out = apply(&f, &event("sh.tangled.repo.collaborator.create.json")).await;
        assert!(matches!(&out, Outcome::CollaboratorAdded(row) if row.subject == COLLAB), "{out:?}");
        assert!(can(&f, COLLAB).await);
        // Applying again (a rewound replay) changes nothing.
        apply(&f, &event("sh.tangled.repo.collaborator.create.json")).await;
        let rows = f.store.call(|c| q::collaborators(c, MEMBER, "hello-spindle")).await.expect("rows");
        assert_eq!(rows.len(), 1);
    }

    #[tokio::test]
    async fn backfill_pages_and_honours_only_records_for_this_repo_b3() {
        let other_repo = "at://did:plc:rjnvgfygwwqc5hyfsxmecosf/sh.tangled.repo/3zzzzzzzzzzzz";
        let foreign = "at://did:plc:someoneelse/sh.tangled.repo/3m6pd65mx7k2b";
        let source = FakeCollaborators {
            pages: [(
                MEMBER.to_owned(),
                vec![
                    vec![collab("c1", COLLAB, REPO_URI), collab("c2", MALLORY, other_repo)],
                    vec![collab("c3", MALLORY, foreign), collab("c4", "not-a-did", REPO_URI)],
                    vec![collab("c5", "did:plc:second", REPO_URI)],
                ],
            )]
            .into(),
            ..FakeCollaborators::default()
        };
        let mut f = setup(source);
        onboard(&mut f).await;
        let calls = f.source.calls.lock().expect("lock").clone();
        assert_eq!(
            calls,
            [
                (MEMBER.to_owned(), None),
                (MEMBER.to_owned(), Some("1".into())),
                (MEMBER.to_owned(), Some("2".into()))
            ]
        );
        assert!(can(&f, COLLAB).await);
        assert!(can(&f, "did:plc:second").await);
        assert!(!can(&f, MALLORY).await, "records naming other repos grant nothing here");
    }

    #[tokio::test]
    async fn failed_backfill_keeps_the_registration() {
        let mut f = setup(FakeCollaborators { fail: true.into(), ..FakeCollaborators::default() });
        onboard(&mut f).await;
        assert!(accepts(&f).await);
        let repo =
            f.store.call(|c| q::repo_by_rkey(c, MEMBER, "3m6pd65mx7k2b")).await.expect("q").expect("repo");
        let err = f.ingester.backfill(&repo).await.expect_err("PDS down");
        assert_eq!(err.label(), "collaborators");
        assert!(err.to_string().contains("PDS unreachable"), "{err}");
    }

    fn failing_source_with_one_collaborator() -> FakeCollaborators {
        FakeCollaborators {
            fail: true.into(),
            pages: [(MEMBER.to_owned(), vec![vec![collab("c1", COLLAB, REPO_URI)]])].into(),
            ..FakeCollaborators::default()
        }
    }

    fn calls(f: &Fixture) -> usize {
        f.source.calls.lock().expect("lock").len()
    }

    /// The repo's retry loop finishes and the PDS is asked nothing more.
    async fn retry_loop_ends(f: &Fixture, why: &str) {
        eventually(5, "the retry loop ends", || async {
            f.ingester.retrying.lock().expect("lock").is_empty()
        })
        .await;
        let settled = calls(f);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(calls(f), settled, "{why}");
    }

    #[tokio::test]
    async fn a_failed_backfill_is_retried_until_the_pds_answers() {
        let mut f = setup(failing_source_with_one_collaborator());
        f.ingester =
            f.ingester.clone().with_retry_delays(Duration::from_millis(10), Duration::from_millis(40));
        onboard(&mut f).await;
        assert!(!can(&f, COLLAB).await, "the PDS is down: nothing granted yet");
        eventually(5, "retries while the PDS is down", || async { calls(&f) >= 3 }).await;
        // A second failure for the same repo (an updated record) does not start a second loop.
        apply(&f, &event("sh.tangled.repo.update.json")).await;
        assert_eq!(f.ingester.retrying.lock().expect("lock").len(), 1);

        f.source.fail.store(false, std::sync::atomic::Ordering::SeqCst);
        eventually(5, "the retried backfill grants the collaborator", || async { can(&f, COLLAB).await })
            .await;
        retry_loop_ends(&f, "no retries after success").await;
    }

    #[tokio::test]
    async fn backfill_retries_stop_when_the_repo_leaves() {
        let mut f = setup(failing_source_with_one_collaborator());
        f.ingester =
            f.ingester.clone().with_retry_delays(Duration::from_millis(10), Duration::from_millis(20));
        onboard(&mut f).await;
        eventually(5, "a retry", || async { calls(&f) >= 2 }).await;
        let out = apply(&f, &commit(MEMBER, "delete", REPO_NSID, "3m6pd65mx7k2b", None)).await;
        assert!(matches!(out, Outcome::RepoUnregistered(_)), "{out:?}");
        retry_loop_ends(&f, "no retries for a repo that left").await;
    }

    #[tokio::test]
    async fn member_escalating_to_collaborator_on_another_repo_is_refused_b2() {
        let mut f = setup(FakeCollaborators::default());
        onboard(&mut f).await;
        // The owner makes Mallory a member too; Mallory then claims access to the member's repo.
        apply(&f, &commit(OWNER, "create", MEMBER_NSID, "m2", member_record(MALLORY, "spindle.example.com")))
            .await;
        let out =
            apply(&f, &commit(MALLORY, "create", COLLABORATOR_NSID, "x1", collab_record(MALLORY, REPO_URI)))
                .await;
        assert!(matches!(&out, Outcome::Refused(why) if why.contains("cannot add collaborators")), "{out:?}");
        assert!(!can(&f, MALLORY).await);
        // A non-member's record never even reaches the rule.
        let out = apply(
            &f,
            &commit(
                "did:plc:stranger",
                "create",
                COLLABORATOR_NSID,
                "x2",
                collab_record("did:plc:stranger", REPO_URI),
            ),
        )
        .await;
        assert!(matches!(out, Outcome::Ignored(_)), "{out:?}");
        // The owner naming a repo that is not registered here grants nothing either.
        let out = apply(
            &f,
            &commit(
                MEMBER,
                "create",
                COLLABORATOR_NSID,
                "x3",
                collab_record(COLLAB, "at://did:plc:rjnvgfygwwqc5hyfsxmecosf/sh.tangled.repo/3unknownrkey2"),
            ),
        )
        .await;
        assert!(matches!(&out, Outcome::Refused(why) if why.contains("not registered")), "{out:?}");
        let out = apply(
            &f,
            &commit(MEMBER, "create", COLLABORATOR_NSID, "x4", collab_record(COLLAB, "https://example.com")),
        )
        .await;
        assert!(matches!(out, Outcome::Refused(_)), "{out:?}");
    }

    #[tokio::test]
    async fn collaborator_update_and_delete_revoke_b18() {
        let mut f = setup(FakeCollaborators::default());
        onboard(&mut f).await;
        apply(&f, &event("sh.tangled.repo.collaborator.create.json")).await;
        assert!(can(&f, COLLAB).await);
        // Update that points the record at a repo not registered here: the old grant goes.
        let elsewhere = "at://did:plc:rjnvgfygwwqc5hyfsxmecosf/sh.tangled.repo/3elsewhere222";
        apply(
            &f,
            &commit(MEMBER, "update", COLLABORATOR_NSID, "3m6r7nnazea2b", collab_record(COLLAB, elsewhere)),
        )
        .await;
        assert!(!can(&f, COLLAB).await);
        apply(&f, &event("sh.tangled.repo.collaborator.create.json")).await;
        assert!(can(&f, COLLAB).await);
        let out = apply(&f, &commit(MEMBER, "delete", COLLABORATOR_NSID, "3m6r7nnazea2b", None)).await;
        assert!(matches!(out, Outcome::CollaboratorRemoved(_)), "{out:?}");
        assert!(!can(&f, COLLAB).await);
    }

    #[tokio::test]
    async fn member_rules_owner_only_instance_match_and_update_replaces_b17() {
        let f = setup(FakeCollaborators::default());
        let out = apply(
            &f,
            &commit(MEMBER, "create", MEMBER_NSID, "m1", member_record(MALLORY, "spindle.example.com")),
        )
        .await;
        assert!(matches!(out, Outcome::Ignored(_)), "a non-member author is filtered: {out:?}");
        apply(&f, &event("sh.tangled.spindle.member.create.json")).await;
        let out = apply(
            &f,
            &commit(MEMBER, "create", MEMBER_NSID, "m1", member_record(MALLORY, "spindle.example.com")),
        )
        .await;
        assert!(matches!(&out, Outcome::Refused(why) if why.contains("not the spindle owner")), "{out:?}");
        let out = apply(
            &f,
            &commit(OWNER, "create", MEMBER_NSID, "m9", member_record(MALLORY, "other.example.com")),
        )
        .await;
        assert!(matches!(out, Outcome::Ignored(_)), "{out:?}");
        let out = apply(
            &f,
            &commit(OWNER, "create", MEMBER_NSID, "m9", member_record("nobody", "spindle.example.com")),
        )
        .await;
        assert!(matches!(out, Outcome::Refused(_)), "{out:?}");
        assert_eq!(f.store.member_dids().await.expect("m"), [MEMBER]);

        // B17: an update of the same record that changes the subject replaces it.
        apply(
            &f,
            &commit(
                OWNER,
                "update",
                MEMBER_NSID,
                "3m6lwdxk43c2b",
                member_record(COLLAB, "spindle.example.com"),
            ),
        )
        .await;
        assert_eq!(f.store.member_dids().await.expect("m"), [COLLAB]);
        // Moving the record to another instance revokes it.
        let out = apply(
            &f,
            &commit(
                OWNER,
                "update",
                MEMBER_NSID,
                "3m6lwdxk43c2b",
                member_record(COLLAB, "other.example.com"),
            ),
        )
        .await;
        assert_eq!(out, Outcome::MemberRemoved { subject: COLLAB.into() });
        assert!(f.store.member_dids().await.expect("m").is_empty());
    }

    #[tokio::test]
    async fn member_removal_stops_new_pipelines_of_their_repos_b18() {
        let mut f = setup(FakeCollaborators::default());
        onboard(&mut f).await;
        assert!(accepts(&f).await);
        let out = apply(&f, &event("sh.tangled.spindle.member.delete.json")).await;
        assert_eq!(out, Outcome::MemberRemoved { subject: MEMBER.into() });
        assert!(!accepts(&f).await);
        assert!(f.store.member_dids().await.expect("m").is_empty());
        // Their records are no longer processed.
        let out = apply(&f, &event("sh.tangled.repo.collaborator.create.json")).await;
        assert!(matches!(out, Outcome::Ignored(_)), "{out:?}");
        // Deleting an unknown member record is a no-op.
        let out = apply(&f, &event("sh.tangled.spindle.member.delete.json")).await;
        assert!(matches!(out, Outcome::Ignored(_)), "{out:?}");
        // Re-adding the member resumes their still-registered repo.
        apply(&f, &event("sh.tangled.spindle.member.create.json")).await;
        assert!(accepts(&f).await);
    }

    #[tokio::test]
    async fn repo_leaving_us_is_unregistered_b18() {
        for spindle in [Some("[[none]]"), Some("other.example.com"), None] {
            let mut f = setup(FakeCollaborators::default());
            onboard(&mut f).await;
            apply(&f, &event("sh.tangled.repo.collaborator.create.json")).await;
            let out = apply(
                &f,
                &commit(MEMBER, "update", REPO_NSID, "3m6pd65mx7k2b", repo_record("hello-spindle", spindle)),
            )
            .await;
            assert!(matches!(out, Outcome::RepoUnregistered(_)), "{spindle:?}: {out:?}");
            assert!(!accepts(&f).await, "{spindle:?}");
            assert!(!can(&f, COLLAB).await, "{spindle:?}");
            assert!(f.store.repo_knots().await.expect("knots").is_empty());
            // A repo that never was ours is just ignored.
            let out =
                apply(&f, &commit(MEMBER, "create", REPO_NSID, "3other", repo_record("x", spindle))).await;
            assert!(matches!(out, Outcome::Ignored(_)), "{out:?}");
        }
        let mut f = setup(FakeCollaborators::default());
        onboard(&mut f).await;
        let out = apply(&f, &commit(MEMBER, "delete", REPO_NSID, "3m6pd65mx7k2b", None)).await;
        assert!(matches!(out, Outcome::RepoUnregistered(_)), "{out:?}");
        assert!(!accepts(&f).await);
        let out =
            apply(&f, &commit(MEMBER, "create", REPO_NSID, "3bad", Some(serde_json::json!({"name": 3}))))
                .await;
        assert!(matches!(out, Outcome::Refused(_)), "{out:?}");
        let out = apply(
            &f,
            &commit(MEMBER, "create", REPO_NSID, "3bad", repo_record("", Some("spindle.example.com"))),
        )
        .await;
        assert!(matches!(out, Outcome::Refused(_)), "{out:?}");
    }

    #[tokio::test]
    async fn owner_repos_register_and_other_kinds_are_ignored() {
        let mut f = setup(FakeCollaborators::default());
        let out = apply(
            &f,
            &commit(OWNER, "create", REPO_NSID, "3own", repo_record("mine", Some("spindle.example.com"))),
        )
        .await;
        assert!(matches!(out, Outcome::RepoRegistered(_)), "{out:?}");
        assert_eq!(f.knots.try_recv().expect("knot"), KnotChange::Add("knot1.tangled.sh".into()));
        let identity =
            JetstreamEvent { did: OWNER.into(), time_us: 2, kind: "identity".into(), commit: None };
        assert!(matches!(apply(&f, &identity).await, Outcome::Ignored(_)));
        assert!(JetstreamEvent::parse("{\"did\":1}").is_err());
    }

    #[test]
    fn at_uris_parse_strictly() {
        let u = parse_at_uri(REPO_URI).expect("valid");
        assert_eq!((u.authority, u.collection, u.rkey), (MEMBER, REPO_NSID, "3m6pd65mx7k2b"));
        for bad in ["", "at://", "at://a/b", "at://a/b/c/d", "http://a/b/c", "at:///b/c", "at://a b/c/d"] {
            assert!(parse_at_uri(bad).is_none(), "{bad}");
        }
    }
}
