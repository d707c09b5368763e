//! Sustained log capture rate (issue 5): bobbin's follower against what `kubectl logs -f` gets
//! from the same `pods/log` stream.
//!
//! One real HTTP server on 127.0.0.1 (axum, its own thread and runtime) speaks the parts of the
//! Kubernetes API a follower touches: the TaskRun list, the Pod, the run's Secret and
//! `pods/{pod}/log?container=…&follow=true&timestamps=true`, whose chunked body is a fixed
//! 256 MiB of kubelet-format step output (`<RFC 3339 nano> <text>\n`; lines of ~80–200 bytes,
//! ANSI colours, tabs, HTML-ish characters, every 97th line carrying one of 5 secrets, every
//! 4096th line a 4–28 KiB blob, every 65536th line a 100 KiB blob that bobbin must split) served
//! as fast as the client reads it. Three clients, run alternately, each through kube's own HTTP
//! stack (`Api<Pod>::log_stream`) on a current-thread tokio runtime:
//!
//! - `kubectl`: what `kubectl logs -f` does with the stream (its `DefaultConsumeRequest`): read
//!   up to each newline and write that line to stdout, here an unbuffered `/dev/null` file;
//! - `raw`: the transport's ceiling: bulk copy of the body to `/dev/null` in 64 KiB reads;
//! - `bobbin`: the real `Follower::run` end to end (TaskRun/Pod/Secret lookups, line assembly,
//!   timestamp parsing, masking, LogLine encoding, NDJSON append, hub publish, position
//!   persistence to a real SQLite file, the final drain of the terminated container).
//!
//! Every bobbin round is verified: exactly the expected number of data lines, one start and one
//! end control line, exactly one `***` per injected secret and no secret value (raw or JSON
//! escaped) in the file.
//!
//! Run: `cargo bench --bench capture` (`CAPTURE_MIB=64 CAPTURE_ROUNDS=3` for a quick run,
//! `CAPTURE_ONLY=bobbin` to run one side, e.g. under `perf record`).

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bobbin::logs::follower::{Follower, LoggedStep, RunTarget};
use bobbin::logs::line::{go_time, write_json_string};
use bobbin::logs::{LogHub, LogSettings};
use bobbin::model::WorkflowId;
use bobbin::store::Store;
use futures::{AsyncBufReadExt, AsyncReadExt};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, LogParams};
use serde_json::{Value, json};

const NS: &str = "bench";
const PIPELINE_RUN: &str = "wf-bench";
const TASK: &str = "step-1-build";
const TASKRUN: &str = "wf-bench-step-1-build";
const POD: &str = "wf-bench-step-1-build-pod";
const CONTAINER: &str = "step-run";
const SECRET: &str = "run-secrets";
/// Bytes per body frame the server hands to hyper.
const FRAME: usize = 32 * 1024;
/// bobbin's default `max_line_bytes`.
const CAP: usize = 32 * 1024;

const SECRETS: [&str; 5] = [
    "ghp_0123456789abcdefghijklmnopqrstuvwx",
    "hunter2-hunter2",
    "s3cr3t-t0ken",
    "AKIAIOSFODNN7EXAMPLE",
    "p@ss<w0rd>&\"x\"",
];

