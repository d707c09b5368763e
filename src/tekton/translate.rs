//! WorkflowRun → Tekton `PipelineRun` (`tekton.dev/v1`): a pure function of the run, the names of
//! its secrets and the settings, golden-tested.
//!
//! Both layouts run the steps of [`crate::plan::plan`] in plan order:
//! - per-step: one pipeline task per planned step (`setup`, `clone`, `step-N-…`), chained with
//!   `runAfter`, each with one Tekton step (`setup`, `clone`, `run`), sharing a `workspace` PVC
//!   from a `volumeClaimTemplate` mounted at `/tangled`;
//! - packed: one pipeline task `workflow` whose Tekton steps are named after the planned tasks, with
//!   an `emptyDir` workspace.
//!
//! Environment of every container (spec §5.6), each name once: `HOME=/tangled/home` > step env >
//! secrets (`secretKeyRef` into the per-run Secret, never values) > workflow env > image-level
//! defaults (for nixery images: `PATH` with the user's nix profile first, and `NIX_CONFIG`).
//!
//! Resources (Loom-style `resourceProfiles` in the config file): the first profile whose
//! `nodeSelector` is satisfied by the run's node selector (`kubernetes.io/arch`, when the workflow
//! or the default architecture names one; a profile with an empty selector matches every run) gives
//! `computeResources` to the workload containers (user steps and the nix dependency step). The
//! tiny system containers (setup, clone) get none. In the packed layout all steps share one pod and
//! Kubernetes sums container requests, so only the first workload step carries the requests (the
//! others request an explicit `0`, since a missing request defaults to the limit); every workload
//! step carries the limits.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Capabilities, EmptyDirVolumeSource, EnvVar, EnvVarSource, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSecurityContext, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecurityContext, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;

use super::shell;
use super::system_tasks::{self, SystemTaskError, params};
use super::types::{
    EmbeddedTask, Param, PipelineRun, PipelineRunSpec, PipelineSpec, PipelineTask,
    PipelineWorkspaceDeclaration, PodTemplate, Step, TaskRunTemplate, Timeouts, WorkspaceBinding,
    WorkspaceDeclaration, WorkspacePipelineTaskBinding, spec_status,
};
use crate::config::{Config, Layout, ResourceProfile};
use crate::crd::WorkflowRun;
use crate::model::Engine;
use crate::naming;
use crate::plan::{self, Plan, PlanError, PlanSettings, PlannedStep, StepRole};

/// Where the shared volume is mounted; `/tangled/workspace` and `/tangled/home` live on it.
pub const VOLUME_ROOT: &str = "/tangled";
pub const WORKSPACE_DIR: &str = "/tangled/workspace";
pub const HOME_DIR: &str = "/tangled/home";
/// The pipeline (and task) workspace name.
pub const WORKSPACE: &str = "workspace";
/// The one pipeline task of the packed layout.
pub const PACKED_TASK: &str = "workflow";
/// The Tekton step of a per-step user (or dependency) task.
pub const RUN_STEP: &str = "run";
/// Build user: every container runs as this UID/GID.
pub const BUILD_UID: i64 = 1000;

/// Per-step layout: the task workspace that mounts the volume's `.nix` at `/nix`.
const NIX_WORKSPACE: &str = "nix";
/// Packed layout: the volume holding the shared nix store.
const NIX_VOLUME: &str = "nix-store";
const NIX_SUBPATH: &str = ".nix";

/// `PATH` of nixery containers (spec §5.7): the user's nix profile first.
pub const NIXERY_PATH: &str = "/tangled/home/.nix-profile/bin:/nix/var/nix/profiles/default/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// What the Go spindle's "Configure Nix" writes to `/etc/nix/nix.conf`; each Tekton step is its own
/// container (and not root), so it travels as `NIX_CONFIG` instead.
pub const NIXERY_NIX_CONFIG: &str = "extra-experimental-features = nix-command flakes\nbuild-users-group = ";

