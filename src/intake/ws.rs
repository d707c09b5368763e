//! The WebSocket client loop both streams share: connect, forward text frames to a bounded
//! channel, keep the connection honest with pings and a read deadline, back off between attempts.

use std::time::Duration;

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
    let mut deadline = tokio::time::Instant::now() + timing.read_deadline;
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => {
                let _ = ws.close(None).await;
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
}