fn main() {
    let mib: usize = std::env::var("CAPTURE_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let rounds: usize = std::env::var("CAPTURE_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    // Profiling aid: run one side only.
    let only = std::env::var("CAPTURE_ONLY").ok();
    let generated = Instant::now();
    let work = Arc::new(Workload::generate(mib << 20));
    println!(
        "workload: {:.1} MB, {} kubelet lines, {} expected data lines, {} secrets, {:.1} s of log time \
         (generated in {:.1} s)",
        work.body.len() as f64 / 1e6,
        work.lines,
        work.data_lines,
        work.secrets,
        (work.last_ts.as_second() - work.first_second) as f64,
        generated.elapsed().as_secs_f64()
    );

    let served = Arc::new(Served {
        work: work.clone(),
        log_requests: AtomicU64::new(0),
        log_bytes: AtomicU64::new(0),
    });
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let server_state = served.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("server runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            addr_tx.send(listener.local_addr().expect("addr")).expect("send addr");
            axum::serve(listener, router(server_state)).await.expect("serve");
        });
    });
    let addr = addr_rx.recv().expect("server address");
    let url = format!("http://{addr}");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("client runtime");
    let mut results: HashMap<&'static str, Vec<Round>> = HashMap::new();
    for round in 0..rounds {
        for side in ["kubectl", "bobbin", "raw"] {
            if only.as_deref().is_some_and(|o| o != side) {
                continue;
            }
            let before = served.log_bytes.load(Ordering::Relaxed);
            let r = rt.block_on(async {
                match side {
                    "kubectl" => kubectl_round(&url, &work).await,
                    "raw" => raw_round(&url, &work).await,
                    _ => bobbin_round(&url, &work, round).await,
                }
            });
            let served_bytes = served.log_bytes.load(Ordering::Relaxed) - before;
            println!(
                "round {round} {side:>7}: {:>7.1} MB/s, {:>9.0} lines/s ({:.3} s; {:.1} MB served){}",
                r.mbps(),
                r.lines_per_sec(),
                r.secs,
                served_bytes as f64 / 1e6,
                r.note
            );
            results.entry(side).or_default().push(r);
        }
    }

    if only.is_some() {
        return;
    }
    println!(
        "\ncapture rate over {rounds} alternating rounds (input MB/s of the step's log; min / median / max)"
    );
    let summary = |side: &str| -> (Stat, Stat) {
        let rs = &results[side];
        (Stat::of(rs.iter().map(Round::mbps)), Stat::of(rs.iter().map(Round::lines_per_sec)))
    };
    let (k_mb, k_ln) = summary("kubectl");
    let (b_mb, b_ln) = summary("bobbin");
    let (r_mb, r_ln) = summary("raw");
    for (name, mb, ln) in [
        ("kubectl logs -f", &k_mb, &k_ln),
        ("bobbin follower", &b_mb, &b_ln),
        ("raw body copy", &r_mb, &r_ln),
    ] {
        println!(
            "{name:<16} {:>7.1} / {:>7.1} / {:>7.1} MB/s   {:>9.0} / {:>9.0} / {:>9.0} lines/s",
            mb.min, mb.median, mb.max, ln.min, ln.median, ln.max
        );
    }
    println!(
        "bobbin / kubectl (medians): {:.2}x   bobbin / raw (medians): {:.2}x",
        b_mb.median / k_mb.median,
        b_mb.median / r_mb.median
    );
}

struct Stat {
    min: f64,
    median: f64,
    max: f64,
}

impl Stat {
    fn of(values: impl Iterator<Item = f64>) -> Stat {
        let mut v: Vec<f64> = values.collect();
        v.sort_by(f64::total_cmp);
        Stat { min: v[0], median: v[v.len() / 2], max: v[v.len() - 1] }
    }
}

struct Round {
    /// Input bytes of the step's log consumed (the body once).
    bytes: u64,
    /// Lines delivered: kubelet lines (kubectl, raw) or data lines written (bobbin).
    lines: u64,
    secs: f64,
    note: String,
}

impl Round {
    fn mbps(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.secs
    }
    fn lines_per_sec(&self) -> f64 {
        self.lines as f64 / self.secs
    }
}

// ---------------------------------------------------------------------------------------------
// The workload.

struct Workload {
    body: Bytes,
    /// Kubelet lines in the body.
    lines: u64,
    /// Data lines bobbin must write (over-long lines are split at `CAP`).
    data_lines: u64,
    /// Secret occurrences in the body (each is its own `***` after masking).
    secrets: u64,
    /// `(unix second, byte offset of its first line)` for every second that has lines.
    seconds: Vec<(i64, usize)>,
    first_second: i64,
    last_ts: jiff::Timestamp,
}

/// A small deterministic PRNG (xorshift64*), so every run serves the same bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