/// Label and annotation keys.
pub mod keys {
    pub const KNOT: &str = "bobbin.dev/knot";
    pub const REPO_DID: &str = "bobbin.dev/repo-did";
    pub const REPO: &str = "bobbin.dev/repo";
    pub const PIPELINE: &str = "bobbin.dev/pipeline";
    pub const WORKFLOW: &str = "bobbin.dev/workflow";
    pub const TRIGGER: &str = "bobbin.dev/trigger";
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    pub const PIPELINE_URI: &str = "bobbin.dev/pipeline-uri";
    pub const COMMIT: &str = "bobbin.dev/commit";
    /// `per-step` or `packed`: how to read the run's TaskRuns, whatever the config says today.
    pub const LAYOUT: &str = "bobbin.dev/layout";
}

/// The settings translation depends on (a subset of [`Config`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TranslateSettings {
    /// Used when the WorkflowRun has no namespace.
    pub namespace: Option<String>,
    pub layout: Layout,
    /// `None` = the cluster's default StorageClass.
    pub storage_class: Option<String>,
    pub workspace_size: String,
    pub clone_image: String,
    pub setup_image: String,
    /// Timeout of nixery workflows without their own.
    pub nixery_timeout: Duration,
    /// Timeout of image-engine workflows without their own.
    pub image_timeout: Duration,
    pub resource_profiles: Vec<ResourceProfile>,
    pub plan: PlanSettings,
}

impl From<&Config> for TranslateSettings {
    fn from(c: &Config) -> Self {
        TranslateSettings {
            namespace: c.namespace.clone(),
            layout: c.layout,
            storage_class: c.storage_class.clone(),
            workspace_size: c.workspace_size.clone(),
            clone_image: c.clone_image.clone(),
            setup_image: c.setup_image.clone(),
            nixery_timeout: c.default_timeout(Engine::Nixery),
            image_timeout: c.default_timeout(Engine::Kubernetes),
            resource_profiles: c.resource_profiles.clone(),
            plan: PlanSettings::from(c),
        }
    }
}

impl TranslateSettings {
    fn default_timeout(&self, engine: Engine) -> Duration {
        match engine {
            Engine::Nixery => self.nixery_timeout,
            _ => self.image_timeout,
        }
    }

    /// First profile whose node selector `labels` satisfy (see [`Config::resource_profile`]).
    fn resource_profile(&self, labels: &BTreeMap<String, String>) -> Option<&ResourceProfile> {
        self.resource_profiles.iter().find(|p| p.node_selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }
}

/// What to translate.
#[derive(Debug, Clone, Copy)]
pub struct TranslateInput<'a> {
    pub run: &'a WorkflowRun,
    /// Names of the repo's secrets (keys of the per-run Secret); values never come here.
    pub secret_keys: &'a [String],
    /// Create the PipelineRun held (`PipelineRunPending`) because too many are running.
    pub queued: bool,
}

/// Why a WorkflowRun cannot become a PipelineRun.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("spec.timeout {value:?}: {reason}")]
    BadTimeout { value: String, reason: String },
    #[error("{field}: {name:?} is not a valid environment variable name")]
    BadEnvName { field: String, name: String },
    #[error("secret {0:?} is not a valid environment variable name")]
    BadSecretKey(String),
    #[error("architecture {0:?} cannot be a kubernetes.io/arch node selector")]
    BadArchitecture(String),
    #[error("image {0:?} contains whitespace")]
    BadImage(String),
    #[error(transparent)]
    SystemTask(#[from] SystemTaskError),
}

impl TranslateError {
    /// A short stable label for metrics and Kubernetes Events.
    pub fn label(&self) -> &'static str {
        match self {
            TranslateError::Plan(PlanError::MissingImage(_)) => "missing_image",
            TranslateError::Plan(PlanError::NoSteps) => "no_steps",
            TranslateError::BadTimeout { .. } => "bad_timeout",
            TranslateError::BadEnvName { .. } => "bad_env_name",
            TranslateError::BadSecretKey(_) => "bad_secret_key",
            TranslateError::BadArchitecture(_) => "bad_architecture",
            TranslateError::BadImage(_) => "bad_image",
            TranslateError::SystemTask(_) => "system_task",
        }
    }
}

/// The PipelineRun's (and WorkflowRun's) name.
pub fn pipeline_run_name(run: &WorkflowRun) -> String {
    naming::run_name(&run.workflow_id())
}

/// The per-run Secret the steps reference: `spec.secretName`, else the conventional name.
pub fn secret_name(run: &WorkflowRun) -> String {
    run.spec.secret_name.clone().unwrap_or_else(|| naming::secret_name(&pipeline_run_name(run)))
}

