//! The Jetstream subscription (spec §2.1–2.3).
//!
//! URL: endpoint + `?cursor=<time_us>` (omitted when none is stored) + the three
//! `wantedCollections` in Go's order. No `wantedDids`: every record of the three collections
//! arrives and the rules keep only the owner's and members' (spec §2.2), so membership changes
//! need no reconnect.
//!
//! Events are applied strictly in order; the stored cursor is the `time_us` of the last event
//! whose effects have committed (B8), and each connection starts a few seconds before it, because
//! re-applying an event is harmless. Reconnects back off exponentially with jitter (B9).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use tokio_util::sync::CancellationToken;

use super::ingest::{COLLECTIONS, Ingester, JetstreamEvent, Outcome};
use super::ws::{self, Frame, Timing};
use super::{IntakeError, IntakeMetrics};
use crate::store::Store;

/// How far before the stored cursor a connection starts.
pub const DEFAULT_REWIND: Duration = Duration::from_secs(5);

/// `endpoint?cursor=…&wantedCollections=…` (spec §2.1 order).
pub fn subscribe_url(endpoint: &str, cursor: Option<i64>) -> String {
    let mut url = endpoint.to_owned();
    let mut sep = if endpoint.contains('?') { '&' } else { '?' };
    if let Some(c) = cursor {
        url.push_str(&format!("{sep}cursor={c}"));
        sep = '&';
    }
    for c in COLLECTIONS {
        url.push_str(&format!("{sep}wantedCollections={c}"));
        sep = '&';
    }
    url
}

/// The Jetstream consumer.
pub struct Jetstream {
    endpoint: String,
    store: Store,
    ingester: Ingester,
    timing: Timing,
    rewind: Duration,
    queue: usize,
    metrics: IntakeMetrics,
}

impl Jetstream {
    /// `endpoint` is `SPINDLE_SERVER_JETSTREAM_ENDPOINT`.
    pub fn new(endpoint: impl Into<String>, store: Store, ingester: Ingester) -> Self {
        Jetstream {
            endpoint: endpoint.into(),
            store,
            ingester,
            timing: Timing::default(),
            rewind: DEFAULT_REWIND,
            queue: 256,
            metrics: IntakeMetrics::default(),
        }
    }

    pub fn with_timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    pub fn with_metrics(mut self, metrics: IntakeMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn with_rewind(mut self, rewind: Duration) -> Self {
        self.rewind = rewind;
        self
    }

    /// Consume until `stop` is cancelled. Run this as a task.
    pub async fn run(self, stop: CancellationToken) {
        let rewind = self.rewind.as_micros() as i64;
        let metrics = self.metrics;
        let (store, endpoint, ingester) = (self.store, Arc::new(self.endpoint), Arc::new(self.ingester));
        let url = || -> BoxFuture<'static, String> {
            let (store, endpoint) = (store.clone(), endpoint.clone());
            Box::pin(async move {
                let cursor = store.jetstream_cursor().await.unwrap_or_else(|e| {
                    tracing::error!(error = %e, "cannot read the Jetstream cursor");
                    None
                });
                subscribe_url(&endpoint, cursor.map(|c| (c - rewind).max(0)))
            })
        };
        let handle = |frame: Frame| -> BoxFuture<'static, Result<(), IntakeError>> {
            let (store, ingester, metrics) = (store.clone(), ingester.clone(), metrics.clone());
            Box::pin(async move {
                let event = match JetstreamEvent::parse(&frame.text) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(error = %e, "skipping malformed Jetstream frame");
                        metrics.frame("jetstream", "malformed");
                        return Ok(());
                    }
                };
                let outcome = ingester.apply(&event).await?;
                log_outcome(&event, &outcome);
                metrics.frame("jetstream", outcome.label());
                store.set_jetstream_cursor(event.time_us).await?;
                Ok(())
            })
        };
        ws::consume("jetstream", "jetstream", &metrics, self.timing, self.queue, &stop, url, handle).await;
    }
}

