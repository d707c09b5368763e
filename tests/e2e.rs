//! Real-cluster test: `bobbin serve` against `KUBECONFIG` runs a WorkflowRun on Tekton and reports
//! it: WorkflowRun status, Kubernetes Events, the `/events` frames over a real WebSocket (live and
//! backfilled, spec §6.2) and the `/logs` frames (live and after the end, closed with 1000
//! `log stream complete`, spec §6.3). Run with `hack/e2e.sh` (a cluster with Tekton Pipelines and a
//! default StorageClass); it creates the namespace (`BOBBIN_E2E_NAMESPACE`) and removes it after.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bobbin::crd::{StepPhase, TriggerKind, TriggerSpec, WorkflowRun, WorkflowRunSpec};
use bobbin::model::pipeline::{ManualTrigger, TriggerRepo};
use bobbin::model::{CloneOptions, Engine, StatusFrame, StatusKind, Step};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// Kills `bobbin serve` when the test ends, however it ends.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn ready(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200")
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Deletes what a failed run would leave behind: kills nothing (that is [`Serve`]), but strips the
/// finalizers bobbin can no longer remove once it is gone (else the namespace never terminates),
/// and deletes the namespace if this test created it.
struct Cleanup {
    namespace: String,
    owned: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ns = self.namespace.as_str();
        if let Ok(out) =
            Command::new("kubectl").args(["-n", ns, "get", "workflowruns", "-o", "name"]).output()
        {
            for name in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = Command::new("kubectl")
                    .args([
                        "-n",
                        ns,
                        "patch",
                        name,
                        "--type=merge",
                        "-p",
                        r#"{"metadata":{"finalizers":null}}"#,
                    ])
                    .status();
            }
        }
        if self.owned {
            let _ = Command::new("kubectl").args(["delete", "namespace", ns, "--wait=false"]).status();
        }
    }
}

const KNOT: &str = "e2e.invalid";
const RKEY: &str = "3m734z2gwll22";
const WORKFLOW: &str = "e2e.yml";

/// Text frames of `/events?<query>` until `done` says the collected ones are enough (the stream
/// never closes by itself). `first` fires on the first frame.
async fn read_events(
    port: u16,
    query: &str,
    first: Option<tokio::sync::oneshot::Sender<()>>,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let url = format!("ws://127.0.0.1:{port}/events{query}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("connect /events");
    let mut first = first;
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(420);
    while !done(&frames) {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("{url}: timed out with {frames:#?}"))
            .unwrap_or_else(|| panic!("{url}: /events ended (it never closes by itself)"))
            .expect("read /events");
        match msg {
            Message::Text(t) => {
                frames.push(serde_json::from_str(t.as_str()).expect("an /events frame is JSON"));
                if let Some(tx) = first.take() {
                    let _ = tx.send(());
                }
            }
            Message::Close(c) => panic!("{url}: /events sent a close frame {c:?}; Go never does"),
            _ => {}
        }
    }
    frames
}

/// Every text frame of `/logs/...` and the close frame (code, reason) that ends it.
async fn read_logs(port: u16) -> (Vec<Value>, Option<(u16, String)>) {
    let url = format!("ws://127.0.0.1:{port}/logs/{KNOT}/{RKEY}/{WORKFLOW}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("connect /logs");
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(420);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("{url}: the stream did not end: {frames:#?}"));
        match msg {
            Some(Ok(Message::Text(t))) => {
                frames.push(serde_json::from_str(t.as_str()).expect("a /logs frame is JSON"))
            }
            Some(Ok(Message::Close(c))) => {
                return (frames, c.map(|c| (u16::from(c.code), c.reason.as_str().to_owned())));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("{url}: {e} after {frames:#?}"),
            None => return (frames, None),
        }
    }
}

