//! A mocked Kubernetes API server for log tests: `tower_test::mock::pair` behind a real
//! `kube::Client`, answering from the recorded Tekton fixtures (the last state of every
//! PipelineRun, TaskRun and Pod; deleted pods are 404) and serving `pods/log` from the recorded
//! `kubectl logs --timestamps` output, chunked, filtered by `sinceTime`, and optionally cut off
//! (broken connection) or stalled (idle stream) to exercise reconnects.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::stream::BoxStream;
use http::{Request, Response};
use hyper::body::{Bytes, Frame};
use serde_json::{Value, json};

use crate::crd::{WorkflowRun, WorkflowRunStatus};

pub type TestBody = http_body_util::StreamBody<BoxStream<'static, Result<Frame<Bytes>, std::io::Error>>>;

/// How one `pods/log` request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogMode {
    /// The whole (filtered) log, then EOF.
    Whole,
    /// This many bytes, then a broken connection.
    BreakAfter(usize),
    /// This many bytes, then silence forever (an idle stream).
    StallAfter(usize),
}

#[derive(Default)]
pub struct State {
    pub namespace: String,
    pub objects: BTreeMap<(String, String), Value>,
    pub logs: BTreeMap<(String, String), String>,
    /// Per (pod, container): modes for the next requests (then `Whole`).
    pub modes: BTreeMap<(String, String), VecDeque<LogMode>>,
    /// Per (pod, container): after this many log requests, replace the pod with this object.
    pub pod_after: BTreeMap<(String, String), (usize, Value)>,
    pub log_requests: BTreeMap<(String, String), usize>,
    /// Every request, as `GET path?query`.
    pub requests: Vec<String>,
    /// Body chunk size.
    pub chunk: usize,
}

#[derive(Clone)]
pub struct FakeCluster {
    pub state: Arc<Mutex<State>>,
    pub pipeline_run: String,
}

fn fixtures_dir() -> String {
    format!("{}/../shared/fixtures/tekton", env!("CARGO_MANIFEST_DIR"))
}

impl FakeCluster {
    /// The final state of a recorded scenario.
    pub fn scenario(name: &str) -> Self {
        let text = std::fs::read_to_string(format!("{}/{name}.jsonl", fixtures_dir())).expect("scenario");
        let mut objects: BTreeMap<(String, String), Value> = BTreeMap::new();
        let mut namespace = String::new();
        let mut pipeline_run = String::new();
        for line in text.lines() {
            let event: Value = serde_json::from_str(line).expect("event");
            let kind = event["kind"].as_str().expect("kind").to_owned();
            let object = event["object"].clone();
            let obj_name = object["metadata"]["name"].as_str().expect("name").to_owned();
            namespace = object["metadata"]["namespace"].as_str().unwrap_or("fixtures").to_owned();
            if kind == "PipelineRun" {
                pipeline_run = obj_name.clone();
            }
            if event["type"] == "DELETED" {
                objects.remove(&(kind, obj_name));
            } else {
                objects.insert((kind, obj_name), object);
            }
        }
        let mut logs = BTreeMap::new();
        for entry in std::fs::read_dir(format!("{}/pod-logs", fixtures_dir())).expect("pod-logs") {
            let path = entry.expect("entry").path();
            let file = path.file_name().and_then(|f| f.to_str()).expect("name").to_owned();
            let Some(rest) = file.strip_prefix(&format!("{name}.")) else { continue };
            let rest = rest.strip_suffix(".log").expect(".log");
            let (pod_suffix, container) = rest.split_once('.').expect("pod.container");
            let text = std::fs::read_to_string(&path).expect("log");
            logs.insert((format!("{pipeline_run}-{pod_suffix}"), container.to_owned()), text);
        }
        FakeCluster {
            state: Arc::new(Mutex::new(State { namespace, objects, logs, chunk: 7, ..State::default() })),
            pipeline_run,
        }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake cluster lock")
    }

    pub fn namespace(&self) -> String {
        self.lock().namespace.clone()
    }

