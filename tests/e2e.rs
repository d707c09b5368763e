//! Real-cluster test: `bobbin serve` against `KUBECONFIG` runs a WorkflowRun on Tekton and reports
//! it. Run with `hack/e2e.sh` (a cluster with Tekton Pipelines and a default StorageClass).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bobbin::crd::{StepPhase, TriggerKind, TriggerSpec, WorkflowRun, WorkflowRunSpec};
use bobbin::model::pipeline::{ManualTrigger, TriggerRepo};
use bobbin::model::{CloneOptions, Engine, StatusFrame, StatusKind, Step};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt};

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

fn workflow_run(name: &str) -> WorkflowRun {
    let step = |name: &str, command: &str| Step {
        name: name.into(),
        command: command.into(),
        environment: BTreeMap::new(),
    };
    let spec = WorkflowRunSpec {
        knot: "e2e.invalid".into(),
        pipeline_rkey: "3m734z2gwll22".into(),
        workflow: "e2e.yml".into(),
        trigger: TriggerSpec {
            kind: TriggerKind::Manual,
            repo: TriggerRepo {
                knot: "e2e.invalid".into(),
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
        timeout: Some("3m".into()),
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

    // A fresh namespace for this test.
    let mut suffix = [0u8; 3];
    getrandom::getrandom(&mut suffix).expect("random");
    let ns = format!("bobbin-e2e-{}", suffix.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace = Namespace {
        metadata: ObjectMeta { name: Some(ns.clone()), ..ObjectMeta::default() },
        ..Namespace::default()
    };
    namespaces.create(&PostParams::default(), &namespace).await.expect("create namespace");

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

    // A run with a passing and a failing step.
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
    runs.create(&PostParams::default(), &workflow_run("e2e")).await.expect("create the WorkflowRun");
    let done = wait_for("the run to finish", Duration::from_secs(300), || {
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
    namespaces.delete(&ns, &DeleteParams::background()).await.expect("delete the namespace");
}
