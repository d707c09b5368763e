//! The WorkflowRun controller: reconcile into Tekton PipelineRuns, map their status, queue, cancel,
//! clean up.
//!
//! [`run`] is what `bobbin serve` calls: startup checks, then (while this replica holds the
//! Lease) the kube-runtime controller and the queue promoter, until shutdown:
//!
//! ```ignore
//! let metrics = Arc::new(controller::metrics::ControllerMetrics::default());
//! metrics.register(&mut registry);
//! let namespace = config.namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
//! let deps = controller::Deps {
//!     client, config, namespace, store, secrets, ready, metrics,
//!     on_run_started: Arc::new(move |started| { /* spawn the log follower */ }),
//!     identity: controller::default_identity(),
//! };
//! controller::run(deps, shutdown).await?; // Err only from the startup checks
//! ```

pub mod cleanup;
pub mod leader;
pub mod metrics;
pub mod queue;
pub mod reconcile;
pub mod startup;
pub mod status;

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod manifest_checks;
#[cfg(test)]
pub(crate) mod mock;
#[cfg(test)]
mod scenarios;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;

pub use reconcile::{Context, RunHook, StartedRun};
pub use startup::StartupError;

use crate::config::Config;
use crate::crd::WorkflowRun;
use crate::secrets::SecretValues;
use crate::store::Store;
use crate::tekton::{PipelineRun, TaskRun};
use metrics::ControllerMetrics;
use queue::{MANAGED_BY, QueueKick};

/// Finalizer that lets a deleted, unfinished run be cancelled and reported before it goes.
pub const FINALIZER: &str = "bobbin.dev/workflowrun";
/// Label bobbin adds to each PipelineRun naming its WorkflowRun; Tekton copies it onto TaskRuns and
/// Pods, which is how their changes find the run.
pub const RUN_LABEL: &str = "bobbin.dev/workflowrun";
/// How long a Lease holds without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);

/// What `bobbin serve` hands the controller.
pub struct Deps {
    pub client: Client,
    pub config: Arc<Config>,
    /// Where WorkflowRuns, PipelineRuns, Secrets and the Lease live.
    pub namespace: String,
    pub store: Store,
    pub secrets: Arc<dyn SecretValues>,
    /// Set once the startup checks passed (`/readyz`).
    pub ready: Arc<AtomicBool>,
    pub metrics: Arc<ControllerMetrics>,
    /// Starts the log follower for a run whose steps started.
    pub on_run_started: RunHook,
    /// Unique per process; see [`default_identity`].
    pub identity: String,
}

/// `<pod name>-<random>`: unique even when a pod restarts with the same name.
pub fn default_identity() -> String {
    let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "bobbin".into());
    let mut bytes = [0u8; 4];
    let suffix = match getrandom::getrandom(&mut bytes) {
        Ok(()) => bytes.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        Err(_) => std::process::id().to_string(),
    };
    format!("{host}-{suffix}")
}

/// Check the cluster, then reconcile whenever this replica leads, until `shutdown`.
pub async fn run(deps: Deps, shutdown: CancellationToken) -> Result<(), StartupError> {
    startup::check(&deps.client, &deps.namespace).await?;
    deps.ready.store(true, Ordering::SeqCst);
    let leases: Api<Lease> = Api::namespaced(deps.client.clone(), &deps.namespace);
    let elector = leader::LeaderElector::new(leases, leader::LEASE_NAME, &deps.identity, LEASE_DURATION);
    loop {
        if !elector.acquire(&shutdown).await {
            return Ok(());
        }
        let stop = CancellationToken::new();
        let lost = CancellationToken::new();
        let watcher_task = {
            let (stop, lost, shutdown) = (stop.clone(), lost.clone(), shutdown.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = lost.cancelled() => {}
                }
                stop.cancel();
            })
        };
        let holder = {
            let (elector, stop, lost) = (elector.clone(), stop.clone(), lost.clone());
            tokio::spawn(async move { elector.hold(stop, lost).await })
        };
        let kick = QueueKick::default();
        let promoter = tokio::spawn(queue::run_promoter(
            Api::namespaced(deps.client.clone(), &deps.namespace),
            deps.config.max_job_count,
            kick.clone(),
            deps.metrics.clone(),
            stop.clone(),
        ));
        let ctx = Arc::new(Context::new(
            deps.client.clone(),
            deps.namespace.clone(),
            &deps.config,
            deps.store.clone(),
            deps.secrets.clone(),
            kick,
            deps.metrics.clone(),
            deps.on_run_started.clone(),
        ));
        run_controller(ctx, stop.clone()).await;
        stop.cancel();
        for task in [watcher_task, holder, promoter] {
            let _ = task.await;
        }
        if let Err(e) = elector.release().await {
            tracing::warn!(error = %e, "could not release the lease");
        }
        if shutdown.is_cancelled() {
            return Ok(());
        }
        tracing::warn!("leadership lost; waiting to lead again");
    }
}

/// The kube-runtime controller over WorkflowRuns, their PipelineRuns and TaskRuns, until `stop`.
/// Every watch goes through `DeserializeGuard`, so one malformed object never stalls it.
pub async fn run_controller(ctx: Arc<Context>, stop: CancellationToken) {
    let client = ctx.client.clone();
    let ns = ctx.namespace.clone();
    let runs: Api<DeserializeGuard<WorkflowRun>> = Api::namespaced(client.clone(), &ns);
    let prs: Api<DeserializeGuard<PipelineRun>> = Api::namespaced(client.clone(), &ns);
    let trs: Api<DeserializeGuard<TaskRun>> = Api::namespaced(client, &ns);
    let managed = watcher::Config::default().labels(MANAGED_BY);
    let mapper_ns = ns.clone();
    Controller::new(runs, watcher::Config::default())
        .owns(prs, managed.clone())
        .watches(trs, managed, move |tr| {
            tr.labels().get(RUN_LABEL).map(|name| ObjectRef::new(name).within(&mapper_ns))
        })
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(run = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "controller event"),
            }
        })
        .await;
}
