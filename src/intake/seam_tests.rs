//! The seam intake → controller → translate → logs, with every knot event fixture: the
//! WorkflowRuns intake really POSTs (captured by the mocked API server), read back as the API
//! server stores them, must translate in both layouts into PipelineRuns that pass the Tekton v1
//! schema and Tekton's semantic rules, and every name the other areas derive from them (PipelineRun,
//! per-run Secret, `secretKeyRef`s, the follower's Secret and log file, the controller's watch
//! selector, the status lookup) must agree. Each area tests its own half; this is the only place
//! both halves meet.

use std::sync::Arc;

use kube::Resource;

use super::pipeline::{Handled, PipelineIntake};
use super::testkit::{MockKube, fixture};
use super::ws::Frame;
use crate::config::{Config, Layout};
use crate::crd::WorkflowRun;
use crate::model::KnotEnvelope;
use crate::naming;
use crate::store::Store;
use crate::store::intake::{self as q, RepoRow};
use crate::tekton::translate::{self, TranslateInput, TranslateSettings};
use crate::tekton::{golden, per_run_secret, schema_check};

const OWNER: &str = "did:plc:hbrpoigf3cbfnobm2o4rak3v";
const NS: &str = "ci";

/// Every `knot-events/*.json` fixture, as (file name, text).
fn knot_fixtures() -> Vec<(String, String)> {
    let dir = format!("{}/../shared/spec/fixtures/knot-events", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no knot event fixtures in {dir}");
    files.into_iter().map(|f| (f.clone(), fixture(&format!("knot-events/{f}")))).collect()
}

/// A store where the fixture's repo is registered and its owner is a member.
async fn store_for(path: &std::path::Path, knot: &str, did: &str, repo: &str) -> Store {
    let store = Store::open(path).expect("open store");
    let (knot, did, repo) = (knot.to_owned(), did.to_owned(), repo.to_owned());
    store
        .transaction(move |tx| {
            q::put_member(tx, OWNER, "m1", "spindle.example.com", &did)?;
            q::register_repo(tx, &RepoRow { knot, owner: did, name: repo, rkey: "3m6pd65mx7k2b".into() })
        })
        .await
        .expect("register the fixture's repo");
    store
}

/// What the API server adds when it stores an object.
fn as_stored(mut run: WorkflowRun, i: usize) -> WorkflowRun {
    run.metadata.uid = Some(format!("00000000-0000-4000-8000-{i:012}"));
    run.metadata.resource_version = Some("1".into());
    run
}

fn settings(layout: Layout) -> TranslateSettings {
    let mut s = TranslateSettings::from(&Config::for_tests());
    s.layout = layout;
    s
}

#[tokio::test]
async fn intake_runs_translate_to_valid_pipeline_runs_whose_names_every_area_agrees_on() {
    let doc = schema_check::document();
    let secret_keys = vec!["DEPLOY_TOKEN".to_owned()];
    let mut checked = 0;
    for (file, text) in knot_fixtures() {
        let envelope = KnotEnvelope::parse(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        let record = envelope.pipeline().unwrap_or_else(|e| panic!("{file}: {e}"));
        let repo = record.trigger().expect("trigger").repo.clone().expect("repo");
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store_for(&dir.path().join("s.db"), &repo.knot, &repo.did, &repo.repo).await;
        let kube = MockKube::start();
        let intake = PipelineIntake::new(store.clone(), Arc::new(kube.api(NS)), NS, OWNER);
        let frame = Frame { text: text.clone(), received_ns: super::ws::now_ns() };
        let handled = intake.handle(&repo.knot, &frame).await.expect("handle");
        let Handled::Accepted { runs, failed } = &handled else { panic!("{file}: {handled:?}") };
        assert!(failed.is_empty(), "{file}: every fixture workflow runs: {failed:?}");
        assert_eq!(runs.len(), record.workflows.iter().flatten().count(), "{file}");

        let posted = kube.seen();
        assert_eq!(posted.len(), runs.len(), "{file}: one POST per workflow");
        for (i, seen) in posted.into_iter().enumerate() {
            let what = format!("{file} #{i}");
            assert_eq!(seen.method, "POST", "{what}");
            assert_eq!(
                seen.path,
                format!("/apis/bobbin.dev/v1alpha1/namespaces/{NS}/workflowruns?"),
                "{what}"
            );
            // The body must be what the controller's typed watch can read back.
            let run: WorkflowRun =
                serde_json::from_value(seen.body.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
            let run = as_stored(run, i);
            assert_eq!(seen.body["apiVersion"], WorkflowRun::api_version(&()).as_ref(), "{what}");
            let name = run.metadata.name.clone().expect("name");
            let id = run.workflow_id();
            // The controller (and /logs) look the run's statuses up by the id of its spec: they
            // must find the `pending` intake appended, or tangled would hear `pending` twice.
            let latest = store.latest_status(&id).await.expect("store").map(|r| r.status);
            assert_eq!(latest, Some(crate::model::StatusKind::Pending), "{what}: {id}");

            // Names: WorkflowRun = PipelineRun, and one per-run Secret name everywhere.
            assert_eq!(name, naming::run_name(&id), "{what}");
            assert_eq!(translate::pipeline_run_name(&run), name, "{what}");
            assert!(naming::is_dns1123_label(&name), "{what}: {name}");
            let secret = run.spec.secret_name.clone().expect("intake sets spec.secretName");
            assert_eq!(secret, naming::secret_name(&name), "{what}");
            assert_eq!(translate::secret_name(&run), secret, "{what}");
            assert_eq!(per_run_secret(&run, &Default::default()).metadata.name.as_deref(), Some(&*secret));
            assert_eq!(run.metadata.namespace.as_deref(), Some(NS), "{what}");
            let labels = run.metadata.labels.clone().expect("labels");
            assert_eq!(labels, translate::labels(&run), "{what}: labelled like its PipelineRun");

            for (layout, layout_name) in [(Layout::PerStep, "per-step"), (Layout::Packed, "packed")] {
                let what = format!("{what} ({layout_name})");
                let settings = settings(layout);
                // As the controller calls it: new runs are created held in the queue.
                let input = TranslateInput { run: &run, secret_keys: &secret_keys, queued: true };
                let pr = translate::translate(&input, &settings).unwrap_or_else(|e| panic!("{what}: {e}"));
                let json = serde_json::to_value(&pr).expect("json");
                let errors = schema_check::validate(&doc, "dev.tekton.v1.PipelineRun", &json);
                assert!(errors.is_empty(), "{what}: {errors:#?}");
                assert_eq!(golden::semantic_errors(&pr), Vec::<String>::new(), "{what}");

                assert_eq!(pr.metadata.name.as_deref(), Some(name.as_str()), "{what}");
                assert_eq!(pr.metadata.namespace.as_deref(), Some(NS), "{what}");
                let owner = pr.metadata.owner_references.clone().unwrap_or_default();
                assert_eq!(owner.len(), 1, "{what}");
                assert_eq!(
                    (owner[0].name.as_str(), owner[0].uid.as_str()),
                    (name.as_str(), run.metadata.uid.as_deref().unwrap_or_default())
                );
                assert_eq!(owner[0].kind, "WorkflowRun", "{what}");
                // The controller watches PipelineRuns and TaskRuns by this label.
                let pr_labels = pr.metadata.labels.clone().unwrap_or_default();
                assert_eq!(pr_labels.get("app.kubernetes.io/managed-by").map(String::as_str), Some("bobbin"));
                for (k, v) in &labels {
                    assert_eq!(pr_labels.get(k), Some(v), "{what}: label {k}");
                }
                // Every secretKeyRef points at the Secret the controller creates and the follower reads.
                let refs: Vec<String> = json
                    .pointer("/spec/pipelineSpec/tasks")
                    .and_then(|t| t.as_array())
                    .into_iter()
                    .flatten()
                    .flat_map(|t| {
                        t.pointer("/taskSpec/steps").and_then(|s| s.as_array()).cloned().unwrap_or_default()
                    })
                    .flat_map(|s| s["env"].as_array().cloned().unwrap_or_default())
                    .filter_map(|e| {
                        e.pointer("/valueFrom/secretKeyRef/name").and_then(|n| n.as_str()).map(str::to_owned)
                    })
                    .collect();
                assert!(!refs.is_empty(), "{what}: the repo secret reaches the steps");
                assert!(refs.iter().all(|r| *r == secret), "{what}: {refs:?}");

                // The log follower attaches to the same names.
                let plan = crate::plan::plan(&run.spec, &settings.plan).expect("plan");
                let target = crate::logs::RunTarget::new(&run, &plan, &name, "elsewhere")
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(target.namespace, NS, "{what}");
                assert_eq!(target.secret_name.as_deref(), Some(secret.as_str()), "{what}");
                assert_eq!(target.id.log_file_name(), id.log_file_name(), "{what}");
                let tasks: Vec<String> = json
                    .pointer("/spec/pipelineSpec/tasks")
                    .and_then(|t| t.as_array())
                    .into_iter()
                    .flatten()
                    .flat_map(|t| {
                        let task = t["name"].as_str().unwrap_or_default().to_owned();
                        let steps = t
                            .pointer("/taskSpec/steps")
                            .and_then(|s| s.as_array())
                            .cloned()
                            .unwrap_or_default();
                        steps.into_iter().map(move |s| match layout {
                            Layout::PerStep => task.clone(),
                            Layout::Packed => s["name"].as_str().unwrap_or_default().to_owned(),
                        })
                    })
                    .collect();
                for step in &target.steps {
                    assert!(
                        tasks.contains(&step.task),
                        "{what}: the follower looks for {:?} in {tasks:?}",
                        step.task
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 8, "two fixtures × two workflows × two layouts, got {checked}");
}