/// §6.2: keys, nsid, TID rkey, the workflow's identity, UTC seconds, and error/exitCode only on
/// `failed`. Returns (status, error, exitCode) of each frame for this workflow.
fn check_events(frames: &[Value]) -> Vec<(String, Option<String>, Option<i64>)> {
    let mut out = Vec::new();
    for f in frames {
        let keys: Vec<&str> = f.as_object().expect("object").keys().map(String::as_str).collect();
        assert_eq!(keys, ["event", "nsid", "rkey"], "{f}");
        assert_eq!(f["nsid"], "sh.tangled.pipeline.status", "{f}");
        let rkey = f["rkey"].as_str().expect("rkey");
        assert!(
            rkey.len() == 13 && rkey.chars().all(|c| "234567abcdefghijklmnopqrstuvwxyz".contains(c)),
            "{f}"
        );
        let e = &f["event"];
        if e["workflow"] != WORKFLOW {
            continue;
        }
        assert_eq!(e["pipeline"], format!("at://did:web:{KNOT}/sh.tangled.pipeline/{RKEY}"), "{f}");
        let created = e["createdAt"].as_str().expect("createdAt");
        assert!(created.len() == 20 && created.ends_with('Z'), "UTC, seconds precision: {f}");
        let status = e["status"].as_str().expect("status").to_owned();
        let failed = status == "failed";
        assert_eq!(e.get("error").is_some(), failed, "error only on failed: {f}");
        assert_eq!(e.get("exitCode").is_some(), failed, "exitCode only on failed: {f}");
        out.push((status, e["error"].as_str().map(str::to_owned), e["exitCode"].as_i64()));
    }
    out
}

/// §6.3: for each user step, a `start` control line, its data lines, then an `end` line, steps not
/// interleaved; the known output of both steps is there.
fn check_logs(frames: &[Value], close: &Option<(u16, String)>) {
    assert_eq!(close.as_ref(), Some(&(1000, "log stream complete".to_owned())), "{frames:#?}");
    for (step_id, name, command, line) in
        [(0, "say ok", "echo ok", "ok"), (1, "fail", "echo failing; exit 3", "failing")]
    {
        let of_step: Vec<(usize, &Value)> =
            frames.iter().enumerate().filter(|(_, f)| f["step_id"] == step_id).collect();
        let start = of_step.iter().find(|(_, f)| f["kind"] == "control" && f["step_status"] == "start");
        let end = of_step.iter().find(|(_, f)| f["kind"] == "control" && f["step_status"] == "end");
        let data: Vec<&(usize, &Value)> = of_step.iter().filter(|(_, f)| f["kind"] == "data").collect();
        let (Some((s, start)), Some((e, _))) = (start, end) else { panic!("step {name}: {frames:#?}") };
        assert_eq!(
            (start["content"].as_str(), start["step_kind"].as_i64()),
            (Some(name), Some(1)),
            "{start}"
        );
        assert_eq!(start["step_command"], command, "{start}");
        assert!(data.iter().all(|(i, _)| s < i && i < e), "step {name}: data between start and end");
        assert!(
            data.iter().any(|(_, f)| f["content"] == line && f["stream"] == "stdout"),
            "step {name} printed {line:?}: {frames:#?}"
        );
    }
    let ids: Vec<i64> = frames.iter().filter_map(|f| f["step_id"].as_i64()).collect();
    assert!(ids.windows(2).all(|w| w[0] <= w[1]), "steps do not interleave: {ids:?}");
}

fn workflow_run(name: &str) -> WorkflowRun {
    let step = |name: &str, command: &str| Step {
        name: name.into(),
        command: command.into(),
        environment: BTreeMap::new(),
    };
    let spec = WorkflowRunSpec {
        knot: KNOT.into(),
        pipeline_rkey: RKEY.into(),
        workflow: WORKFLOW.into(),
        trigger: TriggerSpec {
            kind: TriggerKind::Manual,
            repo: TriggerRepo {
                knot: KNOT.into(),
                did: "did:plc:e2e".into(),
                repo: "e2e".into(),
                default_branch: "main".into(),
            },
            push: None,
            pull_request: None,
            manual: Some(ManualTrigger { inputs: vec![] }),
        },
        engine: Engine::Kubernetes,
        image: Some("docker.io/library/bash:5.2".into()),
        architecture: None,
        clone: CloneOptions { skip: true, ..CloneOptions::default() },
        dependencies: BTreeMap::new(),
        environment: BTreeMap::new(),
        steps: vec![step("say ok", "echo ok"), step("fail", "echo failing; exit 3")],
        timeout: Some("5m".into()),
        secret_name: None,
        cancel: false,
    };
    WorkflowRun::new(name, spec)
}

