//! Translation tests: golden files for every fixture workflow × trigger × layout, Tekton's semantic
//! rules, the OpenAPI schema, env precedence, secrets by reference, and properties over random
//! workflows.
//!
//! Golden files live in `tests/golden/`; after an intended change regenerate them with
//! `BOBBIN_UPDATE_GOLDEN=1 cargo test --lib tekton::golden` and review the diff.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use proptest::prelude::*;
use serde_json::Value;

use super::schema_check;
use super::shell;
use super::translate::{TranslateError, TranslateInput, TranslateSettings, translate};
use super::types::{PipelineRun, PipelineTask, Step};
use crate::config::{Config, Layout, ResourceProfile};
use crate::crd::{TriggerKind, TriggerSpec, WorkflowRun};
use crate::model::{KnotEnvelope, Step as UserStep};
use crate::naming::{self, is_dns1123_label};
use crate::plan::{self, PlanError};

const FIXTURES: [&str; 3] = ["env-and-clone.yml", "nixery-deps.yml", "simple-image.yml"];
const TRIGGERS: [TriggerKind; 3] = [TriggerKind::Push, TriggerKind::PullRequest, TriggerKind::Manual];
const LAYOUTS: [(Layout, &str); 2] = [(Layout::PerStep, "per-step"), (Layout::Packed, "packed")];
const SECRET_KEYS: [&str; 2] = ["DEPLOY_TOKEN", "NODE_ENV"];

