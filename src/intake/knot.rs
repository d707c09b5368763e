//! One event-stream consumer per knot (spec §3): `ws[s]://<knot>/events[?cursor=N]`.
//!
//! Sources come from the registered repos at start and from repo ingestion at runtime through
//! [`KnotSources::add`]. Additions travel over a channel to the single task that starts
//! consumers, so a source added before [`KnotConsumer::run`] starts waits in the channel and each
//! knot is started exactly once (B24). When repos leave, ingestion sends
//! [`KnotSources::recheck`] down the same channel, and a knot no registered repo names any more
//! is stopped (and started again if a repo on it registers later).
//!
//! Per knot, a socket reader feeds a bounded channel and a processor handles frames strictly in
//! order through [`PipelineIntake`]; a frame whose handling fails (e.g. the API server is down)
//! is retried with backoff while the reader waits, so nothing is dropped (B12). Malformed frames
//! are logged and skipped (B11); reconnects use a short jittered backoff and a read deadline (B10).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use futures::future::BoxFuture;

use super::pipeline::{Handled, PipelineIntake};
use super::ws::{self, Frame, Timing};
use super::{IntakeError, IntakeMetrics};
use crate::store::Store;

/// Adds and retires knot sources at runtime; cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct KnotSources {
    tx: mpsc::UnboundedSender<KnotChange>,
}

/// What [`KnotSources`] sends to the consumer task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KnotChange {
    /// Subscribe to this knot if not subscribed already.
    Add(String),
    /// Repos left or moved: stop consuming knots no registered repo names.
    Recheck,
}

impl KnotSources {
    /// A source handle and the receiving end [`KnotConsumer`] reads.
    pub(crate) fn channel() -> (Self, mpsc::UnboundedReceiver<KnotChange>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (KnotSources { tx }, rx)
    }

    /// Subscribe to `knot` (a host, optionally `:port`) if not subscribed already.
    pub fn add(&self, knot: &str) {
        // Only fails when the consumer is gone (shutdown), when there is nothing left to start.
        let _ = self.tx.send(KnotChange::Add(knot.to_owned()));
    }

    /// Stop consuming knots that no registered repo names any more.
    pub fn recheck(&self) {
        let _ = self.tx.send(KnotChange::Recheck);
    }
}

/// Frames buffered between one knot's socket and its processor.
pub const DEFAULT_QUEUE: usize = 64;

/// The knot event-stream consumers.
pub struct KnotConsumer {
    store: Store,
    intake: Arc<PipelineIntake>,
    sources: mpsc::UnboundedReceiver<KnotChange>,
    dev: bool,
    timing: Timing,
    queue: usize,
    metrics: IntakeMetrics,
}

/// `wss://<knot>/events`, `ws://` in dev mode, with `?cursor=` only when non-zero (spec §3.2).
pub fn events_url(knot: &str, dev: bool, cursor: i64) -> String {
    let scheme = if dev { "ws" } else { "wss" };
    if cursor == 0 {
        format!("{scheme}://{knot}/events")
    } else {
        format!("{scheme}://{knot}/events?cursor={cursor}")
    }
}

impl KnotConsumer {
    /// `dev` is `SPINDLE_SERVER_DEV`. The returned [`KnotSources`] goes to repo ingestion.
    pub fn new(store: Store, intake: Arc<PipelineIntake>, dev: bool) -> (Self, KnotSources) {
        let (handle, sources) = KnotSources::channel();
        (
            KnotConsumer {
                store,
                intake,
                sources,
                dev,
                timing: Timing::default(),
                queue: DEFAULT_QUEUE,
                metrics: IntakeMetrics::default(),
            },
            handle,
        )
    }