#[tokio::test]
#[ignore = "needs a cluster with Tekton"]
async fn a_failing_step_fails_the_run_with_its_exit_code() {
    let client = Client::try_default().await.expect("a cluster from KUBECONFIG");

    // The CRD, exactly as this build generates it.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "workflowruns.bobbin.dev",
        &PatchParams::apply("bobbin-e2e").force(),
        &Patch::Apply(WorkflowRun::crd()),
    )
    .await
    .expect("apply the CRD");
    wait_for("the CRD to be served", Duration::from_secs(60), || {
        let client = client.clone();
        async move { client.list_api_group_resources("bobbin.dev/v1alpha1").await.ok() }
    })
    .await;

    // The namespace hack/e2e.sh made, or a fresh one of our own.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let (ns, owned) = match std::env::var("BOBBIN_E2E_NAMESPACE") {
        Ok(ns) if !ns.is_empty() => (ns, false),
        _ => {
            let mut suffix = [0u8; 3];
            getrandom::getrandom(&mut suffix).expect("random");
            let ns = format!("bobbin-e2e-{}", suffix.iter().map(|b| format!("{b:02x}")).collect::<String>());
            let namespace = Namespace {
                metadata: ObjectMeta { name: Some(ns.clone()), ..ObjectMeta::default() },
                ..Namespace::default()
            };
            namespaces.create(&PostParams::default(), &namespace).await.expect("create namespace");
            (ns, true)
        }
    };
    namespaces.get(&ns).await.expect("the test namespace exists");
    let _cleanup = Cleanup { namespace: ns.clone(), owned };

    // bobbin serve, with its own database and log directory.
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("spindle.db");
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).expect("log dir");
    let port = free_port();
    let serve = Serve(
        Command::new(env!("CARGO_BIN_EXE_bobbin"))
            .arg("serve")
            .env("SPINDLE_SERVER_HOSTNAME", "localhost")
            .env("SPINDLE_SERVER_OWNER", "did:plc:e2eowner")
            .env("SPINDLE_SERVER_LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("SPINDLE_SERVER_DB_PATH", &db)
            .env("SPINDLE_SERVER_LOG_DIR", &logs)
            .env("SPINDLE_SERVER_JETSTREAM_ENDPOINT", "ws://127.0.0.1:9/subscribe")
            .env("SPINDLE_SERVER_MAX_JOB_COUNT", "2")
            .env("BOBBIN_NAMESPACE", &ns)
            .env("BOBBIN_CONFIG", "")
            .env("BOBBIN_SECRETS_KEY", "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=")
            .env("BOBBIN_WORKSPACE_SIZE", "64Mi")
            .env("RUST_LOG", "bobbin=debug,info")
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start bobbin serve"),
    );
    wait_for("bobbin to be ready", Duration::from_secs(60), || async move { ready(port).then_some(()) })
        .await;

    // Watch /events live from before the run exists (no cursor: start now, no backfill) until the
    // final status; once the first frame (pending) is there, follow /logs live.
    let is_final = |frames: &[Value]| {
        frames.iter().any(|f| f["event"]["workflow"] == WORKFLOW && f["event"]["status"] == "failed")
    };
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let live_events = tokio::spawn(read_events(port, "", Some(first_tx), is_final));
    let live_logs = tokio::spawn(async move {
        first_rx.await.expect("a first /events frame");
        read_logs(port).await
    });
    // Let the /events handshake finish before the first status is appended.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A run with a passing and a failing step.
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
    runs.create(&PostParams::default(), &workflow_run("e2e")).await.expect("create the WorkflowRun");
    let done = wait_for("the run to finish", Duration::from_secs(420), || {
        let runs = runs.clone();
        async move {
            let run = runs.get("e2e").await.ok()?;
            run.status.as_ref()?.phase.filter(|p| p.is_final())?;
            Some(run)
        }
    })
    .await;
    let status = done.status.clone().expect("status");
    assert_eq!(status.phase, Some(StatusKind::Failed), "{status:?}");
    assert_eq!(status.exit_code, Some(3), "{status:?}");
    assert_eq!(status.message.as_deref(), Some("workflow failed"));
    let steps: Vec<_> = status.steps.iter().map(|s| (s.name.as_str(), s.phase, s.exit_code)).collect();
    assert_eq!(steps, [("say ok", StepPhase::Succeeded, Some(0)), ("fail", StepPhase::Failed, Some(3))]);
    assert!(
        status.pipeline_run_name.is_some() && status.start_time.is_some() && status.completion_time.is_some()
    );

    // /events: live, then the same frames again by backfill from a cursor before them all.
    let live = live_events.await.expect("live /events task");
    assert_eq!(
        check_events(&live),
        [
            ("pending".to_owned(), None, None),
            ("running".to_owned(), None, None),
            ("failed".to_owned(), Some("workflow failed".to_owned()), Some(3)),
        ],
        "{live:#?}"
    );
    let backfilled = read_events(port, "?cursor=1", None, |f| f.len() >= live.len()).await;
    let rkeys = |frames: &[Value]| frames.iter().map(|f| f["rkey"].clone()).collect::<Vec<_>>();
    assert_eq!(rkeys(&backfilled), rkeys(&live), "backfill replays exactly what was sent live");

    // /logs: the live stream ends by itself once the run is over (B20), and a viewer arriving
    // after the end gets the same lines; both close with 1000 `log stream complete`.
    let (live_lines, live_close) = live_logs.await.expect("live /logs task");
    check_logs(&live_lines, &live_close);
    let (lines, close) = read_logs(port).await;
    check_logs(&lines, &close);
    assert_eq!(lines, live_lines, "the file holds what was streamed live");
    let log_file = logs.join(format!("{KNOT}-{RKEY}-{WORKFLOW}.log"));
    let on_disk = std::fs::read_to_string(&log_file).expect("the log file (Go's name)");
    assert_eq!(on_disk.lines().count(), lines.len(), "{}", log_file.display());

    // Kubernetes Events for the transitions.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let reasons = wait_for("the Failed event", Duration::from_secs(30), || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            let reasons: Vec<String> = list
                .items
                .into_iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("e2e"))
                .filter_map(|e| e.reason)
                .collect();
            reasons.iter().any(|r| r == "Failed").then_some(reasons)
        }
    })
    .await;
    assert!(reasons.iter().any(|r| r == "Running"), "{reasons:?}");

    // Deleting the finished run lets the finalizer go; then stop bobbin and read what it reported.
    runs.delete("e2e", &DeleteParams::background()).await.expect("delete the run");
    wait_for("the run to be gone", Duration::from_secs(60), || {
        let runs = runs.clone();
        async move { runs.get_opt("e2e").await.ok().and_then(|r| r.is_none().then_some(())) }
    })
    .await;
    drop(serve);
    let store = bobbin::store::Store::open(&db).expect("reopen the database");
    let reported: Vec<(StatusKind, Option<String>, Option<i64>)> = store
        .events_after(0, 100)
        .await
        .expect("events")
        .into_iter()
        .map(|e| {
            let f: StatusFrame = serde_json::from_str(&e.frame).expect("frame");
            (f.event.status, f.event.error, f.event.exit_code)
        })
        .collect();
    assert_eq!(
        reported,
        [
            (StatusKind::Pending, None, None),
            (StatusKind::Running, None, None),
            (StatusKind::Failed, Some("workflow failed".into()), Some(3)),
        ]
    );
}