fn shared(path: &str) -> String {
    let path = format!("{}/../shared/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn trigger(kind: TriggerKind) -> TriggerSpec {
    let file = match kind {
        TriggerKind::PullRequest => "pipeline-pull-request.json",
        _ => "pipeline-push.json",
    };
    let record = KnotEnvelope::parse(&shared(&format!("spec/fixtures/knot-events/{file}")))
        .and_then(|e| e.pipeline())
        .expect("fixture");
    let mut t = TriggerSpec::from_metadata(record.trigger().expect("trigger")).expect("trigger spec");
    if kind == TriggerKind::Manual {
        t = TriggerSpec { kind, push: None, pull_request: None, manual: Some(Default::default()), ..t };
    }
    t
}

/// A WorkflowRun as the controller sees it: stored (uid), in a namespace, with a secret reference.
fn fixture_run(file: &str, kind: TriggerKind) -> WorkflowRun {
    let text = shared(&format!("spec/fixtures/workflows/{file}"));
    let wf = crate::cli::render::workflow_from_file(file, &text, None).expect("fixture parses");
    let mut run = crate::cli::render::workflow_run("knot1.tangled.sh", "3m734z2gwll22", trigger(kind), wf);
    run.metadata.namespace = Some("ci".into());
    run.metadata.uid = Some("6c1f3c2e-8a4b-4d0e-9f3a-2b7c5d9e1a00".into());
    run.spec.secret_name = run.metadata.name.as_deref().map(naming::secret_name);
    run
}

fn settings(layout: Layout) -> TranslateSettings {
    let mut s = TranslateSettings::from(&Config::for_tests());
    s.layout = layout;
    s.resource_profiles = vec![
        ResourceProfile {
            node_selector: [("kubernetes.io/arch".to_owned(), "arm64".to_owned())].into(),
            resources: resources("2", "4Gi"),
        },
        ResourceProfile { node_selector: BTreeMap::new(), resources: resources("1", "2Gi") },
    ];
    s
}

fn resources(cpu: &str, memory: &str) -> ResourceRequirements {
    let q = |cpu: &str, mem: &str| {
        Some([("cpu".to_owned(), Quantity(cpu.into())), ("memory".to_owned(), Quantity(mem.into()))].into())
    };
    ResourceRequirements { requests: q("500m", "1Gi"), limits: q(cpu, memory), ..Default::default() }
}

fn keys(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn render(run: &WorkflowRun, layout: Layout) -> PipelineRun {
    translate(&TranslateInput { run, secret_keys: &keys(&SECRET_KEYS), queued: false }, &settings(layout))
        .expect("translates")
}

fn tasks(pr: &PipelineRun) -> &[PipelineTask] {
    &pr.spec.pipeline_spec.as_ref().expect("pipelineSpec").tasks
}

fn steps(pr: &PipelineRun) -> Vec<(&str, &Step)> {
    tasks(pr)
        .iter()
        .flat_map(|t| {
            t.task_spec.iter().flat_map(move |s| s.steps.iter().map(move |st| (t.name.as_str(), st)))
        })
        .collect()
}

/// Tekton's semantic rules the schema cannot express. Returns every violation.
pub fn semantic_errors(pr: &PipelineRun) -> Vec<String> {
    let mut errors = Vec::new();
    let mut err = |m: String| errors.push(m);
    let name = pr.metadata.name.as_deref().unwrap_or_default();
    if !is_dns1123_label(name) {
        err(format!("PipelineRun name {name:?} is not a DNS-1123 label"));
    }
    let Some(spec) = pr.spec.pipeline_spec.as_ref() else {
        return vec!["no pipelineSpec".into()];
    };
    let declared: BTreeSet<&str> = spec.workspaces.iter().map(|w| w.name.as_str()).collect();
    let bound: BTreeSet<&str> = pr.spec.workspaces.iter().map(|w| w.name.as_str()).collect();
    if declared != bound {
        err(format!("pipeline workspaces {declared:?} but PipelineRun binds {bound:?}"));
    }
    let mut seen: Vec<&str> = Vec::new();
    for task in &spec.tasks {
        if !is_dns1123_label(&task.name) {
            err(format!("task name {:?} is not a DNS-1123 label", task.name));
        }
        if seen.contains(&task.name.as_str()) {
            err(format!("duplicate task {:?}", task.name));
        }
        for after in &task.run_after {
            if !seen.contains(&after.as_str()) {
                err(format!("task {:?} runs after unknown or later task {after:?}", task.name));
            }
        }
        seen.push(&task.name);
        let Some(ts) = task.task_spec.as_ref() else {
            err(format!("task {:?} has no taskSpec", task.name));
            continue;
        };
        let task_ws: BTreeSet<&str> = ts.workspaces.iter().map(|w| w.name.as_str()).collect();
        let task_bound: BTreeSet<&str> = task.workspaces.iter().map(|w| w.name.as_str()).collect();
        if task_ws != task_bound {
            err(format!("task {:?} declares workspaces {task_ws:?} but binds {task_bound:?}", task.name));
        }
        for b in &task.workspaces {
            if !declared.contains(b.workspace.as_str()) {
                err(format!("task {:?} uses undeclared pipeline workspace {:?}", task.name, b.workspace));
            }
        }
        let param_specs: BTreeMap<&str, bool> =
            ts.params.iter().map(|p| (p.name.as_str(), p.default.is_some())).collect();
        let given: BTreeSet<&str> = task.params.iter().map(|p| p.name.as_str()).collect();
        for p in &given {
            if !param_specs.contains_key(p) {
                err(format!("task {:?} passes undeclared param {p:?}", task.name));
            }
        }
        for (p, has_default) in &param_specs {
            if !has_default && !given.contains(p) {
                err(format!("task {:?} does not pass required param {p:?}", task.name));
            }
        }
        let volumes: BTreeSet<&str> = ts.volumes.iter().map(|v| v.name.as_str()).collect();
        let mut step_names = BTreeSet::new();
        for step in &ts.steps {
            if !is_dns1123_label(&step.name) {
                err(format!("step {:?} of {:?} is not a DNS-1123 label", step.name, task.name));
            }
            if format!("step-{}", step.name).len() > 63 {
                err(format!("container name step-{} is longer than 63", step.name));
            }
            if !step_names.insert(step.name.as_str()) {
                err(format!("duplicate step {:?} in {:?}", step.name, task.name));
            }
            let mut env_names = BTreeSet::new();
            for e in &step.env {
                if !env_names.insert(e.name.as_str()) {
                    err(format!("duplicate env {:?} in step {:?} of {:?}", e.name, step.name, task.name));
                }
            }
            for m in &step.volume_mounts {
                if !volumes.contains(m.name.as_str()) {
                    err(format!("step {:?} mounts undeclared volume {:?}", step.name, m.name));
                }
            }
            if step.script.is_some() && !step.command.is_empty() {
                err(format!("step {:?} has both script and command", step.name));
            }
            // Every $(params.x) a step uses is declared.
            let texts = step.args.iter().chain(step.script.iter()).chain(std::iter::once(&step.image));
            for text in texts {
                for part in text.split("$(params.").skip(1) {
                    let p = part.split(')').next().unwrap_or_default();
                    if !param_specs.contains_key(p) {
                        err(format!("step {:?} references undeclared param {p:?}", step.name));
                    }
                }
            }
            let sc = step.security_context.as_ref();
            let drops_all = sc
                .and_then(|s| s.capabilities.as_ref())
                .and_then(|c| c.drop.as_ref())
                .is_some_and(|d| d == &["ALL"]);
            if !drops_all || sc.and_then(|s| s.allow_privilege_escalation) != Some(false) {
                err(format!("step {:?} of {:?} is not hardened", step.name, task.name));
            }
        }
    }
    errors
}

fn golden_path(file: &str, kind: TriggerKind, layout: &str) -> String {
    let stem = file.trim_end_matches(".yml");
    format!("{}/tests/golden/{stem}.{}.{layout}.yaml", env!("CARGO_MANIFEST_DIR"), kind.as_str())
}

#[test]
fn golden_files_schema_and_semantics() {
    let update = std::env::var("BOBBIN_UPDATE_GOLDEN").is_ok_and(|v| v == "1");
    let doc = schema_check::document();
    let mut mismatched = Vec::new();
    for file in FIXTURES {
        for kind in TRIGGERS {
            for (layout, layout_name) in LAYOUTS {
                let run = fixture_run(file, kind);
                let pr = render(&run, layout);
                let yaml = crate::yaml::to_string(&pr).expect("yaml");
                let path = golden_path(file, kind, layout_name);
                if update {
                    std::fs::create_dir_all(format!("{}/tests/golden", env!("CARGO_MANIFEST_DIR")))
                        .expect("mkdir");
                    std::fs::write(&path, &yaml).expect("write golden");
                } else if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
                    mismatched.push(path.clone());
                }
                let json = serde_json::to_value(&pr).expect("json");
                let errors = schema_check::validate(&doc, "dev.tekton.v1.PipelineRun", &json);
                assert!(errors.is_empty(), "{path}: {errors:#?}");
                assert_eq!(semantic_errors(&pr), Vec::<String>::new(), "{path}");
                // Deterministic: the same input gives byte-identical output.
                assert_eq!(crate::yaml::to_string(&render(&run, layout)).expect("yaml"), yaml);
            }
        }
    }
    assert!(
        mismatched.is_empty(),
        "golden files differ (regenerate with BOBBIN_UPDATE_GOLDEN=1 cargo test --lib tekton::golden): {mismatched:#?}"
    );
}

#[test]
fn semantic_checker_catches_broken_pipelines() {
    let mut pr = render(&fixture_run("simple-image.yml", TriggerKind::Push), Layout::PerStep);
    let spec = pr.spec.pipeline_spec.as_mut().expect("spec");
    spec.tasks[1].run_after = vec!["nope".into()];
    spec.tasks[2].name = "Step_1".into();
    spec.tasks[3].workspaces[0].workspace = "other".into();
    let ts = spec.tasks[3].task_spec.as_mut().expect("taskSpec");
    let dup = ts.steps[0].env[0].clone();
    ts.steps[0].env.push(dup);
    ts.steps[0].name = "x".repeat(60);
    let errors = semantic_errors(&pr);
    for want in [
        "unknown or later task \"nope\"",
        "\"Step_1\" is not a DNS-1123",
        "undeclared pipeline workspace",
        "duplicate env",
        "longer than 63",
    ] {
        assert!(errors.iter().any(|e| e.contains(want)), "missing {want:?} in {errors:#?}");
    }
}

#[test]
fn both_layouts_follow_the_plan() {
    for file in FIXTURES {
        let run = fixture_run(file, TriggerKind::Push);
        let plan = plan::plan(&run.spec, &settings(Layout::PerStep).plan).expect("plan");
        let plan_tasks: Vec<&str> = plan.steps.iter().map(|s| s.task.as_str()).collect();
        let per_step = render(&run, Layout::PerStep);
        assert_eq!(
            tasks(&per_step).iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            plan_tasks,
            "{file}"
        );
        for (task, step) in steps(&per_step) {
            let want = match task {
                "setup" => "setup",
                "clone" => "clone",
                _ => "run",
            };
            assert_eq!(step.name, want);
        }
        let packed = render(&run, Layout::Packed);
        assert_eq!(tasks(&packed).len(), 1);
        assert_eq!(tasks(&packed)[0].name, "workflow");
        assert_eq!(
            steps(&packed).iter().map(|(_, s)| s.name.as_str()).collect::<Vec<_>>(),
            plan_tasks,
            "{file}"
        );
    }
}

#[test]
fn metadata_pod_template_and_timeout() {
    let run = fixture_run("env-and-clone.yml", TriggerKind::PullRequest);
    let pr = render(&run, Layout::PerStep);
    let m = &pr.metadata;
    assert_eq!(m.name, run.metadata.name);
    assert_eq!(m.namespace.as_deref(), Some("ci"));
    let owner = &m.owner_references.as_ref().expect("owner")[0];
    assert_eq!((owner.kind.as_str(), owner.api_version.as_str()), ("WorkflowRun", "bobbin.dev/v1alpha1"));
    assert_eq!((owner.controller, owner.block_owner_deletion), (Some(true), Some(true)));
    let labels = m.labels.as_ref().expect("labels");
    assert_eq!(labels["bobbin.dev/trigger"], "pull_request");
    assert_eq!(labels["bobbin.dev/workflow"], "env-and-clone.yml");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "bobbin");
    assert!(labels.values().all(|v| naming::label_value(v).is_some()), "{labels:?}");
    let annotations = m.annotations.as_ref().expect("annotations");
    assert_eq!(annotations["bobbin.dev/commit"], "da4b9237bacccdf19c0760cab7aec4a8359010b0");
    assert_eq!(annotations["bobbin.dev/repo-did"], "did:plc:rjnvgfygwwqc5hyfsxmecosf");
    assert_eq!(annotations["bobbin.dev/layout"], "per-step");
    let pod = pr.spec.task_run_template.as_ref().and_then(|t| t.pod_template.as_ref()).expect("pod");
    assert_eq!(pod.node_selector["kubernetes.io/arch"], "arm64");
    let sc = pod.security_context.as_ref().expect("sc");
    assert_eq!((sc.run_as_non_root, sc.run_as_user, sc.fs_group), (Some(true), Some(1000), Some(1000)));
    assert_eq!((pod.automount_service_account_token, pod.enable_service_links), (Some(false), Some(false)));
    assert_eq!(pr.spec.timeouts.as_ref().and_then(|t| t.pipeline.as_deref()), Some("5m0s"));
    assert_eq!(pr.spec.status, None);
    // arm64 selects the arm64 profile; only workload steps carry resources.
    for (task, step) in steps(&pr) {
        let limits = step.compute_resources.as_ref().and_then(|r| r.limits.as_ref());
        match task {
            "setup" | "clone" => assert!(limits.is_none(), "{task}"),
            _ => assert_eq!(limits.expect("limits")["cpu"].0, "2", "{task}"),
        }
    }

    // A knot with a port cannot be a label value: annotation only.
    let mut odd = run.clone();
    odd.spec.knot = "localhost:3000".into();
    odd.spec.timeout = Some("1h30m".into());
    let pr =
        translate(&TranslateInput { run: &odd, secret_keys: &[], queued: true }, &settings(Layout::Packed))
            .expect("translate");
    assert!(!pr.metadata.labels.as_ref().expect("labels").contains_key("bobbin.dev/knot"));
    assert_eq!(pr.metadata.annotations.as_ref().expect("a")["bobbin.dev/knot"], "localhost:3000");
    assert_eq!(pr.metadata.annotations.as_ref().expect("a")["bobbin.dev/layout"], "packed");
    assert_eq!(pr.spec.timeouts.as_ref().and_then(|t| t.pipeline.as_deref()), Some("1h30m0s"));
    assert_eq!(pr.spec.status.as_deref(), Some("PipelineRunPending"));
    // Packed: requests only on the first workload step, limits on all of them.
    let workload: Vec<_> = steps(&pr).into_iter().filter(|(_, s)| s.name.starts_with("step-")).collect();
    let requests: Vec<Option<String>> = workload
        .iter()
        .map(|(_, s)| {
            s.compute_resources.as_ref().and_then(|r| r.requests.as_ref()).map(|r| r["cpu"].0.clone())
        })
        .collect();
    assert_eq!(requests, [Some("500m".to_owned()), Some("0".to_owned())]);

    // No uid (not stored yet): no ownerReference; the settings' namespace applies.
    let mut fresh = run.clone();
    fresh.metadata.uid = None;
    fresh.metadata.namespace = None;
    let mut s = settings(Layout::PerStep);
    s.namespace = Some("builds".into());
    let pr =
        translate(&TranslateInput { run: &fresh, secret_keys: &[], queued: false }, &s).expect("translate");
    assert_eq!(pr.metadata.owner_references, None);
    assert_eq!(pr.metadata.namespace.as_deref(), Some("builds"));
}