    /// A kube client talking to this fake.
    pub fn client(&self) -> kube::Client {
        let (service, mut handle) =
            tower_test::mock::pair::<Request<kube::client::Body>, Response<TestBody>>();
        let fake = self.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let response = fake.respond(request);
                send.send_response(response);
            }
        });
        let ns = self.namespace();
        kube::Client::new(service, ns)
    }

    /// Log requests so far for (pod, container), as `path?query` strings.
    pub fn log_requests(&self, pod: &str, container: &str) -> Vec<String> {
        let (path, param) = (format!("/pods/{pod}/log?"), format!("container={container}&"));
        self.lock().requests.iter().filter(|r| r.contains(&path) && r.contains(&param)).cloned().collect()
    }

    fn respond(&self, request: Request<kube::client::Body>) -> Response<TestBody> {
        let uri = request.uri().clone();
        let path = uri.path().to_owned();
        let query = uri.query().unwrap_or("").to_owned();
        let mut st = self.lock();
        st.requests.push(format!("{} {}?{}", request.method(), path, query));
        let ns = st.namespace.clone();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let params = parse_query(&query);
        // /apis/tekton.dev/v1/namespaces/{ns}/{plural}[/{name}]
        if parts.len() >= 6 && parts[0] == "apis" && parts[3] == "namespaces" {
            let kind = match parts[5] {
                "taskruns" => "TaskRun",
                "pipelineruns" => "PipelineRun",
                "workflowruns" => "WorkflowRun",
                _ => return not_found(),
            };
            if parts.len() == 6 {
                let selector = params.get("labelSelector").cloned().unwrap_or_default();
                let (lk, lv) = selector.split_once('=').unwrap_or(("", ""));
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|((k, _), o)| k == kind && (lk.is_empty() || o["metadata"]["labels"][lk] == lv))
                    .map(|(_, o)| o.clone())
                    .collect();
                return json_response(
                    200,
                    json!({"apiVersion": format!("{}/{}", parts[1], parts[2]), "kind": format!("{kind}List"), "metadata": {"resourceVersion": "1"}, "items": items}),
                );
            }
            return match st.objects.get(&(kind.to_owned(), parts[6].to_owned())) {
                Some(o) => json_response(200, o.clone()),
                None => not_found(),
            };
        }
        // /api/v1/namespaces/{ns}/{pods|secrets}/{name}[/log]
        if parts.len() >= 6 && parts[0] == "api" && parts[3] == ns {
            let name = parts[5].to_owned();
            match (parts[4], parts.get(6)) {
                ("secrets", None) => {
                    return match st.objects.get(&("Secret".to_owned(), name)) {
                        Some(o) => json_response(200, o.clone()),
                        None => not_found(),
                    };
                }
                ("pods", None) => {
                    return match st.objects.get(&("Pod".to_owned(), name)) {
                        Some(o) => json_response(200, o.clone()),
                        None => not_found(),
                    };
                }
                ("pods", Some(&"log")) => {
                    if !st.objects.contains_key(&("Pod".to_owned(), name.clone())) {
                        return not_found();
                    }
                    let container = params.get("container").cloned().unwrap_or_default();
                    let key = (name.clone(), container.clone());
                    let n = {
                        let c = st.log_requests.entry(key.clone()).or_insert(0);
                        *c += 1;
                        *c
                    };
                    if let Some((after, pod)) = st.pod_after.get(&key).cloned()
                        && n >= after
                    {
                        st.objects.insert(("Pod".to_owned(), name.clone()), pod);
                        st.pod_after.remove(&key);
                    }
                    let Some(text) = st.logs.get(&key).cloned() else {
                        return stream_response(Vec::new(), LogMode::Whole, st.chunk);
                    };
                    let since: Option<jiff::Timestamp> = params.get("sinceTime").and_then(|s| s.parse().ok());
                    let mut body = Vec::new();
                    for line in text.split_inclusive('\n') {
                        let ts: Option<jiff::Timestamp> =
                            line.split_once(' ').and_then(|(t, _)| t.parse().ok());
                        if let (Some(since), Some(ts)) = (since, ts)
                            && ts < since
                        {
                            continue;
                        }
                        body.extend_from_slice(line.as_bytes());
                    }
                    let mode = st.modes.get_mut(&key).and_then(VecDeque::pop_front).unwrap_or(LogMode::Whole);
                    return stream_response(body, mode, st.chunk);
                }
                _ => {}
            }
        }
        not_found()
    }
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json_response(status: u16, body: Value) -> Response<TestBody> {
    let bytes = Bytes::from(serde_json::to_vec(&body).expect("json"));
    let stream: BoxStream<'static, Result<Frame<Bytes>, std::io::Error>> =
        futures::stream::iter(vec![Ok(Frame::data(bytes))]).boxed();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(http_body_util::StreamBody::new(stream))
        .expect("response")
}

fn not_found() -> Response<TestBody> {
    json_response(
        404,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "not found", "reason": "NotFound", "code": 404}),
    )
}

fn stream_response(body: Vec<u8>, mode: LogMode, chunk: usize) -> Response<TestBody> {
    let limit = match mode {
        LogMode::Whole => body.len(),
        LogMode::BreakAfter(n) | LogMode::StallAfter(n) => n.min(body.len()),
    };
    let frames: Vec<Result<Frame<Bytes>, std::io::Error>> =
        body[..limit].chunks(chunk.max(1)).map(|c| Ok(Frame::data(Bytes::copy_from_slice(c)))).collect();
    let head = futures::stream::iter(frames);
    let stream: BoxStream<'static, Result<Frame<Bytes>, std::io::Error>> = match mode {
        LogMode::Whole => head.boxed(),
        LogMode::BreakAfter(_) => {
            head.chain(futures::stream::iter(vec![Err(std::io::Error::other("connection reset"))])).boxed()
        }
        LogMode::StallAfter(_) => head.chain(futures::stream::pending()).boxed(),
    };
    Response::builder()
        .status(200)
        .header("content-type", "text/plain")
        .body(http_body_util::StreamBody::new(stream))
        .expect("response")
}

/// A WorkflowRun like the one the recorded per-step scenarios ran (clone, then the user steps).
pub fn workflow_run(namespace: &str, uid: &str, steps: &[(&str, &str)]) -> WorkflowRun {
    WorkflowRun::test("knot1-run")
        .in_namespace(namespace)
        .with_uid(uid)
        .with_commands(steps)
        .with_secret("run-secrets")
        .with_status(WorkflowRunStatus::default())
}
