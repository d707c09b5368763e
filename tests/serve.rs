//! `bobbin serve` as a process: configuration errors, startup checks, and a full start-lead-stop
//! cycle against a fake Kubernetes API server reached through a real KUBECONFIG.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

const NAMESPACE: &str = "ci";
const OWNER: &str = "did:plc:hbrpoigf3cbfnobm2o4rak3v";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ci/leases";

/// What the fake API server answers and remembers.
#[derive(Default)]
struct Cluster {
    tekton: bool,
    lease: Option<Value>,
    requests: Vec<String>,
}

type Shared = Arc<Mutex<Cluster>>;

fn json_response(status: StatusCode, body: Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("response")
}

fn not_found() -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
    )
}

fn resource_list(group_version: &str, names: &[&str]) -> Value {
    json!({
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
        "resources": names.iter().map(|n| json!({
            "name": n, "singularName": "", "namespaced": true, "kind": "X", "verbs": ["get", "list", "watch"]
        })).collect::<Vec<_>>(),
    })
}

/// A small API server: discovery, the namespace, one Lease kept in memory, empty lists, and
/// watches that stay open without events.
async fn api(State(cluster): State<Shared>, request: Request) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let query = request.uri().query().unwrap_or_default().to_owned();
    let body = axum::body::to_bytes(request.into_body(), 1 << 20).await.unwrap_or_default();
    let mut c = cluster.lock().expect("lock");
    c.requests.push(format!("{method} {path}?{query}"));
    match (method, path.as_str()) {
        (Method::GET, "/apis/tekton.dev/v1") if c.tekton => {
            json_response(StatusCode::OK, resource_list("tekton.dev/v1", &["pipelineruns", "taskruns"]))
        }
        (Method::GET, "/apis/tekton.dev/v1") => not_found(),
        (Method::GET, "/apis/bobbin.dev/v1alpha1") => {
            json_response(StatusCode::OK, resource_list("bobbin.dev/v1alpha1", &["workflowruns"]))
        }
        (Method::GET, "/api/v1/namespaces/ci") => json_response(
            StatusCode::OK,
            json!({"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": NAMESPACE}}),
        ),
        (Method::POST, LEASES) | (Method::PUT, _) if path.starts_with(LEASES) => {
            let mut lease: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            lease["metadata"]["resourceVersion"] = json!(c.requests.len().to_string());
            c.lease = Some(lease.clone());
            json_response(StatusCode::OK, lease)
        }
        (Method::GET, p) if p.starts_with(LEASES) => match &c.lease {
            Some(lease) => json_response(StatusCode::OK, lease.clone()),
            None => not_found(),
        },
        (Method::GET, _) if query.contains("watch=true") => {
            drop(c);
            let never = futures::stream::pending::<Result<Vec<u8>, std::io::Error>>();
            Response::builder()
                .header("content-type", "application/json")
                .body(Body::from_stream(never))
                .expect("watch response")
        }
        (Method::GET, p) if p.starts_with("/apis/") || p.starts_with("/api/") => json_response(
            StatusCode::OK,
            json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": []}),
        ),
        _ => not_found(),
    }
}

struct Env {
    _dir: tempfile::TempDir,
    cluster: Shared,
    listen: SocketAddr,
    vars: HashMap<&'static str, String>,
}

async fn setup(tekton: bool) -> Env {
    let cluster: Shared = Arc::new(Mutex::new(Cluster { tekton, ..Cluster::default() }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind api");
    let api_addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().fallback(api).with_state(cluster.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{api_addr}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {NAMESPACE}\n\
             current-context: fake\n"
        ),
    )
    .expect("kubeconfig");
    let listen = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        l.local_addr().expect("addr")
    };
    let vars: HashMap<&'static str, String> = [
        ("SPINDLE_SERVER_HOSTNAME", "spindle.example.com".to_owned()),
        ("SPINDLE_SERVER_OWNER", OWNER.to_owned()),
        ("SPINDLE_SERVER_LISTEN_ADDR", listen.to_string()),
        ("SPINDLE_SERVER_DB_PATH", dir.path().join("spindle.db").display().to_string()),
        ("SPINDLE_SERVER_LOG_DIR", dir.path().join("logs").display().to_string()),
        // Nothing listens there: intake keeps retrying with backoff, which is what a real outage does.
        ("SPINDLE_SERVER_JETSTREAM_ENDPOINT", "ws://127.0.0.1:9/subscribe".to_owned()),
        ("BOBBIN_CONFIG", String::new()),
        ("BOBBIN_SECRETS_KEY", "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=".to_owned()),
        ("KUBECONFIG", kubeconfig.display().to_string()),
        ("RUST_LOG", "warn,bobbin=debug".to_owned()),
    ]
    .into_iter()
    .collect();
    Env { _dir: dir, cluster, listen, vars }
}

