//! `GET /logs/{knot}/{rkey}/{name}` (WebSocket), as the Go spindle serves it (spec §6.3), with its
//! never-ending live stream fixed (B20): once the workflow's status is final and its follower has
//! written everything, the remaining lines are sent and the stream closes with 1000
//! `log stream complete`.
//!
//! Each line of the file is one text frame. A viewer reads the file, then live chunks from the
//! [`LogHub`] at or past the offset it read up to. A viewer too slow for its bounded buffer is
//! closed (1013) rather than slowing the follower down.

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path as UrlPath, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::broadcast::error::RecvError;

use super::LogSettings;
use super::hub::{LogHub, Writer};
use super::line::{GO_ZERO_TIME, LogLine, StepStatus, write_json_string};
use crate::model::{StatusKind, StatusRecord, WorkflowId};
use crate::store::Store;

/// Close reason on every normal end (what Go sends and the appview expects).
pub const COMPLETE_REASON: &str = "log stream complete";
/// Close code for a viewer that fell too far behind ("try again later").
pub const TOO_SLOW_CODE: u16 = 1013;

/// What the `/logs` handler needs.
#[derive(Clone)]
pub struct LogsState {
    store: Store,
    hub: LogHub,
    dir: PathBuf,
    ping_interval: Duration,
}

impl LogsState {
    pub fn new(store: Store, hub: LogHub, settings: &LogSettings) -> Self {
        LogsState { store, hub, dir: settings.dir.clone(), ping_interval: settings.ping_interval }
    }
}

/// The `/logs/{knot}/{rkey}/{name}` route with its state applied.
pub fn router(state: LogsState) -> Router {
    Router::new().route("/logs/{knot}/{rkey}/{name}", get(logs)).with_state(state)
}

async fn logs(
    State(state): State<LogsState>,
    UrlPath((knot, rkey, name)): UrlPath<(String, String, String)>,
    headers: axum::http::HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    // gorilla's handshake checks, shared with /events: 400 for a plain request, 403 for a
    // cross-origin browser request.
    match crate::server::accept_websocket(ws, &headers) {
        Ok(ws) => {
            let id = WorkflowId::new(knot, rkey, name);
            ws.on_upgrade(move |socket| serve(socket, state, id))
        }
        Err(rejected) => rejected.into_response(),
    }
}

/// How a stream ended.
enum End {
    Complete,
    TooSlow,
    ClientGone,
}

#[tracing::instrument(skip_all, fields(workflow = %id))]
async fn serve(socket: WebSocket, state: LogsState, id: WorkflowId) {
    let (mut sink, mut incoming) = socket.split();
    // Read and discard what the client sends; notice when it goes away.
    let (gone_tx, mut gone) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        while let Some(Ok(msg)) = incoming.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
        let _ = gone_tx.send(());
    });
    let metrics = state.hub.metrics().clone();
    metrics.viewers.inc();
    let end = {
        let mut out = Out { sink: &mut sink, gone: &mut gone };
        stream(&mut out, &state, &id).await
    };
    metrics.viewers.dec();
    if matches!(end, End::TooSlow) {
        metrics.viewers_dropped.inc();
    }
    let close = match end {
        End::Complete => Some(CloseFrame { code: 1000, reason: Utf8Bytes::from_static(COMPLETE_REASON) }),
        End::TooSlow => {
            Some(CloseFrame { code: TOO_SLOW_CODE, reason: Utf8Bytes::from_static("log viewer too slow") })
        }
        End::ClientGone => None,
    };
    if let Some(frame) = close {
        let _ = sink.send(Message::Close(Some(frame))).await;
        let _ = sink.flush().await;
        // Give the client a moment to answer the close before dropping the connection.
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut gone).await;
    }
    reader.abort();
    state.hub.gc();
}

struct Out<'a> {
    sink: &'a mut futures::stream::SplitSink<WebSocket, Message>,
    gone: &'a mut tokio::sync::oneshot::Receiver<()>,
}

impl Out<'_> {
    async fn text(&mut self, line: &[u8]) -> Result<(), End> {
        let text = String::from_utf8_lossy(line).into_owned();
        self.sink.send(Message::Text(Utf8Bytes::from(text))).await.map_err(|_| End::ClientGone)
    }

    /// Send every complete line of `bytes`; returns the bytes consumed.
    async fn lines(&mut self, bytes: &[u8]) -> Result<usize, End> {
        let mut at = 0;
        while let Some(i) = memchr::memchr(b'\n', &bytes[at..]) {
            if i > 0 {
                self.text(&bytes[at..at + i]).await?;
            }
            at += i + 1;
        }
        Ok(at)
    }
}

async fn stream(out: &mut Out<'_>, state: &LogsState, id: &WorkflowId) -> End {
    match stream_inner(out, state, id).await {
        Ok(()) => End::Complete,
        Err(end) => end,
    }
}

