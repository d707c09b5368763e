//! `/logs` over real sockets: an axum server on 127.0.0.1 and a tokio-tungstenite client, with a
//! real SQLite store and real log files.

use std::path::PathBuf;
use std::time::Duration;

use bobbin::logs::LogHub;
use bobbin::logs::file::LogFile;
use bobbin::logs::follower::RunLog;
use bobbin::logs::server::{LogsState, router};
use bobbin::logs::{LogSettings, line::LogLine};
use bobbin::model::{StatusKind, StatusRecord, WorkflowId};
use bobbin::store::Store;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

struct Server {
    _tmp: tempfile::TempDir,
    addr: std::net::SocketAddr,
    store: Store,
    hub: LogHub,
    dir: PathBuf,
}

async fn server(viewer_buffer: usize, ping: Duration) -> Server {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("logs");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let store = Store::open(tmp.path().join("spindle.db")).expect("store");
    let settings = LogSettings { viewer_buffer, ping_interval: ping, ..LogSettings::new(&dir) };
    let hub = LogHub::new(settings.viewer_buffer);
    let app = router(LogsState::new(store.clone(), hub.clone(), &settings));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    Server { _tmp: tmp, addr, store, hub, dir }
}

fn id() -> WorkflowId {
    WorkflowId::new("knot1.tangled.sh", "3m734z2gwll22", "test.yml")
}

fn fixture_log() -> String {
    let path = format!(
        "{}/../shared/spec/fixtures/logs/knot1.tangled.sh-3m734z2gwll22-test.yml.log",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(path).expect("fixture")
}

type Client = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(s: &Server, id: &WorkflowId) -> Client {
    let url = format!("ws://{}/logs/{}/{}/{}", s.addr, id.knot, id.rkey, id.name);
    let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
    ws
}

/// Everything up to the close frame: (text frames, close code, close reason).
async fn read_all(ws: &mut Client) -> (Vec<String>, u16, String) {
    let mut texts = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("server answers in time")
            .expect("stream open")
            .expect("frame");
        match msg {
            Message::Text(t) => texts.push(t.to_string()),
            Message::Close(frame) => {
                let frame = frame.expect("close frame");
                return (texts, u16::from(frame.code), frame.reason.to_string());
            }
            _ => {}
        }
    }
}

async fn next_text(ws: &mut Client) -> String {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("frame");
        match msg {
            Message::Text(t) => return t.to_string(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected text, got {other:?}"),
        }
    }
}

async fn set_status(s: &Server, status: StatusKind) {
    s.store.append_status(StatusRecord::new(&id(), status, jiff::Timestamp::now())).await.expect("status");
}

#[tokio::test]
async fn finished_workflow_replays_the_file_then_closes_1000() {
    let s = server(64, Duration::from_secs(30)).await;
    let log = fixture_log();
    std::fs::write(s.dir.join(id().log_file_name()), &log).expect("write log");
    set_status(&s, StatusKind::Running).await;
    set_status(&s, StatusKind::Success).await;
    let mut ws = connect(&s, &id()).await;
    let (texts, code, reason) = read_all(&mut ws).await;
    assert_eq!(texts, log.lines().map(str::to_owned).collect::<Vec<_>>());
    assert_eq!((code, reason.as_str()), (1000, "log stream complete"));
}

/// Append one fixture line the way the follower does and wait until it is written and published.
async fn push(w: &mut RunLog, line: &str) {
    let parsed: LogLine = serde_json::from_str(line).expect("fixture line");
    w.push(&parsed);
    w.sync().await.expect("written");
}

