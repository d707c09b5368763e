//! `bobbin render`: print the Tekton PipelineRun(s) bobbin would create, as YAML that
//! `kubectl apply -f -` accepts, from a knot event or a workflow file. No cluster, no SPINDLE_*
//! variables needed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::{Config, ConfigError, Layout};
use crate::crd::{TriggerKind, TriggerSpec, WorkflowRun, WorkflowRunSpec};
use crate::model::pipeline::{ManualTrigger, PullRequestTrigger, PushTrigger, TriggerRepo};
use crate::model::workflow::{self, MAX_RAW_BYTES};
use crate::model::{CloneOptions, Engine, KnotEnvelope, ModelError, WorkflowError};
use crate::tekton::{PipelineRun, TranslateError, TranslateInput, TranslateSettings, translate};
use crate::yaml;

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:\n  \
    bobbin render --event pipeline.json\n  \
    bobbin render --workflow-file .tangled/workflows/ci.yml --repo did:plc:abc/hello --knot knot1.tangled.sh --sha 356a192b7913b04c54574d18c28d46e6395428ab")]
pub struct RenderArgs {
    /// A knot event envelope (`{"rkey", "nsid", "event"}`) holding an `sh.tangled.pipeline` record.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "workflow_file",
        required_unless_present = "workflow_file"
    )]
    pub event: Option<PathBuf>,
    /// With --event: render only the workflow with this name (e.g. `ci.yml`).
    #[arg(long, value_name = "NAME", requires = "event")]
    pub workflow: Option<String>,
    /// A workflow YAML file (`.tangled/workflows/<name>`); its engine and clone options are read from
    /// it, as the knot does.
    #[arg(long, value_name = "FILE")]
    pub workflow_file: Option<PathBuf>,
    /// With --workflow-file: the repository as `DID/NAME`.
    #[arg(long, value_name = "DID/NAME", requires = "workflow_file")]
    pub repo: Option<String>,
    /// The knot host (with --event: defaults to the record's repo knot).
    #[arg(long, value_name = "HOST")]
    pub knot: Option<String>,
    /// With --workflow-file: the commit to build (required unless --trigger manual).
    #[arg(long, value_name = "SHA", requires = "workflow_file")]
    pub sha: Option<String>,
    /// With --workflow-file: the pushed ref (push), or the source branch (pull_request).
    #[arg(long = "ref", value_name = "REF", default_value = "refs/heads/main")]
    pub git_ref: String,
    /// With --workflow-file: push, pull_request or manual.
    #[arg(long, value_name = "KIND", default_value = "push")]
    pub trigger: String,
    /// With --workflow-file and --trigger pull_request: the branch the pull request targets.
    #[arg(long, value_name = "BRANCH", default_value = "main")]
    pub target_branch: String,
    /// With --workflow-file: the engine, overriding the file's `engine`.
    #[arg(long, value_name = "ENGINE")]
    pub engine: Option<String>,
    /// With --workflow-file: the pipeline record key used in names and labels.
    #[arg(long, value_name = "RKEY", default_value = "render")]
    pub rkey: String,
    /// per-step (a Task per step, default) or packed (one Task, one pod); overrides BOBBIN_LAYOUT.
    #[arg(long, value_name = "LAYOUT")]
    pub layout: Option<String>,
    /// Namespace of the PipelineRuns; overrides BOBBIN_NAMESPACE.
    #[arg(long, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
}

/// Why nothing was rendered. All of these are bad input (exit code 2) except `Serialize`.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Event { path: PathBuf, source: ModelError },
    #[error("workflow {name:?}: {source}")]
    Workflow { name: String, source: WorkflowError },
    #[error("no workflow named {name:?} in the event; it has: {available}")]
    UnknownWorkflow { name: String, available: String },
    #[error("{0}")]
    Usage(String),
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("workflow {name:?}: {source}")]
    Translate { name: String, source: TranslateError },
    #[error("cannot write YAML: {0}")]
    Serialize(yaml::YamlError),
}

