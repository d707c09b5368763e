//! The WebSocket client loop both streams share: connect, forward text frames to a bounded
//! channel, keep the connection honest with pings and a read deadline, back off between attempts.

use std::time::Duration;

use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Timing of one stream's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Handshake deadline.
    pub connect_timeout: Duration,
    /// With no frame at all (pongs count) for this long, the connection is presumed dead (B10).
    pub read_deadline: Duration,
    /// We ping this often, so a quiet but healthy peer still produces pongs.
    pub ping_every: Duration,
    /// First reconnect delay; doubles per failed attempt up to `backoff_max` (B9, B10).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            connect_timeout: Duration::from_secs(10),
            read_deadline: Duration::from_secs(90),
            ping_every: Duration::from_secs(30),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// One text frame and when it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub text: String,
    /// Local receive time, unix nanoseconds.
    pub received_ns: i64,
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Shutdown was requested, or the processor is gone.
    Stopped,
    /// The connection failed or closed after forwarding `frames` frames; reconnect.
    Disconnected { frames: usize, reason: String },
}

/// Exponential backoff with "equal jitter": each delay is uniformly in [d/2, d].
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff { min, max, next: min }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = d / 2;
        half + half.mul_f64(random_unit())
    }

    /// A connection worked: start again from the minimum.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

fn random_unit() -> f64 {
    let mut b = [0u8; 4];
    match getrandom::getrandom(&mut b) {
        Ok(()) => f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX),
        Err(_) => 0.5,
    }
}

/// Unix nanoseconds now.
pub fn now_ns() -> i64 {
    jiff::Timestamp::now().as_nanosecond() as i64
}

/// Connect to `url` and forward every text frame to `tx` until the connection ends.
///
/// The send waits when the channel is full: that is the back-pressure (B12), and the read
/// deadline only counts time spent waiting for the socket, never time spent waiting on `tx`.
pub async fn pump(url: &str, timing: Timing, tx: &mpsc::Sender<Frame>, stop: &CancellationToken) -> Ended {
    let connect = tokio::time::timeout(timing.connect_timeout, tokio_tungstenite::connect_async(url));
    let mut ws = tokio::select! {
        _ = stop.cancelled() => return Ended::Stopped,
        r = connect => match r {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(e)) => return Ended::Disconnected { frames: 0, reason: format!("connect: {e}") },
            Err(_) => return Ended::Disconnected { frames: 0, reason: "connect: timed out".into() },
        },
    };
    let mut frames = 0usize;
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + timing.ping_every, timing.ping_every);
    // After a long wait on the processor, one ping is enough.
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut deadline = tokio::time::Instant::now() + timing.read_deadline;
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => {
                // A peer that no longer reads must not hold up shutdown.
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                return Ended::Stopped;
            }
            _ = ping.tick() => {
                if let Err(e) = ws.send(Message::Ping(Vec::new().into())).await {
                    return Ended::Disconnected { frames, reason: format!("ping: {e}") };
                }
                continue;
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Ended::Disconnected {
                    frames,
                    reason: format!("no frame for {}s", timing.read_deadline.as_secs()),
                };
            }
            m = ws.next() => m,
        };
        deadline = tokio::time::Instant::now() + timing.read_deadline;
        match msg {
            Some(Ok(Message::Text(text))) => {
                let frame = Frame { text: text.as_str().to_owned(), received_ns: now_ns() };
                tokio::select! {
                    _ = stop.cancelled() => return Ended::Stopped,
                    r = tx.send(frame) => if r.is_err() { return Ended::Stopped },
                }
                frames += 1;
                // Waiting on the processor is not the peer's silence.
                deadline = tokio::time::Instant::now() + timing.read_deadline;
            }
            Some(Ok(Message::Close(close))) => {
                return Ended::Disconnected { frames, reason: format!("closed by peer: {close:?}") };
            }
            // Binary frames are ignored (spec §3.3); pings are answered by tungstenite, pongs
            // only prove liveness.
            Some(Ok(_)) => {}
            Some(Err(e)) => return Ended::Disconnected { frames, reason: format!("read: {e}") },
            None => return Ended::Disconnected { frames, reason: "connection closed".into() },
        }
    }
}