    pub fn with_timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    /// Count reconnects and retries here (pass the same metrics as the [`PipelineIntake`]).
    pub fn with_metrics(mut self, metrics: IntakeMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn with_queue(mut self, queue: usize) -> Self {
        self.queue = queue.max(1);
        self
    }

    /// Consume every known knot until `stop` is cancelled. Run this as a task.
    pub async fn run(self, stop: CancellationToken) {
        let KnotConsumer { store, intake, mut sources, dev, timing, queue, metrics } = self;
        // Running knots and the token that stops each.
        let mut started: HashMap<String, CancellationToken> = HashMap::new();
        let mut tasks = JoinSet::new();
        let initial = loop {
            match store.repo_knots().await {
                Ok(k) => break k,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read knot sources; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(timing.backoff_max) => {}
                    }
                }
            }
        };
        let start =
            |knot: String, started: &mut HashMap<String, CancellationToken>, tasks: &mut JoinSet<()>| {
                if !started.contains_key(&knot) {
                    tracing::info!(%knot, "knot source added");
                    let knot_stop = stop.child_token();
                    started.insert(knot.clone(), knot_stop.clone());
                    tasks.spawn(consume(
                        knot,
                        store.clone(),
                        intake.clone(),
                        dev,
                        (timing, queue),
                        metrics.clone(),
                        knot_stop,
                    ));
                }
            };
        for knot in initial {
            start(knot, &mut started, &mut tasks);
        }
        let mut open = true;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                change = sources.recv(), if open => match change {
                    Some(KnotChange::Add(knot)) => start(knot, &mut started, &mut tasks),
                    Some(KnotChange::Recheck) => match store.repo_knots().await {
                        Ok(wanted) => started.retain(|knot, knot_stop| {
                            let keep = wanted.contains(knot);
                            if !keep {
                                tracing::info!(%knot, "knot source removed: no registered repo names it");
                                knot_stop.cancel();
                            }
                            keep
                        }),
                        Err(e) => tracing::warn!(error = %e, "cannot read knot sources; keeping every knot"),
                    },
                    None => open = false,
                },
                Some(done) = tasks.join_next() => {
                    if let Err(e) = done {
                        tracing::error!(error = %e, "knot consumer task ended abnormally");
                    }
                }
            }
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// One knot: reconnecting reader + in-order processor.
async fn consume(
    knot: String,
    store: Store,
    intake: Arc<PipelineIntake>,
    dev: bool,
    (timing, queue): (Timing, usize),
    metrics: IntakeMetrics,
    stop: CancellationToken,
) {
    let url = || -> BoxFuture<'static, String> {
        let (store, knot) = (store.clone(), knot.clone());
        Box::pin(async move {
            let cursor = store.knot_cursor(&knot).await.unwrap_or_else(|e| {
                tracing::error!(%knot, error = %e, "cannot read knot cursor");
                0
            });
            events_url(&knot, dev, cursor)
        })
    };
    let handle = |frame: Frame| -> BoxFuture<'static, Result<(), IntakeError>> {
        let (intake, knot) = (intake.clone(), knot.clone());
        Box::pin(async move {
            let handled = intake.handle(&knot, &frame).await?;
            log_handled(&knot, &handled);
            Ok(())
        })
    };
    ws::consume("knot", &format!("knot {knot}"), &metrics, timing, queue, &stop, url, handle).await;
}

