//! `GET /events`: the status event stream the appview subscribes to (spec §6.2).
//!
//! Each connection pulls rather than being pushed to: it pages through `created > cursor` until
//! nothing is left (fixing B7), then sleeps on the store's tip and pages again when it moves. Pages
//! come from a bounded window of the newest events shared by all subscribers ([`super::recent`]),
//! or from the store for older cursors, so memory per subscriber is one page plus the socket's
//! write buffer, whatever the backlog. A subscriber whose socket does not accept a frame within
//! `send_timeout` (it stopped reading, or cannot keep up) gets a close frame 1008 with a reason and
//! is dropped; the others never wait for it.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{
    CloseFrame, Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
};
use axum::extract::{Query, State, rejection::QueryRejection};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use super::recent::RecentEvents;
use crate::store::Store;

/// Close code sent to a subscriber that cannot keep up (policy violation, as the socket would
/// otherwise buffer without bound).
pub const SLOW_CLOSE_CODE: u16 = 1008;
/// Close code sent when the server shuts down.
pub const SHUTDOWN_CLOSE_CODE: u16 = 1001;

/// Timings of the stream. Defaults are the Go spindle's where it has one.
#[derive(Debug, Clone)]
pub struct EventsConfig {
    /// A ping (empty payload) after this long without a new event (Go: 30 s).
    pub ping_interval: Duration,
    /// A frame the socket has not accepted after this long marks the subscriber as too slow.
    pub send_timeout: Duration,
    /// How long the close frame to a slow subscriber may take before the connection is dropped.
    pub close_timeout: Duration,
    /// Events read from the store per query (Go: 100).
    pub page_size: usize,
    /// Open streams allowed at once; further upgrades get 503. The endpoint is unauthenticated
    /// (the appview connects anonymously), so this bounds what strangers can hold open (B26).
    pub max_subscribers: usize,
    /// Newest events kept in memory for all subscribers to share (see [`super::recent`]).
    pub recent_capacity: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            ping_interval: Duration::from_secs(30),
            send_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(5),
            page_size: 100,
            max_subscribers: 1024,
            recent_capacity: 4096,
        }
    }
}

/// `/events` metrics.
#[derive(Debug, Clone, Default)]
pub struct EventsMetrics {
    pub subscribers: Gauge,
    pub frames_sent: Counter,
    pub slow_disconnects: Counter,
}

impl EventsMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("bobbin_events_subscribers", "Open /events connections", self.subscribers.clone());
        registry.register(
            "bobbin_events_frames_sent",
            "Status frames sent on /events",
            self.frames_sent.clone(),
        );
        registry.register(
            "bobbin_events_slow_disconnects",
            "/events subscribers dropped because they did not keep up",
            self.slow_disconnects.clone(),
        );
    }
}

/// What `/events` needs.
#[derive(Debug, Clone)]
pub struct EventsState {
    pub store: Store,
    pub config: EventsConfig,
    pub metrics: EventsMetrics,
    /// Cancelled when the server shuts down; open streams then close with 1001.
    pub shutdown: CancellationToken,
}

/// `GET /events`, state applied.
pub fn router(state: EventsState) -> Router {
    let slots = Arc::new(Semaphore::new(state.config.max_subscribers));
    let tip = *state.store.subscribe_events().borrow();
    let recent = Arc::new(RecentEvents::new(state.config.recent_capacity, tip));
    Router::new().route("/events", get(handler)).with_state(Shared { state, slots, recent })
}

#[derive(Clone)]
struct Shared {
    state: EventsState,
    /// One permit per open stream.
    slots: Arc<Semaphore>,
    recent: Arc<RecentEvents>,
}

/// Where a connection starts reading, from its `cursor` query parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Missing, unparsable or 0: no backfill.
    Now,
    /// Events with `created` greater than this (negative: all of them, Go's quirk).
    After(i64),
}

impl Start {
    /// Go's `strconv.ParseInt(cursor, 10, 64)`, with failures and 0 meaning "now".
    pub fn parse(cursor: Option<&str>) -> Start {
        match cursor.and_then(|c| c.parse::<i64>().ok()) {
            None | Some(0) => Start::Now,
            Some(c) => Start::After(c),
        }
    }

    /// The cursor to query from, given the clock and the newest stored `created`. A cursor in the
    /// future is clamped to the present, so events created after the connection are never skipped
    /// because of a skewed appview clock.
    pub fn resolve(self, now_ns: i64, tip: i64) -> i64 {
        let present = now_ns.max(tip);
        match self {
            Start::Now => present,
            Start::After(c) => c.min(present),
        }
    }
}

async fn handler(
    State(Shared { state, slots, recent }): State<Shared>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match super::accept_websocket(upgrade, &headers) {
        Ok(u) => u,
        Err(rejected) => return rejected.into_response(),
    };
    let cursor = query.ok().and_then(|Query(q)| q.into_iter().find(|(k, _)| k == "cursor").map(|(_, v)| v));
    // Fix the starting point now, before the 101 response: "no backfill" then means nothing
    // appended before the client's handshake completed, however late the stream task starts.
    let now = jiff::Timestamp::now().as_nanosecond() as i64;
    let cursor = Start::parse(cursor.as_deref()).resolve(now, *state.store.subscribe_events().borrow());
    let Ok(slot) = slots.try_acquire_owned() else {
        tracing::warn!(max = state.config.max_subscribers, "refusing an /events subscriber: at capacity");
        return super::HandshakeRejected(StatusCode::SERVICE_UNAVAILABLE).into_response();
    };
    upgrade.on_upgrade(move |socket| async move {
        stream(state, recent, socket, cursor).await;
        drop(slot);
    })
}