#[test]
fn env_precedence_is_go_s_with_each_name_once() {
    let mut run = fixture_run("env-and-clone.yml", TriggerKind::Push);
    run.spec.environment.insert("HOME".into(), "/root".into());
    run.spec.environment.insert("DEPLOY_TOKEN".into(), "from-workflow".into());
    run.spec.environment.insert("DOLLARS".into(), "$HOME and $(HOME) and $$".into());
    run.spec.steps[0].environment.insert("DEPLOY_TOKEN".into(), "from-step".into());
    let pr = render(&run, Layout::PerStep);
    let secret = run.spec.secret_name.clone().expect("secret name");
    for (task, step) in steps(&pr) {
        let env: BTreeMap<&str, &k8s_openapi::api::core::v1::EnvVar> =
            step.env.iter().map(|e| (e.name.as_str(), e)).collect();
        assert_eq!(env.len(), step.env.len(), "duplicate names in {task}");
        assert_eq!(env["HOME"].value.as_deref(), Some("/tangled/home"), "{task}");
        // Workflow env and secrets reach every container, system ones included.
        assert_eq!(env["CI"].value.as_deref(), Some("true"), "{task}");
        assert_eq!(
            shell::kubelet_expand(env["DOLLARS"].value.as_deref().expect("v"), &BTreeMap::new()),
            "$HOME and $(HOME) and $$"
        );
        let token = env["DEPLOY_TOKEN"];
        if task == "step-1-install-dependencies" {
            // step env > secrets
            assert_eq!(token.value.as_deref(), Some("from-step"));
            assert_eq!(env["NODE_ENV"].value.as_deref(), Some("development"));
        } else {
            // secrets > workflow env
            let r = token.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()).expect("secretKeyRef");
            assert_eq!((r.name.as_str(), r.key.as_str()), (secret.as_str(), "DEPLOY_TOKEN"));
            assert!(token.value.is_none());
        }
    }
    // nixery: PATH and NIX_CONFIG at the lowest precedence, on the nixery containers only.
    let mut nix = fixture_run("nixery-deps.yml", TriggerKind::Push);
    let pr = render(&nix, Layout::PerStep);
    for (task, step) in steps(&pr) {
        let path = step.env.iter().find(|e| e.name == "PATH").and_then(|e| e.value.as_deref());
        if task == "clone" {
            assert_eq!(path, None);
        } else {
            assert!(path.expect("PATH").starts_with("/tangled/home/.nix-profile/bin:"), "{task}");
            assert!(step.env.iter().any(|e| e.name == "NIX_CONFIG"));
        }
    }
    nix.spec.environment.insert("PATH".into(), "/custom".into());
    let pr = render(&nix, Layout::PerStep);
    let (_, build) = steps(&pr).into_iter().find(|(t, _)| *t == "step-1-build").expect("build");
    assert_eq!(build.env.iter().find(|e| e.name == "PATH").and_then(|e| e.value.as_deref()), Some("/custom"));
}