/// Labels for everything bobbin creates for a run (`kubectl get pr,pod,secret -l …`). Values that
/// are not valid label values are left to [`annotations`], except the repo DID, which is encoded.
pub fn labels(run: &WorkflowRun) -> BTreeMap<String, String> {
    let spec = &run.spec;
    let repo = &spec.trigger.repo;
    let mut labels = BTreeMap::new();
    labels.insert(keys::MANAGED_BY.to_owned(), "bobbin".to_owned());
    labels.insert(keys::REPO_DID.to_owned(), naming::encoded_label_value(&repo.did));
    labels.insert(keys::TRIGGER.to_owned(), spec.trigger.kind.as_str().to_owned());
    for (key, value) in [
        (keys::KNOT, &spec.knot),
        (keys::REPO, &repo.repo),
        (keys::PIPELINE, &spec.pipeline_rkey),
        (keys::WORKFLOW, &spec.workflow),
    ] {
        if let Some(v) = naming::label_value(value).filter(|v| !v.is_empty()) {
            labels.insert(key.to_owned(), v);
        }
    }
    labels
}

/// Annotations: exact values (the pipeline at-uri, the commit, the full repo DID, the workflow
/// name), plus the knot and repo name when they could not be labels.
pub fn annotations(run: &WorkflowRun) -> BTreeMap<String, String> {
    let spec = &run.spec;
    let mut a = BTreeMap::new();
    a.insert(keys::PIPELINE_URI.to_owned(), run.workflow_id().pipeline_uri());
    a.insert(keys::REPO_DID.to_owned(), spec.trigger.repo.did.clone());
    a.insert(keys::WORKFLOW.to_owned(), spec.workflow.clone());
    if let Some(sha) = spec.trigger.commit() {
        a.insert(keys::COMMIT.to_owned(), sha.to_owned());
    }
    for (key, value) in [(keys::KNOT, &spec.knot), (keys::REPO, &spec.trigger.repo.repo)] {
        if naming::label_value(value).is_none_or(|v| v.is_empty()) {
            a.insert(key.to_owned(), value.clone());
        }
    }
    a
}