#[tokio::test]
async fn live_workflow_streams_appended_lines_and_closes_when_final_and_drained() {
    let s = server(64, Duration::from_secs(30)).await;
    let key = id().log_file_name();
    let log: Vec<String> = fixture_log().lines().map(str::to_owned).collect();
    set_status(&s, StatusKind::Running).await;
    let file = LogFile::open(&s.dir.join(&key), 0).expect("open");
    let mut writer = RunLog::new(file, s.hub.clone(), key.clone()).expect("writer thread");
    s.hub.writer_active(&key);
    push(&mut writer, &log[0]).await;
    push(&mut writer, &log[1]).await;

    let mut ws = connect(&s, &id()).await;
    assert_eq!(next_text(&mut ws).await, log[0]);
    assert_eq!(next_text(&mut ws).await, log[1]);
    // Lines appended while connected arrive.
    for line in &log[2..6] {
        push(&mut writer, line).await;
        assert_eq!(&next_text(&mut ws).await, line);
    }
    // The status becomes final while the follower still writes: the rest must still come.
    set_status(&s, StatusKind::Success).await;
    for line in &log[6..] {
        push(&mut writer, line).await;
    }
    s.hub.writer_done(&key);
    let (texts, code, reason) = read_all(&mut ws).await;
    assert_eq!(texts, log[6..].to_vec());
    assert_eq!((code, reason.as_str()), (1000, "log stream complete"));
}

#[tokio::test]
async fn live_viewer_waits_for_the_file_and_gets_pinged() {
    let s = server(64, Duration::from_millis(100)).await;
    let key = id().log_file_name();
    set_status(&s, StatusKind::Pending).await;
    let mut ws = connect(&s, &id()).await;
    // Nothing to send yet: a ping keeps the connection alive.
    let msg = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("ping in time");
    assert!(matches!(msg, Some(Ok(Message::Ping(_)))), "{msg:?}");
    // The file appears once the follower starts.
    s.hub.writer_active(&key);
    let mut writer =
        RunLog::new(LogFile::open(&s.dir.join(&key), 0).expect("open"), s.hub.clone(), key.clone())
            .expect("writer thread");
    let line: LogLine = serde_json::from_str(fixture_log().lines().next().expect("line")).expect("parse");
    writer.push(&line);
    writer.sync().await.expect("written");
    assert_eq!(next_text(&mut ws).await, line.to_json());
    set_status(&s, StatusKind::Cancelled).await;
    s.hub.writer_done(&key);
    let (texts, code, _) = read_all(&mut ws).await;
    assert!(texts.is_empty());
    assert_eq!(code, 1000);
}