#[test]
fn shared_nix_store_is_mounted_after_setup() {
    let run = fixture_run("nixery-deps.yml", TriggerKind::Push);
    let per_step = render(&run, Layout::PerStep);
    for task in tasks(&per_step) {
        let nix = task.workspaces.iter().find(|w| w.name == "nix");
        if task.name == "setup" {
            assert!(nix.is_none());
        } else {
            assert_eq!(nix.and_then(|w| w.sub_path.as_deref()), Some(".nix"), "{}", task.name);
        }
    }
    let packed = render(&run, Layout::Packed);
    for (_, step) in steps(&packed) {
        let mount = step.volume_mounts.iter().find(|m| m.name == "nix-store").expect("mount");
        let want = if step.name == "setup" { "/tangled/.nix" } else { "/nix" };
        assert_eq!(mount.mount_path, want);
    }
    // Image engines and nixery without custom registries share nothing under /nix.
    let pr = render(&fixture_run("simple-image.yml", TriggerKind::Push), Layout::PerStep);
    assert!(tasks(&pr).iter().all(|t| t.workspaces.len() == 1));
}

#[test]
fn user_commands_reach_the_shell_unchanged() {
    let mut run = fixture_run("simple-image.yml", TriggerKind::Push);
    let tricky = "#!/usr/bin/env python3\n  echo $$ $(date) 'q' \"d\" \\ # x: y\n\tTAB\n\n";
    run.spec.steps[0].command = tricky.into();
    for (layout, _) in LAYOUTS {
        let pr = render(&run, layout);
        let (_, step) =
            steps(&pr).into_iter().find(|(_, s)| s.args.len() == 1 && s.script.is_none()).expect("user step");
        assert_eq!(step.command, shell::step_command());
        assert_eq!(shell::kubelet_expand(&step.args[0], &BTreeMap::new()), tricky);
        assert_eq!(step.working_dir.as_deref(), Some("/tangled/workspace"));
        assert_eq!(step.image, "golang:1.25-bookworm");
        // What `bobbin render` prints reads back to the same arguments.
        let back: PipelineRun =
            crate::yaml::from_str(&crate::yaml::to_string(&pr).expect("yaml")).expect("parse");
        assert_eq!((&back.metadata, &back.spec), (&pr.metadata, &pr.spec));
    }
}

