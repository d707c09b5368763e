//! Test doubles at intake's edges: a scripted WebSocket server (fake knot, fake Jetstream), a
//! mocked Kubernetes API server, and a paged collaborator source.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use http::{Request, Response};
use kube::client::Body;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request as WsRequest, Response as WsResponse};

use super::ingest::{CollaboratorPage, CollaboratorRecord, CollaboratorSource};
use super::ws::Timing;

pub(crate) fn fixture(path: &str) -> String {
    let full = format!("{}/../shared/spec/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{full}: {e}"))
}

/// A Jetstream fixture as the compact one-line frame Jetstream sends.
pub(crate) fn jetstream_frame(name: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&fixture(&format!("jetstream/{name}"))).expect("fixture is JSON");
    v.to_string()
}

/// Timing for tests: fast reconnects, short deadline.
pub(crate) fn fast_timing() -> Timing {
    Timing {
        connect_timeout: Duration::from_secs(2),
        read_deadline: Duration::from_millis(400),
        ping_every: Duration::from_millis(100),
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
    }
}

/// What the fake server does on one connection, in order.
#[derive(Debug, Clone)]
pub(crate) enum Act {
    Text(String),
    Binary,
    /// A clean close frame.
    Close,
    /// Drop the TCP connection without a close frame.
    Drop,
    /// Stop reading and writing (no pongs): a half-open connection.
    Stall,
}

/// A WebSocket server on 127.0.0.1 that plays one script per accepted connection; after its
/// script (or when scripts run out) a connection stays open and answers pings. `{HOST}` in a text
/// frame becomes the server's own `127.0.0.1:<port>` (a knot's event-source key).
pub(crate) struct FakeWs {
    pub addr: std::net::SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    /// Connections the client closed after their script ran.
    closed: Arc<std::sync::atomic::AtomicUsize>,
}

impl FakeWs {
    pub async fn start(scripts: Vec<Vec<Act>>) -> FakeWs {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let scripts = Arc::new(Mutex::new(VecDeque::from(scripts)));
        let log = requests.clone();
        let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let closed_count = closed.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let script = scripts.lock().expect("lock").pop_front().unwrap_or_default();
                let log = log.clone();
                let closed = closed_count.clone();
                let host = addr.to_string();
                tokio::spawn(async move {
                    #[allow(clippy::result_large_err)] // the signature tungstenite's callback must have
                    let callback = |req: &WsRequest, resp: WsResponse| {
                        log.lock().expect("lock").push(req.uri().to_string());
                        Ok(resp)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
                        return;
                    };
                    for act in script {
                        match act {
                            Act::Text(t) => {
                                if ws.send(Message::Text(t.replace("{HOST}", &host).into())).await.is_err() {
                                    return;
                                }
                            }
                            Act::Binary => {
                                let _ = ws.send(Message::Binary(vec![1, 2, 3].into())).await;
                            }
                            Act::Close => {
                                let _ = ws.close(None).await;
                                return;
                            }
                            Act::Drop => return,
                            Act::Stall => {
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                                return;
                            }
                        }
                    }
                    while let Some(Ok(_)) = ws.next().await {}
                    closed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        });
        FakeWs { addr, requests, closed }
    }

    pub fn closed(&self) -> usize {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `127.0.0.1:<port>`: a knot source key.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Request URIs (path and query) of every connection so far.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("lock").clone()
    }
}

/// One request the mocked API server saw.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Seen {
    pub method: String,
    pub path: String,
    pub body: serde_json::Value,
}

/// A mocked Kubernetes API server: POSTs create (201, echoing the body), a repeated name is 409
/// AlreadyExists, and queued failure codes are answered first.
#[derive(Clone)]
pub(crate) struct MockKube {
    pub client: kube::Client,
    seen: Arc<Mutex<Vec<Seen>>>,
    failures: Arc<Mutex<VecDeque<u16>>>,
    /// Names that exist on the "server" (survive a simulated bobbin restart).
    existing: Arc<Mutex<HashSet<String>>>,
}