fn log_handled(knot: &str, handled: &Handled) {
    match handled {
        Handled::Malformed(e) => tracing::warn!(%knot, error = %e, "skipping malformed knot frame"),
        Handled::Ignored(nsid) => tracing::debug!(%knot, %nsid, "ignoring knot event"),
        Handled::Duplicate => tracing::debug!(%knot, "pipeline already taken in"),
        Handled::Dropped(reason) => tracing::info!(%knot, %reason, "pipeline dropped"),
        Handled::Accepted { runs, failed } => {
            tracing::info!(%knot, runs = runs.len(), failed = failed.len(), "pipeline taken in")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::testkit::{Act, FakeWs, MockKube, eventually, fast_timing, fixture};
    use crate::model::status::decode_tid;
    use crate::store::intake::{self as q, RepoRow};

    const OWNER: &str = "did:plc:hbrpoigf3cbfnobm2o4rak3v";
    const MEMBER: &str = "did:plc:rjnvgfygwwqc5hyfsxmecosf";
    const MARGIN_NS: i64 = 60_000_000_000;

    /// A fixture frame rewritten to come from the fake knot serving it.
    fn frame(name: &str) -> String {
        fixture(&format!("knot-events/{name}")).replace("knot1.tangled.sh", "{HOST}")
    }

    /// The member's repo the fixtures name, on `knot`.
    fn hello_repo(knot: String) -> RepoRow {
        RepoRow { knot, owner: MEMBER.into(), name: "hello-spindle".into(), rkey: "3m6pd65mx7k2b".into() }
    }

    async fn store_with_repo(dir: &tempfile::TempDir, knot: &str) -> Store {
        let store = Store::open(dir.path().join("spindle.db")).expect("open");
        let knot = knot.to_owned();
        store
            .transaction(move |tx| {
                q::put_member(tx, OWNER, "m1", "spindle.example.com", MEMBER)?;
                q::register_repo(tx, &hello_repo(knot))
            })
            .await
            .expect("register");
        store
    }

    fn tid_cursor(rkey: &str) -> i64 {
        decode_tid(rkey).expect("tid").0 as i64 * 1000 - MARGIN_NS
    }

    #[test]
    fn urls_follow_dev_mode_and_cursor() {
        assert_eq!(events_url("knot1.tangled.sh", false, 0), "wss://knot1.tangled.sh/events");
        assert_eq!(events_url("localhost:6000", true, 17), "ws://localhost:6000/events?cursor=17");
    }

    /// The fake knot serves the push pipeline, a malformed frame, a binary frame and a refUpdate,
    /// then drops the connection; on reconnect it replays the push pipeline and sends the pull
    /// request one. Each workflow is requested once, and the cursors are the events' TID times.
    #[tokio::test]
    async fn consumes_fixtures_across_a_disconnect_without_duplicates() {
        let dir = tempfile::tempdir().expect("dir");
        let server = FakeWs::start(vec![
            vec![
                Act::Text(frame("pipeline-push.frame.txt")),
                Act::Text("{this is not json".into()),
                Act::Binary,
                Act::Text(r#"{"event":{},"nsid":"sh.tangled.git.refUpdate","rkey":"3m734z2gwll23"}"#.into()),
                Act::Drop,
            ],
            vec![
                Act::Text(frame("pipeline-push.frame.txt")),
                Act::Text(frame("pipeline-pull-request.frame.txt")),
            ],
        ])
        .await;
        let host = server.host();
        let store = store_with_repo(&dir, &host).await;
        let kube = MockKube::start();
        let metrics = IntakeMetrics::default();
        let intake = Arc::new(
            PipelineIntake::new(store.clone(), Arc::new(kube.api("ci")), "ci", OWNER)
                .with_metrics(metrics.clone()),
        );
        let (consumer, _sources) = KnotConsumer::new(store.clone(), intake, true);
        let stop = CancellationToken::new();
        let task =
            tokio::spawn(consumer.with_timing(fast_timing()).with_metrics(metrics.clone()).run(stop.clone()));

        let (st, h) = (&store, &host);
        eventually(10, "pull request pipeline taken in", || async move {
            st.pipeline_seen(h, "3m737bbo4pe22").await.unwrap_or(false)
        })
        .await;
        stop.cancel();
        task.await.expect("consumer stops");

        let posted = kube.posted_names();
        let mut unique = posted.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(posted.len(), 4, "two workflows per pipeline, the replay skipped: {posted:?}");
        assert_eq!(unique.len(), 4);
        assert!(kube.seen().iter().all(|s| s.method == "POST"));

        let requests = server.requests();
        assert_eq!(requests[0], "/events", "no cursor stored yet");
        assert_eq!(requests[1], format!("/events?cursor={}", tid_cursor("3m734z2gwll23")));
        assert_eq!(store.knot_cursor(&host).await.expect("cursor"), tid_cursor("3m737bbo4pe22"));
        assert_eq!(store.events_after(0, 100).await.expect("events").len(), 4, "one pending per workflow");

        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            r#"bobbin_intake_frames_total{stream="knot",outcome="accepted"} 2"#,
            r#"bobbin_intake_frames_total{stream="knot",outcome="duplicate"} 1"#,
            r#"bobbin_intake_frames_total{stream="knot",outcome="malformed"} 1"#,
            r#"bobbin_intake_frames_total{stream="knot",outcome="ignored"} 1"#,
            r#"bobbin_intake_workflows_total{result="created"} 4"#,
            r#"bobbin_intake_reconnects_total{stream="knot",outcome="after_frames"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    /// A knot that stops answering (no pongs, no frames) is abandoned after the read deadline,
    /// and a source added before `run` starts is consumed exactly once (B24).
    #[tokio::test]
    async fn half_open_connection_is_replaced_and_early_sources_start_once() {
        let dir = tempfile::tempdir().expect("dir");
        let server = FakeWs::start(vec![vec![Act::Stall], vec![]]).await;
        let host = server.host();
        let store = Store::open(dir.path().join("spindle.db")).expect("open");
        let kube = MockKube::start();
        let intake = Arc::new(PipelineIntake::new(store.clone(), Arc::new(kube.api("ci")), "ci", OWNER));
        let (consumer, sources) = KnotConsumer::new(store.clone(), intake, true);
        sources.add(&host);
        sources.add(&host);
        let stop = CancellationToken::new();
        let task = tokio::spawn(consumer.with_timing(fast_timing()).run(stop.clone()));
        sources.add(&host);
        let s = &server;
        eventually(10, "a second connection after the stall", || async move { s.requests().len() >= 2 })
            .await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        stop.cancel();
        task.await.expect("stops");
        assert_eq!(server.requests().len(), 2, "one consumer, reconnected once: {:?}", server.requests());
    }

    /// A knot no registered repo names any more is disconnected on a recheck (and not
    /// reconnected); a repo registering on it again starts it again.
    #[tokio::test]
    async fn a_knot_whose_repos_all_left_is_stopped_and_can_come_back() {
        let dir = tempfile::tempdir().expect("dir");
        let server = FakeWs::start(vec![vec![], vec![]]).await;
        let host = server.host();
        let store = store_with_repo(&dir, &host).await;
        let kube = MockKube::start();
        let intake = Arc::new(PipelineIntake::new(store.clone(), Arc::new(kube.api("ci")), "ci", OWNER));
        let (consumer, sources) = KnotConsumer::new(store.clone(), intake, true);
        let stop = CancellationToken::new();
        let task = tokio::spawn(consumer.with_timing(fast_timing()).run(stop.clone()));
        let s = &server;
        eventually(10, "connected", || async move { s.requests().len() == 1 }).await;

        // Another knot's repo leaving changes nothing here.
        sources.recheck();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(server.closed(), 0, "still wanted");

        store
            .transaction(|tx| q::unregister_repo(tx, MEMBER, "3m6pd65mx7k2b").map(|_| ()))
            .await
            .expect("unregister");
        sources.recheck();
        eventually(10, "disconnected", || async move { s.closed() == 1 }).await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(server.requests().len(), 1, "not reconnected: {:?}", server.requests());

        let knot = host.clone();
        store.transaction(move |tx| q::register_repo(tx, &hello_repo(knot))).await.expect("register");
        sources.add(&host);
        eventually(10, "connected again", || async move { s.requests().len() == 2 }).await;
        stop.cancel();
        task.await.expect("stops");
    }

    /// With the API server failing and a one-frame queue, every pipeline still gets its runs:
    /// the reader waits for the processor instead of dropping (B12).
    #[tokio::test]
    async fn backpressure_never_drops_a_pipeline() {
        let dir = tempfile::tempdir().expect("dir");
        let script = (0..5)
            .map(|i| {
                let rkey = crate::model::status::encode_tid(1_764_753_710_415_000 + i, 0);
                Act::Text(frame("pipeline-push.frame.txt").replace("3m734z2gwll22", &rkey))
            })
            .collect();
        let server = FakeWs::start(vec![script]).await;
        let host = server.host();
        let store = store_with_repo(&dir, &host).await;
        let kube = MockKube::start();
        kube.fail_next(&[500, 503, 500]);
        let intake = Arc::new(PipelineIntake::new(store.clone(), Arc::new(kube.api("ci")), "ci", OWNER));
        let (consumer, _sources) = KnotConsumer::new(store.clone(), intake, true);
        let stop = CancellationToken::new();
        let task = tokio::spawn(consumer.with_timing(fast_timing()).with_queue(1).run(stop.clone()));
        let k = &kube;
        eventually(10, "all ten workflow runs", || async move { k.existing().len() == 10 }).await;
        stop.cancel();
        task.await.expect("stops");
        assert_eq!(store.events_after(0, 100).await.expect("events").len(), 10);
    }
}