impl RenderError {
    /// A short stable label, as every error enum has.
    pub fn label(&self) -> &'static str {
        match self {
            RenderError::Read { .. } => "read",
            RenderError::Event { .. } => "event",
            RenderError::Workflow { .. } => "workflow",
            RenderError::UnknownWorkflow { .. } => "unknown_workflow",
            RenderError::Usage(_) => "usage",
            RenderError::Config(_) => "config",
            RenderError::Translate { .. } => "translate",
            RenderError::Serialize(_) => "serialize",
        }
    }

    fn exit_code(&self) -> ExitCode {
        match self {
            RenderError::Serialize(_) => ExitCode::FAILURE,
            _ => ExitCode::from(2),
        }
    }
}

/// Run the command: YAML documents on stdout, or one error on stderr and nothing on stdout.
pub fn run(args: &RenderArgs) -> ExitCode {
    let result = Config::for_render(|k| std::env::var(k).ok(), |p| std::fs::read_to_string(p))
        .map_err(RenderError::from)
        .and_then(|config| render(args, &config));
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// Render to the text `run` prints.
pub fn render(args: &RenderArgs, config: &Config) -> Result<String, RenderError> {
    let mut settings = TranslateSettings::from(config);
    if let Some(layout) = &args.layout {
        settings.layout = Layout::parse(layout)
            .ok_or_else(|| RenderError::Usage(format!("--layout {layout:?}: use per-step or packed")))?;
    }
    if let Some(ns) = &args.namespace {
        if !crate::naming::is_dns1123_label(ns) {
            return Err(RenderError::Usage(format!("--namespace {ns:?} is not a valid namespace name")));
        }
        settings.namespace = Some(ns.clone());
    }
    let runs = match (&args.event, &args.workflow_file) {
        (Some(path), _) => runs_from_event(path, &read(path)?, args)?,
        (None, Some(path)) => vec![run_from_workflow_file(path, &read(path)?, args)?],
        (None, None) => return Err(RenderError::Usage("pass --event FILE or --workflow-file FILE".into())),
    };
    let mut docs = Vec::with_capacity(runs.len());
    for run in &runs {
        docs.push(render_one(run, &settings)?);
    }
    let mut out = String::new();
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&yaml::to_string(&doc).map_err(RenderError::Serialize)?);
    }
    Ok(out)
}

fn render_one(run: &WorkflowRun, settings: &TranslateSettings) -> Result<PipelineRun, RenderError> {
    translate(&TranslateInput { run, secret_keys: &[], queued: false }, settings)
        .map_err(|source| RenderError::Translate { name: run.spec.workflow.clone(), source })
}

fn read(path: &Path) -> Result<String, RenderError> {
    std::fs::read_to_string(path).map_err(|source| RenderError::Read { path: path.to_owned(), source })
}

/// A WorkflowRun as intake would create it (no uid yet, so no ownerReference).
pub fn workflow_run(knot: &str, rkey: &str, trigger: TriggerSpec, wf: crate::model::Workflow) -> WorkflowRun {
    let spec = WorkflowRunSpec::new(knot, rkey, trigger, wf);
    WorkflowRun::new(&crate::naming::run_name(&spec.workflow_id()), spec)
}

fn runs_from_event(path: &Path, text: &str, args: &RenderArgs) -> Result<Vec<WorkflowRun>, RenderError> {
    let event_err = |source| RenderError::Event { path: path.to_owned(), source };
    let envelope = KnotEnvelope::parse(text).map_err(event_err)?;
    if envelope.nsid != crate::model::pipeline::PIPELINE_NSID {
        return Err(event_err(ModelError::Invalid(format!(
            "nsid is {:?}, not {:?}",
            envelope.nsid,
            crate::model::pipeline::PIPELINE_NSID
        ))));
    }
    let record = envelope.pipeline().map_err(event_err)?;
    let meta = record.trigger().map_err(event_err)?;
    let trigger = TriggerSpec::from_metadata(meta).map_err(|m| event_err(ModelError::Invalid(m)))?;
    let knot = args.knot.clone().unwrap_or_else(|| trigger.repo.knot.clone());
    let workflows: Vec<_> = record.workflows.iter().flatten().collect();
    let selected: Vec<_> = match &args.workflow {
        Some(name) => {
            let found: Vec<_> = workflows.iter().filter(|w| &w.name == name).copied().collect();
            if found.is_empty() {
                let available = workflows.iter().map(|w| w.name.as_str()).collect::<Vec<_>>().join(", ");
                return Err(RenderError::UnknownWorkflow { name: name.clone(), available });
            }
            found
        }
        None => workflows,
    };
    if selected.is_empty() {
        return Err(event_err(ModelError::Invalid("the pipeline has no workflows".into())));
    }
    selected
        .into_iter()
        .map(|w| {
            let wf = workflow::parse(w)
                .map_err(|source| RenderError::Workflow { name: w.name.clone(), source })?;
            Ok(workflow_run(&knot, &envelope.rkey, trigger.clone(), wf))
        })
        .collect()
}

