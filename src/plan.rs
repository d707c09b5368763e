//! The step plan of a workflow run: which steps exist, in which order, with which log `step_id`,
//! name, kind and command, and which Tekton task (per-step layout) or Tekton step (packed layout)
//! runs each one.
//!
//! Translation, status mapping and the log follower all read this one plan, so a step's id in the
//! logs, its entry in `WorkflowRun.status.steps[]` and its Tekton task can never disagree.
//!
//! Order (spec §4.3, §4.5, §11): the `setup` task first (for nixery it is the logged system step
//! "Configure Nix"; for image engines it only prepares the volume and is not logged), then clone
//! (omitted when `clone.skip`), then for nixery "Install custom dependencies" when a non-nixpkgs
//! registry is listed, then the user steps. Log step ids are 0-based over the logged steps.

use std::collections::BTreeMap;

use crate::crd::{StepKind, TriggerKind, TriggerSpec, WorkflowRunSpec};
use crate::model::Engine;
use crate::naming;

/// Log name of the clone step (spec §4.4).
pub const CLONE_STEP_NAME: &str = "Clone repository into workspace";
/// Log name of the nixery setup step.
pub const CONFIGURE_NIX_STEP_NAME: &str = "Configure Nix";
/// Log name of the nixery custom-dependency step.
pub const DEPENDENCIES_STEP_NAME: &str = "Install custom dependencies";

/// Pipeline task (and packed Tekton step) names for the system steps.
pub const SETUP_TASK: &str = "setup";
pub const CLONE_TASK: &str = "clone";
pub const DEPENDENCIES_TASK: &str = "dependencies";

/// What a planned step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepRole {
    /// Prepare `/tangled/workspace` and `/tangled/home` (and nix, for nixery).
    Setup,
    Clone,
    /// nixery: `nix profile install` of packages from custom registries.
    Dependencies,
    /// The user's step at this index of `spec.steps`.
    User(usize),
}

/// One step of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedStep {
    /// `step_id` in the log; `None` for the image engines' setup, which is not shown to users.
    pub log_id: Option<usize>,
    /// Control-line `content`: the step name.
    pub name: String,
    pub kind: StepKind,
    /// Control-line `step_command`; for user steps exactly the YAML `command`.
    pub command: String,
    pub role: StepRole,
    /// Pipeline task name in the per-step layout, Tekton step name in the packed layout.
    pub task: String,
    /// Step-level environment (user `environment`, or the nix variables of the dependency step).
    pub environment: BTreeMap<String, String>,
}

/// The whole plan of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The image user steps (and nixery system steps) run in.
    pub image: String,
    /// `kubernetes.io/arch` to schedule on, if any.
    pub architecture: Option<String>,
    /// Every step in execution order, logged or not.
    pub steps: Vec<PlannedStep>,
}

impl Plan {
    /// The steps users see in logs, in `step_id` order.
    pub fn logged(&self) -> impl Iterator<Item = &PlannedStep> {
        self.steps.iter().filter(|s| s.log_id.is_some())
    }

    /// The step run by pipeline task (or packed Tekton step) `task`.
    pub fn by_task(&self, task: &str) -> Option<&PlannedStep> {
        self.steps.iter().find(|s| s.task == task)
    }

    /// Whether the nix store must live on the workspace volume (so that `nix profile install` in
    /// one container is visible to the next).
    pub fn needs_shared_nix_store(&self) -> bool {
        self.steps.iter().any(|s| s.role == StepRole::Dependencies)
    }
}

/// Settings the plan depends on (a subset of [`crate::config::Config`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanSettings {
    /// Nixery registry host, optionally with a path (`SPINDLE_NIXERY_PIPELINES_NIXERY`).
    pub nixery: String,
    /// Dev mode: `http://` clone URLs with `localhost` replaced by `dev_localhost_alias`.
    pub dev: bool,
    pub dev_localhost_alias: String,
    pub default_architecture: Option<String>,
}

impl From<&crate::config::Config> for PlanSettings {
    fn from(c: &crate::config::Config) -> Self {
        PlanSettings {
            nixery: c.nixery.clone(),
            dev: c.dev,
            dev_localhost_alias: c.dev_localhost_alias.clone(),
            default_architecture: c.default_architecture.clone(),
        }
    }
}