impl Workload {
    fn generate(target: usize) -> Workload {
        let words: &[&str] = &[
            "Compiling",
            "serde",
            "v1.0.228",
            "Downloaded",
            "tokio-1.48.0",
            "warning:",
            "unused",
            "variable:",
            "`builder`",
            "--> src/lib.rs:42:9",
            "test",
            "tests::capture::round_trip",
            "...",
            "ok",
            "FAILED",
            "npm WARN deprecated",
            "inflight@1.0.6:",
            "<div class=\"x\">",
            "&amp;",
            "'quoted'",
            "\ttabbed",
            "\x1b[32m",
            "\x1b[0m",
            "\x1b[1;31merror\x1b[0m",
            "/nix/store/8c5yxx0kq3y2v6y6-gcc-13.2.0/bin/gcc",
            "-O2",
            "-Wall",
            "[123/4567]",
            "Step 4/12 : RUN make -j8",
            "=>",
            "100%",
            "✓",
            "Ünïcödé",
        ];
        const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut out = Vec::with_capacity(target + 256 * 1024);
        let mut ts: jiff::Timestamp = "2026-11-21T12:00:00Z".parse().expect("base timestamp");
        let first_second = ts.as_second();
        let mut seconds: Vec<(i64, usize)> = Vec::new();
        let (mut lines, mut data_lines, mut secrets) = (0u64, 0u64, 0u64);
        while out.len() < target {
            let i = lines;
            ts += jiff::SignedDuration::from_nanos(150_000 + rng.below(100_000) as i64);
            if seconds.last().is_none_or(|&(s, _)| s != ts.as_second()) {
                seconds.push((ts.as_second(), out.len()));
            }
            out.extend_from_slice(go_time(ts).as_bytes());
            out.push(b' ');
            let start = out.len();
            if i % 65_536 == 65_535 {
                // A huge blob (minified bundle, base64 artifact): longer than bobbin's cap, so it
                // becomes several data lines.
                let len = 100 * 1024 + rng.below(4096) as usize;
                for _ in 0..len {
                    out.push(B64[rng.below(64) as usize]);
                }
                data_lines += len.div_ceil(CAP) as u64;
            } else if i % 4096 == 4095 {
                // A long line below the cap, with a secret in its middle.
                let len = 4096 + rng.below(24 * 1024) as usize;
                for k in 0..len {
                    if k == len / 2 {
                        out.push(b' ');
                        out.extend_from_slice(SECRETS[(i / 4096) as usize % SECRETS.len()].as_bytes());
                        out.push(b' ');
                        secrets += 1;
                    }
                    out.push(B64[rng.below(64) as usize]);
                }
                data_lines += 1;
            } else {
                let len = 50 + rng.below(120) as usize;
                while out.len() - start < len {
                    out.extend_from_slice(words[rng.below(words.len() as u64) as usize].as_bytes());
                    out.push(b' ');
                }
                if i % 97 == 0 {
                    out.extend_from_slice(b"token=");
                    out.extend_from_slice(SECRETS[(i / 97) as usize % SECRETS.len()].as_bytes());
                    out.extend_from_slice(b" done");
                    secrets += 1;
                }
                data_lines += 1;
            }
            out.push(b'\n');
            lines += 1;
        }
        Workload { body: Bytes::from(out), lines, data_lines, secrets, seconds, first_second, last_ts: ts }
    }

    /// The body from the first line at or after `since` (what the API server sends for
    /// `sinceTime`).
    fn since(&self, since: Option<jiff::Timestamp>) -> Bytes {
        let Some(since) = since else { return self.body.clone() };
        let i = self.seconds.partition_point(|&(s, _)| s < since.as_second());
        match self.seconds.get(i) {
            Some(&(_, offset)) => self.body.slice(offset..),
            None => Bytes::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The API server.

struct Served {
    work: Arc<Workload>,
    log_requests: AtomicU64,
    log_bytes: AtomicU64,
}

type Shared = Arc<Served>;

fn router(state: Shared) -> Router {
    Router::new()
        .route("/apis/tekton.dev/v1/namespaces/{ns}/taskruns", get(list_taskruns))
        .route("/apis/tekton.dev/v1/namespaces/{ns}/taskruns/{name}", get(get_taskrun))
        .route("/api/v1/namespaces/{ns}/pods/{name}", get(get_pod))
        .route("/api/v1/namespaces/{ns}/pods/{name}/log", get(pod_log))
        .route("/api/v1/namespaces/{ns}/secrets/{name}", get(get_secret))
        .fallback(|| async { not_found() })
        .with_state(state)
}

fn json_ok(v: Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

fn not_found() -> Response {
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "not found", "reason": "NotFound", "code": 404});
    (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "application/json")], status.to_string()).into_response()
}