impl MockKube {
    pub fn start() -> MockKube {
        Self::with_existing(Arc::new(Mutex::new(HashSet::new())))
    }

    /// A fresh client talking to the same cluster state (for restart tests).
    pub fn restart(&self) -> MockKube {
        let m = Self::with_existing(self.existing.clone());
        MockKube { seen: self.seen.clone(), ..m }
    }

    fn with_existing(existing: Arc<Mutex<HashSet<String>>>) -> MockKube {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(VecDeque::new()));
        let (log, fail, names) = (seen.clone(), failures.clone(), existing.clone());
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let method = req.method().to_string();
                let path = req.uri().to_string();
                let bytes = req.into_body().collect_bytes().await.expect("body");
                let body: serde_json::Value = if bytes.is_empty() {
                    serde_json::Value::Null
                } else {
                    serde_json::from_slice(&bytes).expect("json body")
                };
                log.lock().expect("lock").push(Seen { method, path, body: body.clone() });
                let fail_code = fail.lock().expect("lock").pop_front();
                let name = body["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                let (code, out) = match fail_code {
                    Some(code) => (code, status_body(code, "Injected", "injected failure")),
                    None if !names.lock().expect("lock").insert(name.clone()) => (
                        409,
                        status_body(409, "AlreadyExists", &format!("workflowruns \"{name}\" already exists")),
                    ),
                    None => (201, body),
                };
                let resp = Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&out).expect("json")))
                    .expect("response");
                send.send_response(resp);
            }
        });
        MockKube { client: kube::Client::new(service, "default"), seen, failures, existing }
    }

    /// Answer the next requests with these status codes, in order.
    pub fn fail_next(&self, codes: &[u16]) {
        self.failures.lock().expect("lock").extend(codes.iter().copied());
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    /// Names of every WorkflowRun POSTed, in order (repeats included).
    pub fn posted_names(&self) -> Vec<String> {
        self.seen()
            .iter()
            .filter(|s| s.method == "POST")
            .map(|s| s.body["metadata"]["name"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    pub fn existing(&self) -> Vec<String> {
        let mut v: Vec<String> = self.existing.lock().expect("lock").iter().cloned().collect();
        v.sort();
        v
    }

    pub fn api(&self, namespace: &str) -> kube::Api<crate::crd::WorkflowRun> {
        kube::Api::namespaced(self.client.clone(), namespace)
    }
}

fn status_body(code: u16, reason: &str, message: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code
    })
}

/// Collaborator records served page by page (cursor = page index), per owner.
#[derive(Default)]
pub(crate) struct FakeCollaborators {
    pub pages: BTreeMap<String, Vec<Vec<CollaboratorRecord>>>,
    /// Every call fails (the PDS is unreachable) while set.
    pub fail: std::sync::atomic::AtomicBool,
    pub calls: Mutex<Vec<(String, Option<String>)>>,
}

impl CollaboratorSource for FakeCollaborators {
    fn list_page<'a>(
        &'a self,
        owner: &'a str,
        cursor: Option<&'a str>,
    ) -> BoxFuture<'a, Result<CollaboratorPage, String>> {
        Box::pin(async move {
            self.calls.lock().expect("lock").push((owner.to_owned(), cursor.map(str::to_owned)));
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err("PDS unreachable".into());
            }
            let pages = self.pages.get(owner).cloned().unwrap_or_default();
            let i: usize = cursor.map(|c| c.parse().expect("numeric cursor")).unwrap_or(0);
            let records = pages.get(i).cloned().unwrap_or_default();
            let cursor = (i + 1 < pages.len()).then(|| (i + 1).to_string());
            Ok(CollaboratorPage { records, cursor })
        })
    }
}

pub(crate) fn collab(rkey: &str, subject: &str, repo: &str) -> CollaboratorRecord {
    CollaboratorRecord { rkey: rkey.into(), subject: subject.into(), repo: repo.into() }
}

/// Poll `check` until it holds or `secs` pass.
pub(crate) async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}