#[test]
fn clone_params_follow_trigger_and_options() {
    let param = |pr: &PipelineRun, name: &str| {
        tasks(pr).iter().flat_map(|t| t.params.iter()).find(|p| p.name == name).map(|p| p.value.clone())
    };
    let pr = render(&fixture_run("env-and-clone.yml", TriggerKind::PullRequest), Layout::PerStep);
    assert_eq!(param(&pr, "revision").as_deref(), Some("da4b9237bacccdf19c0760cab7aec4a8359010b0"));
    assert_eq!(param(&pr, "depth").as_deref(), Some("50"));
    assert_eq!(param(&pr, "submodules").as_deref(), Some("true"));
    assert_eq!(
        param(&pr, "url").as_deref(),
        Some("https://knot1.tangled.sh/did:plc:rjnvgfygwwqc5hyfsxmecosf/hello-spindle")
    );
    let pr = render(&fixture_run("simple-image.yml", TriggerKind::Manual), Layout::Packed);
    assert_eq!(param(&pr, "revision").as_deref(), Some(""));

    // clone.skip: no clone at all.
    let mut skip = fixture_run("simple-image.yml", TriggerKind::Push);
    skip.spec.clone.skip = true;
    let pr = render(&skip, Layout::PerStep);
    assert_eq!(
        tasks(&pr).iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["setup", "step-1-build", "step-2-test"]
    );
    assert_eq!(tasks(&pr)[1].run_after, ["setup"]);

    // Go's error variant: the clone step prints the reason and fails.
    let mut broken = fixture_run("simple-image.yml", TriggerKind::Push);
    broken.spec.trigger.push = None;
    let pr = render(&broken, Layout::PerStep);
    let clone = &tasks(&pr)[1];
    assert_eq!(clone.display_name.as_deref(), Some("Clone repository into workspace (error)"));
    let step = &clone.task_spec.as_ref().expect("spec").steps[0];
    assert_eq!(step.name, "clone");
    assert_eq!(step.args, ["echo 'Failed to get clone info: push trigger metadata is nil' && exit 1"]);
    assert_eq!(semantic_errors(&pr), Vec::<String>::new());
}