/// A finished per-step TaskRun shaped like the recorded fixtures
/// (`/work/shared/fixtures/tekton/per-step-success.jsonl`).
fn taskrun() -> Value {
    json!({
        "apiVersion": "tekton.dev/v1", "kind": "TaskRun",
        "metadata": {"name": TASKRUN, "namespace": NS, "uid": "3ea6949c-708b-44fe-8baf-191b610f2ae3",
            "labels": {"tekton.dev/pipelineRun": PIPELINE_RUN, "tekton.dev/pipelineTask": TASK,
                "app.kubernetes.io/managed-by": "bobbin"}},
        "spec": {"taskSpec": {"steps": [{"name": "run", "image": "alpine:3.20",
            "command": ["bash", "-c"], "args": ["make -j8"]}]}},
        "status": {
            "conditions": [{"type": "Succeeded", "status": "True", "reason": "Succeeded",
                "lastTransitionTime": "2026-11-21T13:00:00Z"}],
            "podName": POD, "startTime": "2026-11-21T11:59:59Z", "completionTime": "2026-11-21T13:00:00Z",
            "steps": [{"name": "run", "container": CONTAINER, "terminationReason": "Completed",
                "terminated": {"exitCode": 0, "reason": "Completed",
                    "startedAt": "2026-11-21T11:59:59Z", "finishedAt": "2026-11-21T13:00:00Z"}}]
        }
    })
}

async fn list_taskruns(Query(q): Query<HashMap<String, String>>) -> Response {
    let wanted = format!("tekton.dev/pipelineRun={PIPELINE_RUN}");
    let items = if q.get("labelSelector") == Some(&wanted) { vec![taskrun()] } else { Vec::new() };
    json_ok(json!({"apiVersion": "tekton.dev/v1", "kind": "TaskRunList",
        "metadata": {"resourceVersion": "1"}, "items": items}))
}

async fn get_taskrun(Path((_ns, name)): Path<(String, String)>) -> Response {
    if name == TASKRUN { json_ok(taskrun()) } else { not_found() }
}

async fn get_pod(Path((ns, name)): Path<(String, String)>) -> Response {
    if ns != NS || name != POD {
        return not_found();
    }
    json_ok(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": POD, "namespace": NS, "uid": "0b7d1f0e-8f0e-4d59-a1a4-3c5b2f7e9a10",
            "labels": {"tekton.dev/taskRun": TASKRUN, "tekton.dev/pipelineRun": PIPELINE_RUN}},
        "spec": {"containers": [{"name": CONTAINER, "image": "alpine:3.20"}]},
        "status": {"phase": "Succeeded", "containerStatuses": [{
            "name": CONTAINER, "image": "alpine:3.20", "imageID": "fake://alpine:3.20",
            "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                "startedAt": "2026-11-21T11:59:59Z", "finishedAt": "2026-11-21T13:00:00Z",
                "message": "[{\"key\":\"StartedAt\",\"value\":\"2026-11-21T11:59:59.900Z\",\"type\":3}]"}}
        }]}
    }))
}

async fn get_secret(Path((ns, name)): Path<(String, String)>) -> Response {
    use base64::Engine as _;
    if ns != NS || name != SECRET {
        return not_found();
    }
    let data: serde_json::Map<String, Value> = SECRETS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (format!("TOKEN_{i}"), Value::String(base64::engine::general_purpose::STANDARD.encode(s)))
        })
        .collect();
    json_ok(json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": SECRET, "namespace": NS}, "data": data}))
}

async fn pod_log(
    State(st): State<Shared>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if ns != NS || name != POD || q.get("container").map(String::as_str) != Some(CONTAINER) {
        return not_found();
    }
    if q.get("timestamps").map(String::as_str) != Some("true") {
        return (StatusCode::BAD_REQUEST, "the bench serves timestamps=true only").into_response();
    }
    st.log_requests.fetch_add(1, Ordering::Relaxed);
    let since = q.get("sinceTime").and_then(|s| s.parse::<jiff::Timestamp>().ok());
    let body = st.work.since(since);
    let stream = futures::stream::unfold((body, st), |(rest, st)| async move {
        if rest.is_empty() {
            return None;
        }
        let mut rest = rest;
        let frame = rest.split_to(rest.len().min(FRAME));
        st.log_bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
        Some((Ok::<_, std::io::Error>(frame), (rest, st)))
    });
    ([(header::CONTENT_TYPE, "text/plain")], Body::from_stream(stream)).into_response()
}

// ---------------------------------------------------------------------------------------------
// The clients.

fn client(url: &str) -> kube::Client {
    let mut config = kube::Config::new(url.parse().expect("server url"));
    config.default_namespace = NS.into();
    kube::Client::try_from(config).expect("kube client")
}

fn follow_params() -> LogParams {
    LogParams { container: Some(CONTAINER.into()), follow: true, timestamps: true, ..LogParams::default() }
}

fn dev_null() -> std::fs::File {
    std::fs::OpenOptions::new().write(true).open("/dev/null").expect("/dev/null")
}

