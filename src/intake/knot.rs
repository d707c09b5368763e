//! One event-stream consumer per knot (spec §3): `ws[s]://<knot>/events[?cursor=N]`.
//!
//! Sources come from the registered repos at start and from repo ingestion at runtime through
//! [`KnotSources::add`]. Additions travel over a channel to the single task that starts
//! consumers, so a source added before [`KnotConsumer::run`] starts waits in the channel and each
//! knot is started exactly once (B24).
//!
//! Per knot, a socket reader feeds a bounded channel and a processor handles frames strictly in
//! order through [`PipelineIntake`]; a frame whose handling fails (e.g. the API server is down)
//! is retried with backoff while the reader waits, so nothing is dropped (B12). Malformed frames
//! are logged and skipped (B11); reconnects use a short jittered backoff and a read deadline (B10).

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::pipeline::{Handled, PipelineIntake};
use super::ws::{self, Backoff, Ended, Frame, Timing};
use crate::store::Store;

/// Adds knot sources at runtime; cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct KnotSources {
    tx: mpsc::UnboundedSender<String>,
}

impl KnotSources {
    /// A source handle and the receiving end [`KnotConsumer`] reads.
    pub(crate) fn channel() -> (Self, mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (KnotSources { tx }, rx)
    }

    /// Subscribe to `knot` (a host, optionally `:port`) if not subscribed already.
    pub fn add(&self, knot: &str) {
        // Only fails when the consumer is gone (shutdown), when there is nothing left to start.
        let _ = self.tx.send(knot.to_owned());
    }
}

/// Frames buffered between one knot's socket and its processor.
pub const DEFAULT_QUEUE: usize = 64;

/// The knot event-stream consumers.
pub struct KnotConsumer {
    store: Store,
    intake: Arc<PipelineIntake>,
    sources: mpsc::UnboundedReceiver<String>,
    dev: bool,
    timing: Timing,
    queue: usize,
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
            KnotConsumer { store, intake, sources, dev, timing: Timing::default(), queue: DEFAULT_QUEUE },
            handle,
        )
    }

    pub fn with_timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    pub fn with_queue(mut self, queue: usize) -> Self {
        self.queue = queue.max(1);
        self
    }

    /// Consume every known knot until `stop` is cancelled. Run this as a task.
    pub async fn run(self, stop: CancellationToken) {
        let KnotConsumer { store, intake, mut sources, dev, timing, queue } = self;
        let mut started = HashSet::new();
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
        let mut start = |knot: String, tasks: &mut JoinSet<()>| {
            if started.insert(knot.clone()) {
                tracing::info!(%knot, "knot source added");
                tasks.spawn(consume(knot, store.clone(), intake.clone(), dev, timing, queue, stop.clone()));
            }
        };
        for knot in initial {
            start(knot, &mut tasks);
        }
        let mut open = true;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                knot = sources.recv(), if open => match knot {
                    Some(knot) => start(knot, &mut tasks),
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
    timing: Timing,
    queue: usize,
    stop: CancellationToken,
) {
    let (tx, mut rx) = mpsc::channel::<Frame>(queue);
    let reader = {
        let (knot, stop) = (knot.clone(), stop.clone());
        async move {
            let mut backoff = Backoff::new(timing.backoff_min, timing.backoff_max);
            loop {
                let cursor = match store.knot_cursor(&knot).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(%knot, error = %e, "cannot read knot cursor");
                        0
                    }
                };
                let url = events_url(&knot, dev, cursor);
                tracing::debug!(%knot, %url, "connecting to knot");
                match ws::pump(&url, timing, &tx, &stop).await {
                    Ended::Stopped => return,
                    Ended::Disconnected { frames, reason } => {
                        if frames > 0 {
                            backoff.reset();
                        }
                        tracing::warn!(%knot, frames, %reason, "knot stream ended; reconnecting");
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    };
    let processor = async {
        let mut retry = Backoff::new(timing.backoff_min, timing.backoff_max);
        while let Some(frame) = rx.recv().await {
            if stop.is_cancelled() {
                return;
            }
            loop {
                match intake.handle(&knot, &frame).await {
                    Ok(handled) => {
                        log_handled(&knot, &handled);
                        retry.reset();
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(%knot, error = %e, label = e.label(), "pipeline intake failed; retrying the event");
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(retry.next_delay()) => {}
                        }
                    }
                }
            }
        }
    };
    tokio::join!(reader, processor);
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