#[test]
fn bad_runs_are_errors_with_labels() {
    let mut run = fixture_run("simple-image.yml", TriggerKind::Push);
    let s = settings(Layout::PerStep);
    let go = |run: &WorkflowRun, keys: &[String]| {
        translate(&TranslateInput { run, secret_keys: keys, queued: false }, &s).expect_err("bad")
    };
    run.spec.timeout = Some("soon".into());
    let e = go(&run, &[]);
    assert_eq!(e.label(), "bad_timeout");
    assert!(e.to_string().contains("\"soon\""), "{e}");
    run.spec.timeout = None;
    assert_eq!(go(&run, &keys(&["A=B"])).label(), "bad_secret_key");
    run.spec.environment.insert(String::new(), "x".into());
    assert_eq!(go(&run, &[]).label(), "bad_env_name");
    run.spec.environment.clear();
    run.spec.architecture = Some("x86 64".into());
    assert_eq!(go(&run, &[]).label(), "bad_architecture");
    run.spec.architecture = None;
    run.spec.image = Some("golang 1.25".into());
    assert_eq!(go(&run, &[]).label(), "bad_image");
    run.spec.image = None;
    assert_eq!(go(&run, &[]), TranslateError::Plan(PlanError::MissingImage("kubernetes".into())));
    run.spec.steps.clear();
    assert_eq!(go(&run, &[]).label(), "no_steps");
}

