//! A scripted Kubernetes API server for tests (`tower_test::mock::pair` behind a real
//! `kube::Client`): each scenario lists the exact requests it expects, in order, with method,
//! path and query, content type and body, and the response to give. A missing, extra or different
//! request fails the test.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::Value;
use tokio::sync::oneshot;

/// One expected request and its response.
pub struct Exchange {
    method: Method,
    path: String,
    content_type: Option<String>,
    body: Option<Value>,
    status: u16,
    response: Value,
}

impl Exchange {
    fn new(method: Method, path: &str) -> Self {
        Exchange {
            method,
            path: path.into(),
            content_type: None,
            body: None,
            status: 200,
            response: Value::Object(Default::default()),
        }
    }

    pub fn get(path: &str) -> Self {
        Self::new(Method::GET, path)
    }
    pub fn post(path: &str) -> Self {
        Self::new(Method::POST, path)
    }
    pub fn patch(path: &str) -> Self {
        Self::new(Method::PATCH, path)
    }
    pub fn put(path: &str) -> Self {
        Self::new(Method::PUT, path)
    }
    pub fn delete(path: &str) -> Self {
        Self::new(Method::DELETE, path)
    }

    pub fn content_type(mut self, ct: &str) -> Self {
        self.content_type = Some(ct.into());
        self
    }

    /// The request body must contain every field given here, with these values (objects key by
    /// key, arrays element by element with the same length, scalars exactly).
    pub fn body(mut self, body: Value) -> Self {
        self.body = Some(body);
        self
    }

    pub fn respond(mut self, status: u16, body: Value) -> Self {
        self.status = status;
        self.response = body;
        self
    }

    /// A Kubernetes `Status` error response.
    pub fn fail(self, code: u16, reason: &str) -> Self {
        let message = format!("{reason} (scripted)");
        self.respond(
            code,
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}),
        )
    }
}

/// Does `actual` contain everything in `expected`?
pub fn contains(actual: &Value, expected: &Value) -> bool {
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => {
            e.iter().all(|(k, ev)| a.get(k).is_some_and(|av| contains(av, ev)))
        }
        (Value::Array(a), Value::Array(e)) => {
            a.len() == e.len() && a.iter().zip(e).all(|(a, e)| contains(a, e))
        }
        (a, e) => a == e,
    }
}

/// The running scripted server.
pub struct ApiServer {
    finished: oneshot::Receiver<()>,
    task: tokio::task::JoinHandle<()>,
    unexpected: Arc<Mutex<Vec<String>>>,
}

impl ApiServer {
    /// A client talking to a server that expects exactly `script`.
    pub fn new(script: Vec<Exchange>) -> (Client, ApiServer) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let (tx, finished) = oneshot::channel();
        let unexpected = Arc::new(Mutex::new(Vec::new()));
        let extra = unexpected.clone();
        let task = tokio::spawn(async move {
            for (i, ex) in script.into_iter().enumerate() {
                let Some((req, send)) = handle.next_request().await else {
                    panic!("request #{i} ({} {}) never came", ex.method, ex.path);
                };
                let method = req.method().clone();
                let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
                let ct = req.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
                let bytes = req.into_body().collect_bytes().await.expect("request body");
                assert_eq!((&method, path.as_str()), (&ex.method, ex.path.as_str()), "request #{i}");
                if let Some(want) = &ex.content_type {
                    assert_eq!(ct.as_deref(), Some(want.as_str()), "content type of request #{i} {path}");
                }
                if let Some(want) = &ex.body {
                    let got: Value = serde_json::from_slice(&bytes).expect("json request body");
                    assert!(
                        contains(&got, want),
                        "body of request #{i} {method} {path}:\n got {got:#}\nwant {want:#}"
                    );
                }
                let response = Response::builder()
                    .status(ex.status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&ex.response).expect("json")))
                    .expect("response");
                send.send_response(response);
            }
            let _ = tx.send(());
            while let Some((req, send)) = handle.next_request().await {
                extra.lock().expect("lock").push(format!("{} {}", req.method(), req.uri()));
                send.send_response(
                    Response::builder().status(500).body(Body::from(b"{}".to_vec())).expect("response"),
                );
            }
        });
        (client, ApiServer { finished, task, unexpected })
    }

    /// Wait (at most 5 s) until every scripted request came, and check nothing else did.
    pub async fn done(self) {
        match tokio::time::timeout(Duration::from_secs(5), self.finished).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => match self.task.await {
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                other => panic!("scripted server stopped: {other:?}"),
            },
            Err(_) => panic!("timed out waiting for the scripted requests"),
        }
        let extra = self.unexpected.lock().expect("lock").clone();
        assert!(extra.is_empty(), "unexpected requests: {extra:?}");
    }
}