/// Why a stream ended.
#[derive(Debug)]
enum End {
    ClientGone,
    Slow,
    Shutdown,
    Store(crate::store::StoreError),
}

type Sink = SplitSink<WebSocket, Message>;

#[tracing::instrument(name = "events", skip_all, fields(cursor))]
async fn stream(state: EventsState, recent: Arc<RecentEvents>, socket: WebSocket, cursor: i64) {
    state.metrics.subscribers.inc();
    let (mut sink, mut incoming) = socket.split();
    // Read and discard whatever the client sends; the stream ending means the client is gone.
    let reader = async move { while let Some(Ok(_)) = incoming.next().await {} };
    tokio::pin!(reader);

    let end = tokio::select! {
        end = pump(&state, &recent, &mut sink, cursor) => end,
        () = &mut reader => End::ClientGone,
        () = state.shutdown.cancelled() => End::Shutdown,
    };
    let close = match &end {
        End::Slow => {
            state.metrics.slow_disconnects.inc();
            let reason = format!(
                "subscriber too slow: a frame was not accepted within {} ms",
                state.config.send_timeout.as_millis()
            );
            Some(CloseFrame { code: SLOW_CLOSE_CODE, reason: reason.into() })
        }
        End::Shutdown => {
            Some(CloseFrame { code: SHUTDOWN_CLOSE_CODE, reason: "server shutting down".into() })
        }
        // Go sends no close frame when a stream ends; a store failure ends it the same way.
        End::ClientGone | End::Store(_) => None,
    };
    match &end {
        End::Store(e) => tracing::warn!(error = %e, "cannot read status events; closing the stream"),
        other => tracing::debug!(end = ?other, "stream ended"),
    }
    if let Some(frame) = close {
        let _ =
            tokio::time::timeout(state.config.close_timeout, sink.send(Message::Close(Some(frame)))).await;
    }
    state.metrics.subscribers.dec();
}

/// Backfill, then follow the store's tip, until something ends the stream.
async fn pump(state: &EventsState, recent: &RecentEvents, sink: &mut Sink, mut cursor: i64) -> End {
    let mut tip = state.store.subscribe_events();
    loop {
        if let Err(end) = drain(state, recent, &mut tip, sink, &mut cursor).await {
            return end;
        }
        tokio::select! {
            changed = tip.changed() => {
                if changed.is_err() {
                    return End::Store(crate::store::StoreError::Closed);
                }
                tip.borrow_and_update();
            }
            () = tokio::time::sleep(state.config.ping_interval) => {
                if let Err(end) = send(state, sink, Message::Ping(Default::default())).await {
                    return end;
                }
            }
        }
    }
}

/// Send every event after `cursor`, a page at a time, advancing `cursor` past each one sent. Pages
/// come from the shared window when it reaches back to `cursor`, else from the store.
async fn drain(
    state: &EventsState,
    recent: &RecentEvents,
    tip: &mut watch::Receiver<i64>,
    sink: &mut Sink,
    cursor: &mut i64,
) -> Result<(), End> {
    let size = state.config.page_size;
    loop {
        let newest = *tip.borrow_and_update();
        recent.refresh(&state.store, newest, size).await.map_err(End::Store)?;
        let page = match recent.read(*cursor, size) {
            Some(page) => page,
            None => state.store.events_after(*cursor, size).await.map_err(End::Store)?,
        };
        let full = page.len() == size;
        for event in page {
            send(state, sink, Message::Text(event.frame.into())).await?;
            state.metrics.frames_sent.inc();
            *cursor = event.created;
        }
        if !full {
            return Ok(());
        }
    }
}

async fn send(state: &EventsState, sink: &mut Sink, message: Message) -> Result<(), End> {
    match tokio::time::timeout(state.config.send_timeout, sink.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::ClientGone),
        Err(_) => Err(End::Slow),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_parsing_follows_go() {
        assert_eq!(Start::parse(None), Start::Now);
        assert_eq!(Start::parse(Some("")), Start::Now);
        assert_eq!(Start::parse(Some("abc")), Start::Now);
        assert_eq!(Start::parse(Some("0")), Start::Now);
        assert_eq!(Start::parse(Some("99999999999999999999")), Start::Now, "out of int64 range");
        assert_eq!(Start::parse(Some("-5")), Start::After(-5));
        assert_eq!(Start::parse(Some("1764753710000000000")), Start::After(1_764_753_710_000_000_000));
    }

    #[test]
    fn cursors_resolve_against_clock_and_tip() {
        assert_eq!(Start::Now.resolve(100, 50), 100);
        assert_eq!(Start::Now.resolve(100, 150), 150, "a tip ahead of the clock is still 'now'");
        assert_eq!(Start::After(40).resolve(100, 50), 40);
        assert_eq!(Start::After(500).resolve(100, 50), 100, "future cursors are clamped");
        assert_eq!(Start::After(-1).resolve(100, 50), -1, "negative means everything");
    }
}
