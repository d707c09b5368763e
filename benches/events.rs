//! `/events` throughput and latency over real sockets on 127.0.0.1 with a real SQLite file.
//!
//! 1. Backfill: 10,000 stored events streamed to one client connecting with `cursor=-1`
//!    (target < 200 ms from connect to the last frame).
//! 2. Fan-out: 100 live subscribers; each appended event's latency from the start of
//!    `append_status` to its receipt by each subscriber (target p99 < 20 ms).
//!
//! Run: `cargo bench --bench events`

use std::time::{Duration, Instant};

use bobbin::model::{StatusKind, StatusRecord, WorkflowId};
use bobbin::server::events::{EventsConfig, EventsMetrics, EventsState};
use bobbin::store::Store;
use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const BACKFILL: usize = 10_000;
const BACKFILL_RUNS: usize = 5;
const SUBSCRIBERS: usize = 100;
const LIVE_EVENTS: usize = 200;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

async fn start(store: Store) -> String {
    let state = EventsState {
        store,
        config: EventsConfig::default(),
        metrics: EventsMetrics::default(),
        shutdown: CancellationToken::new(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = bobbin::server::events::router(state);
    tokio::spawn(bobbin::server::serve(listener, app, CancellationToken::new()));
    format!("ws://{addr}/events")
}

async fn append(store: &Store, i: usize) {
    let id = WorkflowId::new("knot1.tangled.sh", "3m734z2gwll22", format!("w{}.yml", i % 7));
    let status = if i.is_multiple_of(2) { StatusKind::Pending } else { StatusKind::Running };
    store.append_status(StatusRecord::new(&id, status, jiff::Timestamp::now())).await.expect("append");
}

async fn next_text(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) {
    loop {
        match ws.next().await.expect("open").expect("frame") {
            Message::Text(_) => return,
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("bench.db")).expect("store");
    let url = start(store.clone()).await;

    // --- backfill ---
    let filling = Instant::now();
    for i in 0..BACKFILL {
        append(&store, i).await;
    }
    println!("setup: appended {BACKFILL} events in {}", ms(filling.elapsed()));
    let mut runs = Vec::new();
    for _ in 0..BACKFILL_RUNS {
        let started = Instant::now();
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("{url}?cursor=-1")).await.expect("connect");
        for _ in 0..BACKFILL {
            next_text(&mut ws).await;
        }
        runs.push(started.elapsed());
    }
    runs.sort();
    println!(
        "backfill {BACKFILL} events, one client, {BACKFILL_RUNS} runs: min {} median {} max {} ({:.0} events/s at the median)",
        ms(runs[0]),
        ms(runs[runs.len() / 2]),
        ms(runs[runs.len() - 1]),
        BACKFILL as f64 / runs[runs.len() / 2].as_secs_f64()
    );

    // --- live fan-out ---
    let mut clients = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("connect");
        clients.push(ws);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let mut readers = Vec::new();
    for mut ws in clients {
        let tx = tx.clone();
        readers.push(tokio::spawn(async move {
            for i in 0..LIVE_EVENTS {
                next_text(&mut ws).await;
                let _ = tx.send((i, Instant::now()));
            }
        }));
    }
    drop(tx);
    let mut sent_at = Vec::with_capacity(LIVE_EVENTS);
    for i in 0..LIVE_EVENTS {
        sent_at.push(Instant::now());
        append(&store, BACKFILL + i).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for r in readers {
        r.await.expect("reader");
    }
    let mut latencies = Vec::with_capacity(LIVE_EVENTS * SUBSCRIBERS);
    while let Some((i, at)) = rx.recv().await {
        latencies.push(at.duration_since(sent_at[i]));
    }
    latencies.sort();
    println!(
        "fan-out {LIVE_EVENTS} live events to {SUBSCRIBERS} subscribers ({} receipts), append→receipt: p50 {} p99 {} max {}",
        latencies.len(),
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies[latencies.len() - 1])
    );
}
