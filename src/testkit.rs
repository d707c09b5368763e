//! Test fixture builders on the real types, shared by every module's tests. The base is the run the
//! recorded fixtures came from: a push of `hello-spindle` on knot1 running `test.yml`; each test
//! adjusts only what it is about.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use crate::crd::{TriggerKind, TriggerSpec, WorkflowRun, WorkflowRunSpec, WorkflowRunStatus};
use crate::model::pipeline::{PushTrigger, TriggerRepo};
use crate::model::{CloneOptions, Engine, StatusKind, Step};
use crate::plan::{Plan, PlanSettings};

/// The namespace test runs live in.
pub const NAMESPACE: &str = "bobbin-test";

/// A step running `command`, with no environment of its own.
fn step(name: &str, command: &str) -> Step {
    Step { name: name.into(), command: command.into(), environment: BTreeMap::new() }
}

impl TriggerSpec {
    /// The push of `refs/heads/main` in the recorded knot fixtures.
    pub fn test_push() -> Self {
        TriggerSpec {
            kind: TriggerKind::Push,
            repo: TriggerRepo {
                knot: "knot1.tangled.sh".into(),
                did: "did:plc:rjnvgfygwwqc5hyfsxmecosf".into(),
                repo: "hello-spindle".into(),
                default_branch: String::new(),
            },
            push: Some(PushTrigger {
                ref_: "refs/heads/main".into(),
                new_sha: "356a192b7913b04c54574d18c28d46e6395428ab".into(),
                old_sha: "b6589fc6ab0dc82cf12099d1c2d40ab994e8410c".into(),
            }),
            pull_request: None,
            manual: None,
        }
    }
}

impl WorkflowRunSpec {
    /// A push-triggered run of `test.yml` on knot1 in `alpine:3.20`, with no steps and no secrets.
    pub fn test(engine: Engine) -> Self {
        WorkflowRunSpec {
            knot: "knot1.tangled.sh".into(),
            pipeline_rkey: "3m734z2gwll22".into(),
            workflow: "test.yml".into(),
            trigger: TriggerSpec::test_push(),
            engine,
            image: Some("alpine:3.20".into()),
            architecture: None,
            clone: CloneOptions::default(),
            dependencies: BTreeMap::new(),
            environment: BTreeMap::new(),
            steps: Vec::new(),
            timeout: None,
            secret_name: None,
            cancel: false,
        }
    }

    pub fn with_image(mut self, image: &str) -> Self {
        self.image = Some(image.into());
        self
    }

    /// User steps `(name, command)`.
    pub fn with_commands(mut self, steps: &[(&str, &str)]) -> Self {
        self.steps = steps.iter().map(|(name, command)| step(name, command)).collect();
        self
    }
}

impl WorkflowRun {
    /// A `kubernetes`-engine [`WorkflowRunSpec::test`] run with no steps yet, as intake would
    /// create it (named, in [`NAMESPACE`], with a uid and creation time).
    pub fn test(name: &str) -> Self {
        let mut run = WorkflowRun::new(name, WorkflowRunSpec::test(Engine::Kubernetes));
        run.metadata = ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NAMESPACE.into()),
            uid: Some(format!("uid-{name}")),
            generation: Some(1),
            resource_version: Some("1".into()),
            creation_timestamp: Some(Time("2026-11-21T12:00:00Z".parse().expect("timestamp"))),
            ..ObjectMeta::default()
        };
        run
    }

    /// User steps named `names`, each running `echo <name>`.
    pub fn with_steps(mut self, names: &[&str]) -> Self {
        self.spec.steps = names.iter().map(|n| step(n, &format!("echo {n}"))).collect();
        self
    }

    /// User steps `(name, command)`.
    pub fn with_commands(mut self, steps: &[(&str, &str)]) -> Self {
        self.spec = self.spec.with_commands(steps);
        self
    }

    pub fn in_namespace(mut self, namespace: &str) -> Self {
        self.metadata.namespace = Some(namespace.into());
        self
    }

    pub fn with_uid(mut self, uid: &str) -> Self {
        self.metadata.uid = Some(uid.into());
        self
    }

    /// A reference to the per-run Secret `name`.
    pub fn with_secret(mut self, name: &str) -> Self {
        self.spec.secret_name = Some(name.into());
        self
    }

    pub fn with_phase(mut self, phase: StatusKind) -> Self {
        self.status.get_or_insert_with(WorkflowRunStatus::default).phase = Some(phase);
        self
    }

    pub fn with_status(mut self, status: WorkflowRunStatus) -> Self {
        self.status = Some(status);
        self
    }

    pub fn with_finalizer(mut self) -> Self {
        self.metadata.finalizers = Some(vec![crate::controller::FINALIZER.into()]);
        self
    }

    pub fn created_at(mut self, at: &str) -> Self {
        self.metadata.creation_timestamp = Some(Time(at.parse().expect("timestamp")));
        self
    }

    pub fn cancelled(mut self) -> Self {
        self.spec.cancel = true;
        self
    }

    /// Its plan with [`PlanSettings::test`].
    pub fn plan(&self) -> Plan {
        crate::plan::plan(&self.spec, &PlanSettings::test()).expect("plannable")
    }
}

impl PlanSettings {
    /// The operator defaults: public nixery, no dev mode, no default architecture.
    pub fn test() -> Self {
        PlanSettings {
            nixery: "nixery.tangled.sh".into(),
            dev: false,
            dev_localhost_alias: "host.docker.internal".into(),
            default_architecture: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_plan_settings_are_the_config_defaults() {
        assert_eq!(PlanSettings::test(), PlanSettings::from(&crate::config::Config::for_tests()));
    }
}