/// `kubectl logs -f`: read up to each newline, write that line to (unbuffered) stdout.
async fn kubectl_round(url: &str, work: &Workload) -> Round {
    let pods: Api<Pod> = Api::namespaced(client(url), NS);
    let mut out = dev_null();
    let started = Instant::now();
    let reader = pods.log_stream(POD, &follow_params()).await.expect("log stream");
    let mut reader = std::pin::pin!(reader);
    let (mut bytes, mut lines) = (0u64, 0u64);
    let mut line = Vec::with_capacity(64 * 1024);
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).await.expect("read");
        if n == 0 {
            break;
        }
        out.write_all(&line).expect("write");
        bytes += n as u64;
        lines += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(bytes, work.body.len() as u64, "kubectl read the whole body");
    assert_eq!(lines, work.lines, "kubectl saw every line");
    Round { bytes, lines, secs, note: String::new() }
}

/// The transport's ceiling: bulk copy of the body.
async fn raw_round(url: &str, work: &Workload) -> Round {
    let pods: Api<Pod> = Api::namespaced(client(url), NS);
    let mut out = dev_null();
    let started = Instant::now();
    let reader = pods.log_stream(POD, &follow_params()).await.expect("log stream");
    let mut reader = std::pin::pin!(reader);
    let mut buf = vec![0u8; 64 * 1024];
    let mut bytes = 0u64;
    loop {
        let n = reader.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).expect("write");
        bytes += n as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(bytes, work.body.len() as u64, "raw read the whole body");
    Round { bytes, lines: work.lines, secs, note: String::new() }
}

/// The real follower, end to end, then verification of the file it wrote.
async fn bobbin_round(url: &str, work: &Workload, round: usize) -> Round {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("logs");
    std::fs::create_dir_all(&dir).expect("log dir");
    let store = Store::open(tmp.path().join("spindle.db")).expect("store");
    let settings = LogSettings::new(&dir);
    let hub = LogHub::new(settings.viewer_buffer);
    let target = RunTarget {
        id: WorkflowId::new("knot1.tangled.sh", "3m734z2gwll22", "capture.yml"),
        run_uid: format!("uid-{round}"),
        namespace: NS.into(),
        pipeline_run: PIPELINE_RUN.into(),
        steps: vec![LoggedStep {
            log_id: 1,
            name: "Build".into(),
            kind: 1,
            command: "make -j8".into(),
            task: TASK.into(),
        }],
        secret_name: Some(SECRET.into()),
    };
    let path = dir.join(target.log_file());
    let follower = Follower::new(client(url), store.clone(), hub.clone(), settings, target);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(600), follower.run())
        .await
        .expect("follower finishes")
        .expect("follower succeeds");
    let secs = started.elapsed().as_secs_f64();

    let written = std::fs::read(&path).expect("read the log file");
    let data_lines = verify(&written, work);
    let note = format!("; verified {data_lines} data lines, {:.1} MB written", written.len() as f64 / 1e6);
    drop(written);
    drop(store);
    Round { bytes: work.body.len() as u64, lines: data_lines, secs, note }
}

/// Exactly the expected data lines, one start and one end line, every secret masked and none
/// left (raw or as JSON escapes it). Returns the data line count.
fn verify(file: &[u8], work: &Workload) -> u64 {
    let (mut data, mut start, mut end) = (0u64, 0u64, 0u64);
    for line in file.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        if line.starts_with(br#"{"kind":"data","#) {
            data += 1;
        } else if line.starts_with(br#"{"kind":"control","#) {
            let s = memchr::memmem::find(line, br#""step_status":"start""#).is_some();
            let e = memchr::memmem::find(line, br#""step_status":"end""#).is_some();
            start += u64::from(s);
            end += u64::from(e);
        } else {
            panic!("unexpected line: {}", String::from_utf8_lossy(&line[..line.len().min(200)]));
        }
    }
    assert_eq!(data, work.data_lines, "data lines");
    assert_eq!((start, end), (1, 1), "control lines");
    assert_eq!(memchr::memmem::find_iter(file, b"***").count() as u64, work.secrets, "masked secrets");
    for s in SECRETS {
        let mut escaped = Vec::new();
        write_json_string(&mut escaped, s);
        let escaped = &escaped[1..escaped.len() - 1];
        for needle in [s.as_bytes(), escaped] {
            assert!(memchr::memmem::find(file, needle).is_none(), "secret {s:?} leaked");
        }
    }
    data
}