/// Engine and clone options as the knot copies them out of the file.
pub fn workflow_from_file(
    name: &str,
    text: &str,
    engine: Option<&str>,
) -> Result<crate::model::Workflow, WorkflowError> {
    if text.len() > MAX_RAW_BYTES {
        return Err(WorkflowError::TooLarge(text.len()));
    }
    let value: yaml::Value = yaml::from_str(text).map_err(WorkflowError::Yaml)?;
    let engine_name = match (engine, value.get("engine")) {
        (Some(e), _) => e.to_owned(),
        (None, Some(yaml::Value::String(e))) => e.clone(),
        (None, Some(_)) => return Err(WorkflowError::Invalid("`engine` must be a string".into())),
        (None, None) => {
            return Err(WorkflowError::Invalid(
                "the workflow has no `engine`: add one (nixery, kubernetes, docker) or pass --engine".into(),
            ));
        }
    };
    let engine = Engine::parse(&engine_name)?;
    let clone: CloneOptions = match value.get("clone") {
        None | Some(yaml::Value::Null) => CloneOptions::default(),
        Some(c) => yaml::from_value(c.clone())
            .map_err(|e| WorkflowError::Invalid(format!("clone: {}", e.message)))?,
    };
    workflow::parse_with_engine(name, engine, clone, text)
}

fn run_from_workflow_file(path: &Path, text: &str, args: &RenderArgs) -> Result<WorkflowRun, RenderError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("workflow.yml").to_owned();
    let wf = workflow_from_file(&name, text, args.engine.as_deref())
        .map_err(|source| RenderError::Workflow { name: name.clone(), source })?;
    let usage = |m: &str| RenderError::Usage(m.to_owned());
    let repo = args.repo.as_deref().ok_or_else(|| usage("--workflow-file needs --repo DID/NAME"))?;
    let (did, repo_name) = repo
        .split_once('/')
        .filter(|(d, r)| d.starts_with("did:") && !r.is_empty() && !r.contains('/'))
        .ok_or_else(|| {
            RenderError::Usage(format!("--repo {repo:?}: use DID/NAME, e.g. did:plc:abc/hello"))
        })?;
    let knot = args
        .knot
        .as_deref()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| usage("--workflow-file needs --knot HOST"))?;
    let kind = TriggerKind::parse(&args.trigger).ok_or_else(|| {
        RenderError::Usage(format!("--trigger {:?}: use push, pull_request or manual", args.trigger))
    })?;
    let sha =
        || args.sha.clone().ok_or_else(|| usage("--sha is required for push and pull_request triggers"));
    let mut trigger = TriggerSpec {
        kind,
        repo: TriggerRepo {
            knot: knot.to_owned(),
            did: did.to_owned(),
            repo: repo_name.to_owned(),
            default_branch: String::new(),
        },
        push: None,
        pull_request: None,
        manual: None,
    };
    match kind {
        TriggerKind::Push => {
            trigger.push =
                Some(PushTrigger { ref_: args.git_ref.clone(), new_sha: sha()?, old_sha: "0".repeat(40) });
        }
        TriggerKind::PullRequest => {
            trigger.pull_request = Some(PullRequestTrigger {
                source_branch: args.git_ref.strip_prefix("refs/heads/").unwrap_or(&args.git_ref).to_owned(),
                target_branch: args.target_branch.clone(),
                source_sha: sha()?,
                action: "create".into(),
            });
        }
        TriggerKind::Manual => trigger.manual = Some(ManualTrigger::default()),
    }
    Ok(workflow_run(knot, &args.rkey, trigger, wf))
}