fn log_outcome(ev: &JetstreamEvent, outcome: &Outcome) {
    let collection = ev.commit.as_ref().map(|c| c.collection.as_str()).unwrap_or("");
    match outcome {
        Outcome::Ignored(why) => tracing::trace!(did = %ev.did, collection, %why, "Jetstream event ignored"),
        Outcome::Refused(why) => tracing::warn!(did = %ev.did, collection, %why, "Jetstream record refused"),
        other => tracing::info!(did = %ev.did, collection, outcome = ?other, "Jetstream record applied"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_has_cursor_first_then_collections_in_go_order() {
        assert_eq!(
            subscribe_url("wss://jetstream1.us-west.bsky.network/subscribe", Some(1764348007123457)),
            "wss://jetstream1.us-west.bsky.network/subscribe?cursor=1764348007123457&wantedCollections=sh.tangled.spindle.member&wantedCollections=sh.tangled.repo&wantedCollections=sh.tangled.repo.collaborator"
        );
        assert_eq!(
            subscribe_url("ws://127.0.0.1:1/subscribe", None),
            "ws://127.0.0.1:1/subscribe?wantedCollections=sh.tangled.spindle.member&wantedCollections=sh.tangled.repo&wantedCollections=sh.tangled.repo.collaborator"
        );
    }
}

#[cfg(test)]
mod socket_tests {
    use super::*;
    use crate::intake::ingest::Identity;
    use crate::intake::knot::{KnotChange, KnotSources};
    use crate::intake::testkit::{
        Act, FakeCollaborators, FakeWs, MockKube, collab, eventually, fast_timing, fixture, jetstream_frame,
    };

    const OWNER: &str = "did:plc:hbrpoigf3cbfnobm2o4rak3v";
    const MEMBER: &str = "did:plc:rjnvgfygwwqc5hyfsxmecosf";
    const COLLAB: &str = "did:plc:ogyr5xkxwnrekpk5yroudocu";

    fn identity() -> Identity {
        Identity { hostname: "spindle.example.com".into(), owner: OWNER.into() }
    }

    fn collections() -> &'static str {
        "wantedCollections=sh.tangled.spindle.member&wantedCollections=sh.tangled.repo&wantedCollections=sh.tangled.repo.collaborator"
    }

    /// The fake Jetstream sends the member and repo fixtures (with a malformed frame between),
    /// drops the connection, and on reconnect sends the collaborator and member-delete fixtures.
    /// The reconnect asks for the last processed `time_us` minus the rewind, and the final cursor
    /// is the last event's `time_us`.
    #[tokio::test]
    async fn applies_fixtures_in_order_across_a_disconnect() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(dir.path().join("spindle.db")).expect("open");
        let server = FakeWs::start(vec![
            vec![
                Act::Text(jetstream_frame("sh.tangled.spindle.member.create.json")),
                Act::Text("not json at all".into()),
                Act::Text(jetstream_frame("sh.tangled.repo.update.json")),
                Act::Close,
            ],
            vec![
                Act::Text(jetstream_frame("sh.tangled.repo.collaborator.create.json")),
                Act::Text(jetstream_frame("sh.tangled.spindle.member.delete.json")),
            ],
        ])
        .await;
        let (sources, mut knots) = KnotSources::channel();
        let source = FakeCollaborators {
            pages: [(
                MEMBER.to_owned(),
                vec![vec![collab(
                    "3m6r7nnazea2b",
                    COLLAB,
                    "at://did:plc:rjnvgfygwwqc5hyfsxmecosf/sh.tangled.repo/3m6pd65mx7k2b",
                )]],
            )]
            .into(),
            ..FakeCollaborators::default()
        };
        let ingester = Ingester::new(store.clone(), identity(), Arc::new(source), sources);
        let jetstream = Jetstream::new(format!("ws://{}/subscribe", server.host()), store.clone(), ingester)
            .with_timing(fast_timing());
        let stop = CancellationToken::new();
        let task = tokio::spawn(jetstream.run(stop.clone()));
        let s = &store;
        eventually(10, "member delete applied", || async move {
            s.jetstream_cursor().await.ok().flatten() == Some(1764866401004517)
        })
        .await;
        stop.cancel();
        task.await.expect("stops");

        let requests = server.requests();
        assert_eq!(requests[0], format!("/subscribe?{}", collections()));
        assert_eq!(
            requests[1],
            format!("/subscribe?cursor={}&{}", 1764348007123456_i64 - 5_000_000, collections())
        );
        assert_eq!(knots.try_recv().expect("knot source"), KnotChange::Add("knot1.tangled.sh".into()));
        assert!(store.can_manage_repo(MEMBER, "hello-spindle", COLLAB).await.expect("q"));
        assert!(store.member_dids().await.expect("m").is_empty(), "member removed");
        assert!(
            !store
                .repo_accepts_pipelines("knot1.tangled.sh", MEMBER, "hello-spindle", OWNER)
                .await
                .expect("q"),
            "a removed member's repo takes no new pipelines"
        );
    }

    /// Everything wired as `serve` wires it: the member's repo record names a knot, repo
    /// ingestion adds it as a source at runtime, the knot's push pipeline becomes two WorkflowRuns.
    #[tokio::test]
    async fn jetstream_repo_record_starts_the_knot_that_creates_workflow_runs() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(dir.path().join("spindle.db")).expect("open");
        let knot = FakeWs::start(vec![vec![Act::Text(
            fixture("knot-events/pipeline-push.frame.txt").replace("knot1.tangled.sh", "{HOST}"),
        )]])
        .await;
        let knot_host = knot.host();
        let jet = FakeWs::start(vec![vec![
            Act::Text(jetstream_frame("sh.tangled.spindle.member.create.json")),
            Act::Text(jetstream_frame("sh.tangled.repo.update.json").replace("knot1.tangled.sh", &knot_host)),
        ]])
        .await;

        let kube = MockKube::start();
        let mut config = crate::config::Config::for_tests();
        config.dev = true;
        config.jetstream_endpoint = format!("ws://{}/subscribe", jet.host());
        let metrics = crate::intake::IntakeMetrics::default();
        let intake = crate::intake::Intake::new(
            &config,
            store.clone(),
            kube.client.clone(),
            "ci",
            Arc::new(FakeCollaborators::default()),
            metrics,
        )
        .with_timing(fast_timing());
        let stop = CancellationToken::new();
        let task = tokio::spawn(intake.run(stop.clone()));

        let k = &kube;
        eventually(10, "two WorkflowRuns", || async move { k.posted_names().len() == 2 }).await;
        let (st, h) = (&store, &knot_host);
        eventually(10, "pipeline marked", || async move {
            st.pipeline_seen(h, "3m734z2gwll22").await.unwrap_or(false)
        })
        .await;
        stop.cancel();
        task.await.expect("stops");
        assert_eq!(knot.requests(), ["/events"]);
        let bodies: Vec<_> = kube.seen().into_iter().map(|s| s.body["spec"]["workflow"].clone()).collect();
        assert_eq!(bodies, ["build.yml", "test.yml"]);
        assert_eq!(store.events_after(0, 10).await.expect("events").len(), 2);
    }
}