/// The ownerReference that makes the WorkflowRun own (and garbage-collect) an object; `None`
/// before the WorkflowRun exists on a server (no uid).
pub fn owner_reference(run: &WorkflowRun) -> Option<OwnerReference> {
    let uid = run.metadata.uid.clone()?;
    Some(OwnerReference {
        api_version: WorkflowRun::api_version(&()).into_owned(),
        kind: WorkflowRun::kind(&()).into_owned(),
        name: run.metadata.name.clone().unwrap_or_else(|| pipeline_run_name(run)),
        uid,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// Object metadata shared by the PipelineRun and the per-run Secret.
pub(crate) fn object_meta(run: &WorkflowRun, name: String, namespace: Option<String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: run.metadata.namespace.clone().or(namespace),
        labels: Some(labels(run)),
        annotations: Some(annotations(run)),
        owner_references: owner_reference(run).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// Translate a WorkflowRun into its PipelineRun.
pub fn translate(
    input: &TranslateInput,
    settings: &TranslateSettings,
) -> Result<PipelineRun, TranslateError> {
    let run = input.run;
    let spec = &run.spec;
    let plan = plan::plan(spec, &settings.plan)?;
    let timeout = match &spec.timeout {
        Some(text) => crate::duration::parse(text)
            .map_err(|reason| TranslateError::BadTimeout { value: text.clone(), reason })?,
        None => settings.default_timeout(spec.engine),
    };
    if let Some(arch) =
        plan.architecture.as_ref().filter(|a| naming::label_value(a).is_none_or(|v| v.is_empty()))
    {
        return Err(TranslateError::BadArchitecture(arch.clone()));
    }
    if plan.image.chars().any(char::is_whitespace) {
        return Err(TranslateError::BadImage(plan.image.clone()));
    }
    check_env_names("spec.environment", &spec.environment)?;
    for (i, step) in spec.steps.iter().enumerate() {
        check_env_names(&format!("spec.steps[{i}].environment"), &step.environment)?;
    }
    if let Some(key) = input.secret_keys.iter().find(|k| !is_env_name(k)) {
        return Err(TranslateError::BadSecretKey(key.clone()));
    }

    let node_selector: BTreeMap<String, String> =
        plan.architecture.iter().map(|arch| ("kubernetes.io/arch".to_owned(), arch.clone())).collect();
    let ctx = Ctx {
        run,
        plan: &plan,
        settings,
        secret_name: secret_name(run),
        secret_keys: input.secret_keys,
        resources: settings.resource_profile(&node_selector).map(|p| p.resources.clone()),
        setup: system_tasks::setup()?,
        clone: system_tasks::clone()?,
    };

    let (tasks, workspace) = match settings.layout {
        Layout::PerStep => (ctx.per_step_tasks()?, ctx.volume_claim_workspace()),
        Layout::Packed => (
            vec![ctx.packed_task()?],
            WorkspaceBinding {
                name: WORKSPACE.into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..WorkspaceBinding::default()
            },
        ),
    };

    let status = if spec.cancel {
        Some(spec_status::CANCELLED.to_owned())
    } else if input.queued {
        Some(spec_status::PENDING.to_owned())
    } else {
        None
    };
    let mut metadata = object_meta(run, pipeline_run_name(run), settings.namespace.clone());
    metadata.annotations.get_or_insert_default().insert(
        keys::LAYOUT.to_owned(),
        match settings.layout {
            Layout::PerStep => "per-step",
            Layout::Packed => "packed",
        }
        .to_owned(),
    );
    Ok(PipelineRun {
        metadata,
        spec: PipelineRunSpec {
            pipeline_spec: Some(PipelineSpec {
                workspaces: vec![PipelineWorkspaceDeclaration { name: WORKSPACE.into() }],
                tasks,
            }),
            status,
            timeouts: Some(Timeouts {
                pipeline: Some(crate::duration::format(timeout)),
                ..Timeouts::default()
            }),
            task_run_template: Some(TaskRunTemplate {
                pod_template: Some(pod_template(node_selector)),
                service_account_name: None,
            }),
            workspaces: vec![workspace],
        },
        status: None,
    })
}

fn pod_template(node_selector: BTreeMap<String, String>) -> PodTemplate {
    PodTemplate {
        node_selector,
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(BUILD_UID),
            run_as_group: Some(BUILD_UID),
            fs_group: Some(BUILD_UID),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
            ..PodSecurityContext::default()
        }),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        ..PodTemplate::default()
    }
}

fn container_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
        ..SecurityContext::default()
    }
}

/// Kubernetes accepts any printable ASCII but `=` in an env name; an empty name is invalid.
fn is_env_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'=')
}

fn check_env_names(field: &str, env: &BTreeMap<String, String>) -> Result<(), TranslateError> {
    match env.keys().find(|k| !is_env_name(k)) {
        Some(name) => Err(TranslateError::BadEnvName { field: field.to_owned(), name: name.clone() }),
        None => Ok(()),
    }
}

/// One env entry before it becomes an `EnvVar`.
enum EnvValue {
    Literal(String),
    Secret,
}

/// Everything one translation needs, so the builders stay small.
struct Ctx<'a> {
    run: &'a WorkflowRun,
    plan: &'a Plan,
    settings: &'a TranslateSettings,
    secret_name: String,
    secret_keys: &'a [String],
    resources: Option<ResourceRequirements>,
    setup: EmbeddedTask,
    clone: EmbeddedTask,
}