#[test]
fn cancel_wins_over_queue() {
    let mut run = fixture_run("simple-image.yml", TriggerKind::Push);
    run.spec.cancel = true;
    let pr =
        translate(&TranslateInput { run: &run, secret_keys: &[], queued: true }, &settings(Layout::PerStep))
            .expect("translate");
    assert_eq!(pr.spec.status.as_deref(), Some("Cancelled"));
}

#[test]
fn secret_values_never_leave_the_per_run_secret() {
    let run = fixture_run("env-and-clone.yml", TriggerKind::Push);
    let values: BTreeMap<String, String> = [
        ("DEPLOY_TOKEN".to_owned(), "canary-7f3a9c2e41d8b6f0".to_owned()),
        ("NPM_TOKEN".to_owned(), "canary-0b9d5e7a3c1f2846".to_owned()),
    ]
    .into();
    let secret_keys: Vec<String> = values.keys().cloned().collect();
    for (layout, _) in LAYOUTS {
        let pr = translate(
            &TranslateInput { run: &run, secret_keys: &secret_keys, queued: false },
            &settings(layout),
        )
        .expect("translate");
        let json = serde_json::to_string(&pr).expect("json");
        let yaml = crate::yaml::to_string(&pr).expect("yaml");
        let wfr =
            serde_json::to_string(&run).expect("wfr json") + &crate::yaml::to_string(&run).expect("wfr yaml");
        for v in values.values() {
            assert!(!json.contains(v.as_str()) && !yaml.contains(v.as_str()) && !wfr.contains(v.as_str()));
            assert!(!json.contains(&v[7..]), "not even part of it");
        }
        assert!(json.contains("secretKeyRef"));
    }
    let secret = super::per_run_secret(&run, &values);
    assert_eq!(secret.metadata.name, run.spec.secret_name);
    assert_eq!(secret.metadata.namespace.as_deref(), Some("ci"));
    assert_eq!(secret.type_.as_deref(), Some("Opaque"));
    assert_eq!(
        secret.metadata.owner_references.as_ref().map(|o| o[0].uid.as_str()),
        run.metadata.uid.as_deref()
    );
    assert_eq!(secret.metadata.labels.as_ref(), render(&run, Layout::PerStep).metadata.labels.as_ref());
    let data = secret.data.as_ref().expect("data");
    for (k, v) in &values {
        assert_eq!(data[k].0, v.as_bytes());
    }
    let as_json: Value = serde_json::to_value(&secret).expect("json");
    assert_eq!(as_json["data"]["DEPLOY_TOKEN"], base64_of("canary-7f3a9c2e41d8b6f0"));
}