/// Run one stream until `stop`: a reader that (re)connects to `url()` and feeds a bounded queue,
/// and a processor that hands each frame to `handle` in order, retrying a frame whose handling
/// fails (with backoff) rather than skipping it.
///
/// Before reconnecting, the reader waits until every frame it forwarded has been handled, so the
/// cursor `url()` reads is current and a reconnect replays as little as possible.
#[allow(clippy::too_many_arguments)] // one call site per stream; a struct would only rename these
pub async fn consume(
    stream: &'static str,
    what: &str,
    metrics: &super::IntakeMetrics,
    timing: Timing,
    queue: usize,
    stop: &CancellationToken,
    url: impl Fn() -> BoxFuture<'static, String>,
    handle: impl Fn(Frame) -> BoxFuture<'static, Result<(), super::IntakeError>>,
) {
    let (tx, mut rx) = mpsc::channel::<Frame>(queue.max(1));
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(0usize);
    let reader = async move {
        let mut backoff = Backoff::new(timing.backoff_min, timing.backoff_max);
        let mut sent = 0usize;
        loop {
            let target = url().await;
            tracing::debug!(stream = what, url = %target, "connecting");
            match pump(&target, timing, &tx, stop).await {
                Ended::Stopped => return,
                Ended::Disconnected { frames, reason } => {
                    sent += frames;
                    metrics.reconnect(stream, if frames > 0 { "after_frames" } else { "without_frames" });
                    if frames > 0 {
                        backoff.reset();
                    }
                    tracing::warn!(stream = what, frames, %reason, "stream ended; reconnecting");
                }
            }
            let delay = tokio::time::sleep(backoff.next_delay());
            let drained = done_rx.wait_for(|done| *done >= sent);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = async { let _ = drained.await; delay.await } => {}
            }
        }
    };
    let processor = async {
        let mut retry = Backoff::new(timing.backoff_min, timing.backoff_max);
        while let Some(frame) = rx.recv().await {
            loop {
                if stop.is_cancelled() {
                    return;
                }
                match handle(frame.clone()).await {
                    Ok(()) => {
                        retry.reset();
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(stream = what, error = %e, label = e.label(), "frame failed; retrying it");
                        metrics.retry(stream, e.label());
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(retry.next_delay()) => {}
                        }
                    }
                }
            }
            done_tx.send_modify(|d| *d += 1);
        }
    };
    tokio::join!(reader, processor);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let nominal = Duration::from_secs(1 << i.min(6)).min(Duration::from_secs(60));
            assert!(*d >= nominal / 2 && *d <= nominal, "attempt {i}: {d:?} vs {nominal:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }

    /// `wss://` goes through rustls (a missing crypto provider would panic here): a peer that is
    /// not TLS is a connect error, and shutdown interrupts a pending connect.
    #[tokio::test]
    async fn wss_uses_tls_and_failures_are_disconnects() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                use tokio::io::AsyncWriteExt;
                let _ = tcp.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            }
        });
        let (tx, _rx) = mpsc::channel(1);
        let stop = CancellationToken::new();
        let ended = pump(&format!("wss://{addr}/events"), Timing::default(), &tx, &stop).await;
        assert!(
            matches!(&ended, Ended::Disconnected { frames: 0, reason } if reason.starts_with("connect:")),
            "{ended:?}"
        );
        let ended = pump(&format!("ws://{addr}/events"), Timing::default(), &tx, &stop).await;
        assert!(matches!(ended, Ended::Disconnected { frames: 0, .. }), "{ended:?}");
        stop.cancel();
        assert_eq!(pump("ws://192.0.2.1:9/events", Timing::default(), &tx, &stop).await, Ended::Stopped);
    }
}