#[tokio::test]
async fn failed_before_log_sends_go_frames_inside_a_visible_step() {
    let s = server(64, Duration::from_secs(30)).await;
    let record = StatusRecord::new(&id(), StatusKind::Failed, "2025-12-03T09:21:50Z".parse().expect("ts"))
        .with_error("unknown engine \"docker\"", -1);
    s.store.append_status(record).await.expect("status");
    let mut ws = connect(&s, &id()).await;
    let (texts, code, reason) = read_all(&mut ws).await;
    let go_frames = std::fs::read_to_string(format!(
        "{}/../shared/spec/fixtures/logs/failed-before-log.frames.jsonl",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("fixture");
    let go: Vec<&str> = go_frames.lines().collect();
    assert_eq!(texts.len(), 4, "{texts:#?}");
    assert_eq!(
        texts[0],
        r#"{"kind":"control","content":"Error","time":"2025-12-03T09:21:50Z","step_id":0,"step_status":"start","step_kind":1}"#
    );
    assert_eq!(texts[1], go[0]);
    assert_eq!(texts[2], go[1]);
    assert_eq!(
        texts[3],
        r#"{"kind":"control","content":"Error","time":"2025-12-03T09:21:50Z","step_id":0,"step_status":"end","step_kind":1}"#
    );
    assert_eq!((code, reason.as_str()), (1000, "log stream complete"));
}

/// The follower creates the log file as soon as the run starts; a run the controller then fails
/// before any step wrote a line (fail-fast on an image that cannot be pulled) leaves it empty. That
/// is still "no log": the viewer must get the error frames, live or after the end, not nothing.
#[tokio::test]
async fn failed_with_only_an_empty_log_file_still_shows_the_error() {
    const ERROR: &str = "image docker.io/library/nope:1 cannot be pulled: ErrImagePull";
    let s = server(64, Duration::from_secs(30)).await;
    let key = id().log_file_name();
    set_status(&s, StatusKind::Running).await;
    let file = LogFile::open(&s.dir.join(&key), 0).expect("the follower opens the file");
    let mut writer = RunLog::new(file, s.hub.clone(), key.clone()).expect("writer thread");
    s.hub.writer_active(&key);
    let mut live = connect(&s, &id()).await;

    let failed = StatusRecord::new(&id(), StatusKind::Failed, jiff::Timestamp::now()).with_error(ERROR, -1);
    s.store.append_status(failed).await.expect("status");
    writer.sync().await.expect("written");
    s.hub.writer_done(&key);
    assert_eq!(std::fs::metadata(s.dir.join(&key)).expect("file").len(), 0, "nothing was written");

    let mut after = connect(&s, &id()).await;
    for ws in [&mut live, &mut after] {
        let (texts, code, reason) = read_all(ws).await;
        assert_eq!(texts.len(), 4, "{texts:#?}");
        let data: serde_json::Value = serde_json::from_str(&texts[2]).expect("json");
        assert_eq!((data["kind"].as_str(), data["content"].as_str()), (Some("data"), Some(ERROR)));
        let start: serde_json::Value = serde_json::from_str(&texts[0]).expect("json");
        assert_eq!(start["step_status"], "start");
        assert_eq!((code, reason.as_str()), (1000, "log stream complete"));
    }
}

#[tokio::test]
async fn unknown_workflow_sends_nothing_and_closes() {
    let s = server(64, Duration::from_secs(30)).await;
    let mut ws = connect(&s, &WorkflowId::new("knot.example", "nope", "x.yml")).await;
    let (texts, code, reason) = read_all(&mut ws).await;
    assert!(texts.is_empty());
    assert_eq!((code, reason.as_str()), (1000, "log stream complete"));
}

#[tokio::test]
async fn plain_http_is_a_bad_request() {
    let s = server(64, Duration::from_secs(30)).await;
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.expect("connect");
    tcp.write_all(
        b"GET /logs/knot1.tangled.sh/3m734z2gwll22/test.yml HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write");
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.expect("read");
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_viewer_is_dropped_without_holding_up_the_writer() {
    let s = server(2, Duration::from_secs(30)).await;
    let key = id().log_file_name();
    set_status(&s, StatusKind::Running).await;
    s.hub.writer_active(&key);
    let mut ws = connect(&s, &id()).await;
    // Make sure the viewer is subscribed before writing.
    let mut writer =
        RunLog::new(LogFile::open(&s.dir.join(&key), 0).expect("open"), s.hub.clone(), key.clone())
            .expect("writer thread");
    let first = LogLine::data(1, "first", jiff::Timestamp::now());
    writer.push(&first);
    writer.flush().await.expect("flush");
    assert_eq!(next_text(&mut ws).await, first.to_json());
    // Now the client stops reading while the follower writes ~40 MB. Publishing never waits for
    // viewers (the loop completes although nobody reads), and the viewer is closed once it
    // falls behind its buffer.
    let big = "x".repeat(64 * 1024);
    for _ in 0..600 {
        writer.push(&LogLine::data(1, big.clone(), jiff::Timestamp::now()));
        writer.flush().await.expect("flush");
    }
    writer.sync().await.expect("written");
    let mut code = None;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
        if let Message::Close(frame) = msg {
            code = frame.map(|f| u16::from(f.code));
            break;
        }
    }
    assert_eq!(code, Some(1013));
    assert_eq!(s.hub.metrics().viewers_dropped.get(), 1);
    assert_eq!(s.hub.metrics().lines_written.get(), 601);
    let _ = ws.close(None).await;
}