async fn stream_inner(out: &mut Out<'_>, state: &LogsState, id: &WorkflowId) -> Result<(), End> {
    let mut events = state.store.subscribe_events();
    let Some(mut status) = state.store.latest_status(id).await.ok().flatten() else {
        // Unknown workflow: nothing to send (Go).
        return Ok(());
    };
    let key = id.log_file_name();
    let path = state.dir.join(&key);
    if failed_before_log(&status, &path).await {
        return send_failed_before_log(out, &status).await;
    }
    let mut sub = state.hub.subscribe(&key);
    let mut sent = send_file_from(out, &path, 0).await?;
    let ping = tokio::time::sleep(state.ping_interval);
    tokio::pin!(ping);
    loop {
        if status.status.is_final() && *sub.writer.borrow_and_update() == Writer::Idle {
            if failed_before_log(&status, &path).await {
                return send_failed_before_log(out, &status).await;
            }
            send_file_from(out, &path, sent).await?;
            return Ok(());
        }
        tokio::select! {
            msg = sub.lines.recv() => match msg {
                Ok(chunk) => {
                    if chunk.offset > sent {
                        // Lines we have not seen are in the file: read them first.
                        sent = send_file_range(out, &path, sent, chunk.offset).await?;
                    }
                    if chunk.end() > sent && chunk.offset <= sent {
                        let from = (sent - chunk.offset) as usize;
                        sent += out.lines(&chunk.bytes[from..]).await? as u64;
                    }
                    ping.as_mut().reset(tokio::time::Instant::now() + state.ping_interval);
                }
                Err(RecvError::Lagged(_)) => return Err(End::TooSlow),
                // The file was replaced by a new run of the workflow.
                Err(RecvError::Closed) => return Ok(()),
            },
            changed = sub.writer.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            changed = events.changed() => {
                if changed.is_ok()
                    && let Ok(Some(s)) = state.store.latest_status(id).await
                {
                    status = s;
                }
            }
            _ = &mut ping => {
                out.sink.send(Message::Ping(Default::default())).await.map_err(|_| End::ClientGone)?;
                ping.as_mut().reset(tokio::time::Instant::now() + state.ping_interval);
            }
            _ = &mut *out.gone => return Err(End::ClientGone),
        }
    }
}

/// Go's condition for the error frames (failed with an error, no log file), where an empty file
/// counts as none: the follower creates the file when the run starts, so a run failed before any
/// step wrote a line (an image that cannot be pulled, a pod that cannot be scheduled) has an empty
/// file, and without this its error would never reach the appview.
async fn failed_before_log(status: &StatusRecord, path: &Path) -> bool {
    status.status == StatusKind::Failed
        && status.error.is_some()
        && !tokio::fs::metadata(path).await.is_ok_and(|m| m.len() > 0)
}

/// Go's two frames for a workflow that failed before it had a log, bracketed by a real `start`
/// and `end` for step 0 so the appview shows the error (spec §6.3 recommendation).
async fn send_failed_before_log(out: &mut Out<'_>, status: &StatusRecord) -> Result<(), End> {
    let error = status.error.clone().unwrap_or_default();
    let time = status.created_at.parse::<jiff::Timestamp>().unwrap_or_else(|_| jiff::Timestamp::now());
    let start = LogLine::control(0, StepStatus::Start, "Error", 1, "", time).to_json();
    let end = LogLine::control(0, StepStatus::End, "Error", 1, "", time).to_json();
    let go_control = format!(
        "{{\"kind\":\"control\",\"content\":\"\",\"time\":\"{GO_ZERO_TIME}\",\"step_id\":0,\"step_kind\":1}}"
    );
    let mut go_data = b"{\"kind\":\"data\",\"content\":".to_vec();
    write_json_string(&mut go_data, &error);
    go_data.extend_from_slice(format!(",\"time\":\"{GO_ZERO_TIME}\",\"step_id\":0}}").as_bytes());
    out.text(start.as_bytes()).await?;
    out.text(go_control.as_bytes()).await?;
    out.text(&go_data).await?;
    out.text(end.as_bytes()).await?;
    Ok(())
}

/// Send the complete lines of the file from `from` to EOF; returns the new offset.
async fn send_file_from(out: &mut Out<'_>, path: &Path, from: u64) -> Result<u64, End> {
    send_file_range(out, path, from, u64::MAX).await
}

/// Send the complete lines in `[from, to)`; returns the offset after the last line sent.
async fn send_file_range(out: &mut Out<'_>, path: &Path, from: u64, to: u64) -> Result<u64, End> {
    let Ok(mut file) = tokio::fs::File::open(path).await else { return Ok(from) };
    if file.seek(std::io::SeekFrom::Start(from)).await.is_err() {
        return Ok(from);
    }
    let mut at = from;
    let mut carry: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while at + (carry.len() as u64) < to {
        let want = ((to - at - carry.len() as u64).min(buf.len() as u64)) as usize;
        let n = match file.read(&mut buf[..want]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        carry.extend_from_slice(&buf[..n]);
        let used = out.lines(&carry).await?;
        carry.drain(..used);
        at += used as u64;
    }
    Ok(at)
}