impl Ctx<'_> {
    fn nixery(&self) -> bool {
        self.run.spec.engine == Engine::Nixery
    }

    fn shared_nix_store(&self) -> bool {
        self.plan.needs_shared_nix_store()
    }

    /// Does `step` run in the workflow's image?
    fn in_workflow_image(&self, step: &PlannedStep) -> bool {
        match step.role {
            StepRole::Setup => self.nixery(),
            StepRole::Clone => false,
            StepRole::Dependencies | StepRole::User(_) => true,
        }
    }

    /// The container env of `step`, by spec §5.6 precedence, each name once, sorted by name.
    fn env(&self, step: &PlannedStep) -> Vec<EnvVar> {
        let mut env: BTreeMap<String, EnvValue> = BTreeMap::new();
        if self.nixery() && self.in_workflow_image(step) {
            env.insert("PATH".into(), EnvValue::Literal(NIXERY_PATH.into()));
            env.insert("NIX_CONFIG".into(), EnvValue::Literal(NIXERY_NIX_CONFIG.into()));
        }
        for (k, v) in &self.run.spec.environment {
            env.insert(k.clone(), EnvValue::Literal(v.clone()));
        }
        for k in self.secret_keys {
            env.insert(k.clone(), EnvValue::Secret);
        }
        for (k, v) in &step.environment {
            env.insert(k.clone(), EnvValue::Literal(v.clone()));
        }
        env.insert("HOME".into(), EnvValue::Literal(HOME_DIR.into()));
        env.into_iter()
            .map(|(name, value)| match value {
                EnvValue::Literal(v) => {
                    EnvVar { name, value: Some(shell::escape_kubelet(&v)), value_from: None }
                }
                EnvValue::Secret => EnvVar {
                    value: None,
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            key: name.clone(),
                            name: self.secret_name.clone(),
                            optional: None,
                        }),
                        ..EnvVarSource::default()
                    }),
                    name,
                },
            })
            .collect()
    }

    /// The Tekton step for a planned step, named `name`. `requests`: whether a workload container
    /// carries the profile's requests (see the module doc for packed pods).
    fn step(&self, planned: &PlannedStep, name: &str, requests: bool) -> Step {
        let mut step = match planned.role {
            StepRole::Setup => self.setup.steps[0].clone(),
            StepRole::Clone if self.clone_ok() => self.clone.steps[0].clone(),
            // Go's clone error variant, or a workload step: the plan's command through the shell.
            _ => Step {
                image: if self.in_workflow_image(planned) {
                    self.plan.image.clone()
                } else {
                    self.settings.clone_image.clone()
                },
                command: shell::step_command(),
                args: shell::step_args(&planned.command),
                working_dir: Some(WORKSPACE_DIR.into()),
                ..Step::default()
            },
        };
        step.name = name.to_owned();
        step.env = self.env(planned);
        step.security_context = Some(container_security_context());
        if matches!(planned.role, StepRole::Dependencies | StepRole::User(_)) {
            step.compute_resources = self.resources.clone().map(|mut r| {
                if !requests {
                    // Explicit zeros: a missing request would default to the limit.
                    let names = r.limits.iter().chain(r.requests.iter()).flat_map(|m| m.keys().cloned());
                    r.requests = Some(names.map(|k| (k, Quantity("0".into()))).collect());
                }
                r
            });
        }
        step
    }

    fn clone_ok(&self) -> bool {
        plan::clone_command(&self.run.spec.trigger, self.run.spec.clone, &self.settings.plan).is_ok()
    }

    /// Param values for the system Task that runs `planned`. Values used in `args` are
    /// kubelet-escaped (the Task passes them as arguments).
    fn params(&self, planned: &PlannedStep) -> Vec<Param> {
        let p = |name: &str, value: String| Param { name: name.to_owned(), value };
        match planned.role {
            StepRole::Setup => vec![
                p(params::SETUP_IMAGE, self.setup_image()),
                p(params::SHARED_NIX_STORE, self.shared_nix_store().to_string()),
            ],
            StepRole::Clone if self.clone_ok() => {
                let spec = &self.run.spec;
                vec![
                    p(params::GIT_IMAGE, self.settings.clone_image.clone()),
                    p(
                        params::URL,
                        shell::escape_kubelet(&plan::clone_url(&spec.trigger, &self.settings.plan)),
                    ),
                    p(params::REVISION, shell::escape_kubelet(spec.trigger.commit().unwrap_or_default())),
                    p(params::DEPTH, spec.clone.effective_depth().to_string()),
                    p(params::SUBMODULES, spec.clone.submodules.to_string()),
                ]
            }
            _ => Vec::new(),
        }
    }

    /// Setup copies the image's `/nix` for a shared store, so then it must run in the nixery image.
    fn setup_image(&self) -> String {
        if self.nixery() { self.plan.image.clone() } else { self.settings.setup_image.clone() }
    }

    fn system_task_spec(&self, planned: &PlannedStep) -> Option<&EmbeddedTask> {
        match planned.role {
            StepRole::Setup => Some(&self.setup),
            StepRole::Clone if self.clone_ok() => Some(&self.clone),
            _ => None,
        }
    }

    fn volume_claim_workspace(&self) -> WorkspaceBinding {
        let s = self.settings;
        WorkspaceBinding {
            name: WORKSPACE.into(),
            volume_claim_template: Some(PersistentVolumeClaim {
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".into()]),
                    storage_class_name: s.storage_class.clone(),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some([("storage".to_owned(), Quantity(s.workspace_size.clone()))].into()),
                        limits: None,
                    }),
                    ..PersistentVolumeClaimSpec::default()
                }),
                ..PersistentVolumeClaim::default()
            }),
            ..WorkspaceBinding::default()
        }
    }

    fn per_step_tasks(&self) -> Result<Vec<PipelineTask>, TranslateError> {
        let mut tasks: Vec<PipelineTask> = Vec::with_capacity(self.plan.steps.len());
        for planned in &self.plan.steps {
            let step_name = match planned.role {
                StepRole::Setup => plan::SETUP_TASK,
                StepRole::Clone => plan::CLONE_TASK,
                _ => RUN_STEP,
            };
            let base = self.system_task_spec(planned);
            let mut workspaces = vec![WorkspacePipelineTaskBinding {
                name: WORKSPACE.into(),
                workspace: WORKSPACE.into(),
                sub_path: None,
            }];
            let mut declared =
                vec![WorkspaceDeclaration { name: WORKSPACE.into(), mount_path: Some(VOLUME_ROOT.into()) }];
            if self.shared_nix_store() && planned.role != StepRole::Setup {
                workspaces.push(WorkspacePipelineTaskBinding {
                    name: NIX_WORKSPACE.into(),
                    workspace: WORKSPACE.into(),
                    sub_path: Some(NIX_SUBPATH.into()),
                });
                declared.push(WorkspaceDeclaration {
                    name: NIX_WORKSPACE.into(),
                    mount_path: Some("/nix".into()),
                });
            }
            let task_spec = EmbeddedTask {
                description: base.and_then(|b| b.description.clone()),
                params: base.map(|b| b.params.clone()).unwrap_or_default(),
                steps: vec![self.step(planned, step_name, true)],
                workspaces: declared,
                volumes: Vec::new(),
            };
            tasks.push(PipelineTask {
                name: planned.task.clone(),
                display_name: Some(planned.name.clone()),
                params: self.params(planned),
                run_after: tasks.last().map(|t| vec![t.name.clone()]).unwrap_or_default(),
                workspaces,
                task_spec: Some(task_spec),
                timeout: None,
            });
        }
        Ok(tasks)
    }

    fn packed_task(&self) -> Result<PipelineTask, TranslateError> {
        let mut steps = Vec::with_capacity(self.plan.steps.len());
        let mut params = Vec::new();
        let mut param_specs = Vec::new();
        let mut first_workload = true;
        for planned in &self.plan.steps {
            let workload = matches!(planned.role, StepRole::Dependencies | StepRole::User(_));
            let mut step = self.step(planned, &planned.task, workload && first_workload);
            first_workload &= !workload;
            if self.shared_nix_store() {
                let mount_path = if planned.role == StepRole::Setup { "/tangled/.nix" } else { "/nix" };
                step.volume_mounts.push(VolumeMount {
                    name: NIX_VOLUME.into(),
                    mount_path: mount_path.into(),
                    ..VolumeMount::default()
                });
            }
            steps.push(step);
            if let Some(base) = self.system_task_spec(planned) {
                param_specs.extend(base.params.iter().cloned());
            }
            params.extend(self.params(planned));
        }
        let volumes = if self.shared_nix_store() {
            vec![Volume {
                name: NIX_VOLUME.into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            }]
        } else {
            Vec::new()
        };
        Ok(PipelineTask {
            name: PACKED_TASK.into(),
            display_name: Some(self.run.spec.workflow.clone()),
            params,
            run_after: Vec::new(),
            workspaces: vec![WorkspacePipelineTaskBinding {
                name: WORKSPACE.into(),
                workspace: WORKSPACE.into(),
                sub_path: None,
            }],
            task_spec: Some(EmbeddedTask {
                description: None,
                params: param_specs,
                steps,
                workspaces: vec![WorkspaceDeclaration {
                    name: WORKSPACE.into(),
                    mount_path: Some(VOLUME_ROOT.into()),
                }],
                volumes,
            }),
            timeout: None,
        })
    }
}