/// Errors that make a WorkflowRun unplannable (possible only for hand-written WorkflowRuns; intake
/// rejects these before creating one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("engine {0:?} needs an image: set spec.image")]
    MissingImage(String),
    #[error("the workflow has no steps")]
    NoSteps,
}

/// Build the plan for a WorkflowRun.
pub fn plan(spec: &WorkflowRunSpec, settings: &PlanSettings) -> Result<Plan, PlanError> {
    if spec.steps.is_empty() {
        return Err(PlanError::NoSteps);
    }
    let architecture = spec.architecture.clone().or_else(|| settings.default_architecture.clone());
    let image = match spec.engine {
        Engine::Nixery => nixery_image(&settings.nixery, architecture.as_deref(), &spec.dependencies),
        engine => spec
            .image
            .clone()
            .filter(|i| !i.trim().is_empty())
            .ok_or_else(|| PlanError::MissingImage(engine.as_str().to_owned()))?,
    };

    let mut steps = Vec::with_capacity(spec.steps.len() + 3);
    let nixery = spec.engine == Engine::Nixery;
    let custom_deps = custom_dependencies(&spec.dependencies);
    steps.push(PlannedStep {
        log_id: None,
        name: if nixery { CONFIGURE_NIX_STEP_NAME.into() } else { "Prepare workspace".into() },
        kind: StepKind::System,
        command: setup_command(nixery && !custom_deps.is_empty()),
        role: StepRole::Setup,
        task: SETUP_TASK.into(),
        environment: BTreeMap::new(),
    });
    if !spec.clone.skip {
        let (name, command) = match clone_command(&spec.trigger, spec.clone, settings) {
            Ok(command) => (CLONE_STEP_NAME.to_owned(), command),
            Err(reason) => (
                format!("{CLONE_STEP_NAME} (error)"),
                format!("echo 'Failed to get clone info: {reason}' && exit 1"),
            ),
        };
        steps.push(PlannedStep {
            log_id: None,
            name,
            kind: StepKind::System,
            command,
            role: StepRole::Clone,
            task: CLONE_TASK.into(),
            environment: BTreeMap::new(),
        });
    }
    if nixery && !custom_deps.is_empty() {
        steps.push(PlannedStep {
            log_id: None,
            name: DEPENDENCIES_STEP_NAME.into(),
            kind: StepKind::System,
            command: format!(
                "nix --extra-experimental-features nix-command --extra-experimental-features flakes profile install {}",
                custom_deps.join(" ")
            ),
            role: StepRole::Dependencies,
            task: DEPENDENCIES_TASK.into(),
            environment: [("NIX_NO_COLOR", "1"), ("NIX_SHOW_DOWNLOAD_PROGRESS", "0")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        });
    }
    for (i, step) in spec.steps.iter().enumerate() {
        steps.push(PlannedStep {
            log_id: None,
            name: step.name.clone(),
            kind: StepKind::User,
            command: step.command.clone(),
            role: StepRole::User(i),
            task: user_task_name(i, &step.name),
            environment: step.environment.clone(),
        });
    }

    let mut next_id = 0;
    for step in &mut steps {
        let logged = step.role != StepRole::Setup || nixery;
        if logged {
            step.log_id = Some(next_id);
            next_id += 1;
        }
    }
    Ok(Plan { image, architecture, steps })
}

/// `step-<n>-<slug>`, 1-based, a DNS-1123 label short enough for Tekton to derive TaskRun and pod
/// names from it.
pub fn user_task_name(index: usize, name: &str) -> String {
    let prefix = format!("step-{}", index + 1);
    let slug = naming::dns_label_prefix(name, 40 - prefix.len() - 1);
    if slug.is_empty() { prefix } else { format!("{prefix}-{slug}") }
}

/// What the setup step runs (also its `step_command`). With a shared nix store, the image's `/nix`
/// is copied onto the workspace volume, where later containers mount it writable.
fn setup_command(shared_nix_store: bool) -> String {
    let mut lines = vec!["mkdir -p /tangled/workspace /tangled/home".to_owned()];
    if shared_nix_store {
        lines.push("mkdir -p /tangled/.nix && cp -a /nix/. /tangled/.nix/".to_owned());
    }
    lines.join("\n")
}

/// `'R#P'` words for every package of every non-`nixpkgs` registry (a registry with no packages is
/// the bare word `R`), in registry then package order.
fn custom_dependencies(deps: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    let mut words = Vec::new();
    for (registry, packages) in deps.iter().filter(|(r, _)| r.as_str() != "nixpkgs") {
        if packages.is_empty() {
            words.push(registry.clone());
        }
        for p in packages {
            words.push(format!("'{registry}#{p}'"));
        }
    }
    words
}

/// `<NIXERY>/[arm64/]<nixpkgs packages>/bash/git/coreutils/nix`, cleaned like Go's `path.Join`.
pub fn nixery_image(
    nixery: &str,
    architecture: Option<&str>,
    deps: &BTreeMap<String, Vec<String>>,
) -> String {
    let mut parts: Vec<&str> = vec![nixery];
    if architecture == Some("arm64") {
        parts.push("arm64");
    }
    if let Some(pkgs) = deps.get("nixpkgs") {
        parts.extend(pkgs.iter().map(String::as_str));
    }
    parts.extend(["bash", "git", "coreutils", "nix"]);
    clean_path(&parts.join("/"))
}

/// Go's `path.Clean` for a relative path: drop empty and `.` parts, resolve `..`.
fn clean_path(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if out.last().is_some_and(|l| *l != "..") {
                    out.pop();
                } else {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out.join("/")
}

/// The repository URL the clone step fetches (spec §4.4).
pub fn clone_url(trigger: &TriggerSpec, settings: &PlanSettings) -> String {
    let repo = &trigger.repo;
    if settings.dev {
        let host = repo.knot.replace("localhost", &settings.dev_localhost_alias);
        format!("http://{host}/{}/{}", repo.did, repo.repo)
    } else {
        format!("https://{}/{}/{}", repo.knot, repo.did, repo.repo)
    }
}

/// The clone step's commands joined with `\n` (spec §4.4), plus the submodule checkout Go forgets
/// (bug B21). `Err` carries Go's reason text for the error variant.
pub fn clone_command(
    trigger: &TriggerSpec,
    clone: crate::model::CloneOptions,
    settings: &PlanSettings,
) -> Result<String, String> {
    let sha = match trigger.kind {
        TriggerKind::Push => {
            Some(trigger.push.as_ref().ok_or("push trigger metadata is nil")?.new_sha.clone())
        }
        TriggerKind::PullRequest => Some(
            trigger.pull_request.as_ref().ok_or("pull request trigger metadata is nil")?.source_sha.clone(),
        ),
        TriggerKind::Manual => None,
    };
    let depth = clone.effective_depth();
    let mut fetch = format!("git fetch --depth={depth}");
    if clone.submodules {
        fetch.push_str(" --recurse-submodules=yes");
    }
    fetch.push_str(" origin");
    if let Some(sha) = sha {
        fetch.push(' ');
        fetch.push_str(&sha);
    }
    let mut lines = vec![
        "git init".to_owned(),
        format!("git remote add origin {}", clone_url(trigger, settings)),
        fetch,
        "git checkout FETCH_HEAD".to_owned(),
    ];
    if clone.submodules {
        lines.push(format!("git submodule update --init --recursive --depth={depth}"));
    }
    Ok(lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CloneOptions;

    /// The spec the fixture log came from: two Go steps in the Go image.
    fn spec(engine: Engine) -> WorkflowRunSpec {
        WorkflowRunSpec::test(engine)
            .with_image("golang:1.25-bookworm")
            .with_commands(&[("Build", "go build ./..."), ("Test", "go test ./...")])
    }

    #[test]
    fn image_engine_logs_clone_then_user_steps_like_the_fixture() {
        let plan = plan(&spec(Engine::Kubernetes), &PlanSettings::test()).expect("plan");
        let logged: Vec<_> =
            plan.logged().map(|s| (s.log_id, s.name.as_str(), s.kind, s.task.as_str())).collect();
        assert_eq!(
            logged,
            [
                (Some(0), CLONE_STEP_NAME, StepKind::System, "clone"),
                (Some(1), "Build", StepKind::User, "step-1-build"),
                (Some(2), "Test", StepKind::User, "step-2-test"),
            ]
        );
        assert_eq!(plan.steps[0].task, SETUP_TASK);
        // The exact step_command of the fixture log's clone step.
        assert_eq!(
            plan.steps[1].command,
            "git init\ngit remote add origin https://knot1.tangled.sh/did:plc:rjnvgfygwwqc5hyfsxmecosf/hello-spindle\ngit fetch --depth=1 origin 356a192b7913b04c54574d18c28d46e6395428ab\ngit checkout FETCH_HEAD"
        );
    }

    #[test]
    fn nixery_numbers_steps_like_go() {
        let mut s = spec(Engine::Nixery);
        s.dependencies = [
            ("nixpkgs".to_owned(), vec!["go".to_owned(), "gnumake".to_owned()]),
            ("git+https://tangled.org/@example.com/my_pkg".to_owned(), vec!["my_pkg".to_owned()]),
        ]
        .into();
        let plan = plan(&s, &PlanSettings::test()).expect("plan");
        assert_eq!(plan.image, "nixery.tangled.sh/go/gnumake/bash/git/coreutils/nix");
        let names: Vec<_> = plan.logged().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [CONFIGURE_NIX_STEP_NAME, CLONE_STEP_NAME, DEPENDENCIES_STEP_NAME, "Build", "Test"]
        );
        assert_eq!(
            plan.steps[2].command,
            "nix --extra-experimental-features nix-command --extra-experimental-features flakes profile install 'git+https://tangled.org/@example.com/my_pkg#my_pkg'"
        );
        assert!(plan.needs_shared_nix_store());
    }

    #[test]
    fn nixery_image_matches_go_path_join() {
        let deps: BTreeMap<String, Vec<String>> =
            [("nixpkgs".to_owned(), vec!["a/../b".to_owned(), "".to_owned()])].into();
        assert_eq!(
            nixery_image("nixery.tangled.sh", Some("arm64"), &deps),
            "nixery.tangled.sh/arm64/b/bash/git/coreutils/nix"
        );
        assert_eq!(nixery_image("host/path", None, &BTreeMap::new()), "host/path/bash/git/coreutils/nix");
    }

    #[test]
    fn clone_variants() {
        let mut s = spec(Engine::Kubernetes);
        s.clone = CloneOptions { skip: false, depth: 50, submodules: true };
        let cmd = clone_command(&s.trigger, s.clone, &PlanSettings::test()).expect("ok");
        assert!(cmd.contains("git fetch --depth=50 --recurse-submodules=yes origin 356a"), "{cmd}");
        assert!(cmd.ends_with("git submodule update --init --recursive --depth=50"), "{cmd}");

        s.trigger.kind = TriggerKind::Manual;
        let cmd = clone_command(&s.trigger, CloneOptions::default(), &PlanSettings::test()).expect("ok");
        assert!(cmd.contains("git fetch --depth=1 origin\n"), "{cmd}");

        s.trigger.kind = TriggerKind::PullRequest;
        assert_eq!(
            clone_command(&s.trigger, CloneOptions::default(), &PlanSettings::test()),
            Err("pull request trigger metadata is nil".into())
        );
        let p = plan(&s, &PlanSettings::test()).expect("plan");
        assert_eq!(p.steps[1].name, "Clone repository into workspace (error)");
        assert_eq!(
            p.steps[1].command,
            "echo 'Failed to get clone info: pull request trigger metadata is nil' && exit 1"
        );

        s.clone.skip = true;
        let p = plan(&s, &PlanSettings::test()).expect("plan");
        assert!(p.steps.iter().all(|st| st.role != StepRole::Clone));
        assert_eq!(p.logged().next().map(|st| st.name.as_str()), Some("Build"));

        let dev = PlanSettings { dev: true, ..PlanSettings::test() };
        s.trigger.repo.knot = "localhost:3000".into();
        assert_eq!(
            clone_url(&s.trigger, &dev),
            "http://host.docker.internal:3000/did:plc:rjnvgfygwwqc5hyfsxmecosf/hello-spindle"
        );
    }

    #[test]
    fn user_task_names_are_short_labels() {
        assert_eq!(user_task_name(0, "Build"), "step-1-build");
        assert_eq!(user_task_name(11, "!!!"), "step-12");
        let long = user_task_name(2, &"Lint and build everything ".repeat(5));
        assert!(naming::is_dns1123_label(&long) && long.len() <= 40, "{long}");
        assert!(
            plan(&WorkflowRunSpec { image: None, ..spec(Engine::Docker) }, &PlanSettings::test()).is_err()
        );
    }
}
