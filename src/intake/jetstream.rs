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

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ingest::{COLLECTIONS, Ingester, JetstreamEvent, Outcome};
use super::ws::{self, Backoff, Ended, Frame, Timing};
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
        }
    }

    pub fn with_timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    pub fn with_rewind(mut self, rewind: Duration) -> Self {
        self.rewind = rewind;
        self
    }

    /// Consume until `stop` is cancelled. Run this as a task.
    pub async fn run(self, stop: CancellationToken) {
        let (tx, mut rx) = mpsc::channel::<Frame>(self.queue);
        let reader = {
            let (store, stop, endpoint, timing) =
                (self.store.clone(), stop.clone(), self.endpoint.clone(), self.timing);
            let rewind = self.rewind.as_micros() as i64;
            async move {
                let mut backoff = Backoff::new(timing.backoff_min, timing.backoff_max);
                loop {
                    let cursor = match store.jetstream_cursor().await {
                        Ok(c) => c.map(|c| (c - rewind).max(0)),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot read the Jetstream cursor");
                            None
                        }
                    };
                    let url = subscribe_url(&endpoint, cursor);
                    tracing::debug!(%url, "connecting to Jetstream");
                    match ws::pump(&url, timing, &tx, &stop).await {
                        Ended::Stopped => return,
                        Ended::Disconnected { frames, reason } => {
                            if frames > 0 {
                                backoff.reset();
                            }
                            tracing::warn!(frames, %reason, "Jetstream connection ended; reconnecting");
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
            let mut retry = Backoff::new(self.timing.backoff_min, self.timing.backoff_max);
            while let Some(frame) = rx.recv().await {
                if stop.is_cancelled() {
                    return;
                }
                let event = match JetstreamEvent::parse(&frame.text) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(error = %e, "skipping malformed Jetstream frame");
                        continue;
                    }
                };
                loop {
                    let applied = match self.ingester.apply(&event).await {
                        Ok(outcome) => {
                            log_outcome(&event, &outcome);
                            self.store.set_jetstream_cursor(event.time_us).await.map_err(Into::into)
                        }
                        Err(e) => Err(e),
                    };
                    match applied {
                        Ok(()) => {
                            retry.reset();
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, label = e.label(), "Jetstream event failed; retrying it");
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