fn spawn(env: &Env, overrides: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bobbin"));
    cmd.arg("serve").env_clear().envs(&env.vars).stdout(Stdio::null()).stderr(Stdio::piped());
    for (k, v) in overrides {
        cmd.env(k, v);
    }
    cmd.kill_on_drop(true).spawn().expect("spawn bobbin serve")
}

async fn finish(child: Child) -> (Option<i32>, String) {
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("bobbin exits in time")
        .expect("wait");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// One HTTP/1.0 GET over a plain socket: (status, body), or None while nothing listens yet.
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: spindle.example.com\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

async fn eventually<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    for _ in 0..300 {
        if let Some(v) = probe().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn invalid_configuration_exits_2_naming_the_variable() {
    let env = setup(true).await;
    let (code, stderr) = finish(spawn(&env, &[("SPINDLE_SERVER_MAX_JOB_COUNT", "zero")])).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("SPINDLE_SERVER_MAX_JOB_COUNT"), "{stderr}");
}

#[tokio::test]
async fn a_missing_secrets_key_and_a_cluster_without_tekton_stop_serve_with_clear_errors() {
    let env = setup(true).await;
    let (code, stderr) = finish(spawn(&env, &[("BOBBIN_SECRETS_KEY", "")])).await;
    assert_eq!(code, Some(2), "a missing key is a configuration error: {stderr}");
    assert!(env.cluster.lock().expect("lock").requests.is_empty(), "stopped before calling the cluster");
    assert!(stderr.contains("BOBBIN_SECRETS_KEY"), "{stderr}");

    let env = setup(false).await;
    let (code, stderr) = finish(spawn(&env, &[])).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("tekton.dev/v1"), "{stderr}");
}

#[tokio::test]
async fn serves_leads_and_stops_cleanly_on_sigterm() {
    let env = setup(true).await;
    let child = spawn(&env, &[]);
    let addr = env.listen;

    let (status, _) =
        eventually("/readyz", async || get(addr, "/readyz").await.filter(|(s, _)| *s == 200)).await;
    assert_eq!(status, 200);
    let holder = eventually("the Lease", async || {
        let c = env.cluster.lock().expect("lock");
        c.lease.as_ref().and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
    })
    .await;
    assert!(!holder.is_empty());

    let (status, motd) = get(addr, "/").await.expect("motd");
    assert_eq!(status, 200);
    assert!(motd.contains("This is a spindle server"), "{motd}");
    let (status, owner) = get(addr, "/xrpc/sh.tangled.owner").await.expect("owner");
    assert_eq!(
        (status, serde_json::from_str::<Value>(&owner).expect("json")),
        (200, json!({"owner": OWNER}))
    );
    let (_, metrics) = get(addr, "/metrics").await.expect("metrics");
    for family in ["bobbin_events_subscribers", "bobbin_http_requests", "bobbin_intake", "bobbin_log"] {
        assert!(metrics.contains(family), "{family} missing from /metrics");
    }
    // Leading means the controller and the log-follower resume are watching WorkflowRuns.
    eventually("a WorkflowRun watch", async || {
        let c = env.cluster.lock().expect("lock");
        c.requests.iter().any(|r| r.contains("/workflowruns?") && r.contains("watch=true")).then_some(())
    })
    .await;

    let pid = child.id().expect("pid").to_string();
    let killed = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(killed.success());
    let (code, stderr) = finish(child).await;
    assert_eq!(code, Some(0), "{stderr}");
    let lease = env.cluster.lock().expect("lock").lease.clone().expect("lease");
    assert!(lease["spec"]["holderIdentity"].is_null(), "the Lease is released on shutdown: {lease}");
}