fn base64_of(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn standalone_task_yamls_are_valid_tekton_tasks() {
    let doc = schema_check::document();
    for (file, text) in super::system_tasks::MANIFESTS {
        let v: Value = crate::yaml::from_str(text).expect("yaml");
        assert_eq!(schema_check::validate(&doc, "dev.tekton.v1.Task", &v), Vec::<String>::new(), "{file}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_workflows_translate_to_valid_tasks(
        names in proptest::collection::btree_set(".{1,80}", 1..12),
        packed in any::<bool>(),
    ) {
        let mut run = fixture_run("simple-image.yml", TriggerKind::Push);
        run.spec.steps = names
            .iter()
            .map(|n| UserStep { name: n.clone(), command: format!("echo {n:?}"), environment: BTreeMap::new() })
            .collect();
        let layout = if packed { Layout::Packed } else { Layout::PerStep };
        let pr = render(&run, layout);
        prop_assert_eq!(semantic_errors(&pr), Vec::<String>::new());
        let plan = plan::plan(&run.spec, &settings(layout).plan).expect("plan");
        let planned: Vec<&str> = plan.steps.iter().map(|s| s.task.as_str()).collect();
        let got: Vec<&str> = if packed {
            steps(&pr).iter().map(|(_, s)| s.name.as_str()).collect()
        } else {
            tasks(&pr).iter().map(|t| t.name.as_str()).collect()
        };
        prop_assert_eq!(&got, &planned);
        let unique: BTreeSet<&&str> = got.iter().collect();
        prop_assert_eq!(unique.len(), got.len());
        // User steps keep their order and names (display names in per-step).
        let user_names: Vec<String> = plan.steps.iter().filter(|s| s.kind == crate::crd::StepKind::User).map(|s| s.name.clone()).collect();
        prop_assert_eq!(user_names, names.iter().cloned().collect::<Vec<_>>());
        if !packed {
            for (t, p) in tasks(&pr).iter().zip(&plan.steps) {
                prop_assert_eq!(t.display_name.as_deref(), Some(p.name.as_str()));
            }
        }
    }
}
