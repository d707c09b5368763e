//! Step logs: follow Tekton step containers, mask secrets, persist NDJSON files, fan out to viewers.
//!
//! - [`line`]: the LogLine wire format;
//! - [`mask`]: secret masking;
//! - [`file`]: log files, the log-dir check (B14), truncation of re-runs (B15), retention;
//! - [`hub`]: live fan-out to `/logs` viewers;
//! - [`follower`]: reading `pods/log` per step and writing lines;
//! - [`server`]: `GET /logs/{knot}/{rkey}/{name}`.
//!
//! [`LogService`] is what the controller and `serve` hold.

#[cfg(test)]
pub(crate) mod fake;
pub mod file;
pub mod follower;
pub mod hub;
pub mod line;
pub mod mask;
pub mod metrics;
pub mod server;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::{Api, ListParams};

pub use file::check_log_dir;
pub use follower::RunTarget;
pub use hub::LogHub;
pub use line::LogLine;

use crate::crd::WorkflowRun;
use crate::plan::{Plan, PlanSettings};
use crate::store::{Store, StoreError};

/// A log failure. `label()` is stable for metrics.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log directory {path} is unusable: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("log file {path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Invalid(String),
}

impl LogError {
    pub fn label(&self) -> &'static str {
        match self {
            LogError::Dir { .. } => "log_dir",
            LogError::File { .. } => "log_file",
            LogError::Store(_) => "store",
            LogError::Kube(_) => "kube",
            LogError::Invalid(_) => "invalid",
        }
    }
}

/// Tunables of following and serving logs.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// `SPINDLE_SERVER_LOG_DIR`.
    pub dir: PathBuf,
    /// How often to look for a step's TaskRun/pod/container while it has not started.
    pub poll_interval: Duration,
    /// A log stream silent this long is reopened (kube has no read timeout of its own).
    pub idle_timeout: Duration,
    /// How often the position is saved while lines stream in (always at step boundaries).
    pub persist_interval: Duration,
    /// Longer lines are split into several data lines (never dropped).
    pub max_line_bytes: usize,
    /// Chunks a `/logs` viewer may fall behind before it is dropped.
    pub viewer_buffer: usize,
    /// `/logs` pings after this long without a line (Go: 30 s).
    pub ping_interval: Duration,
}

impl LogSettings {
    /// Defaults for `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LogSettings {
            dir: dir.into(),
            poll_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            persist_interval: Duration::from_secs(1),
            max_line_bytes: 32 * 1024,
            viewer_buffer: 1024,
            ping_interval: Duration::from_secs(30),
        }
    }
}

impl From<&crate::config::Config> for LogSettings {
    fn from(c: &crate::config::Config) -> Self {
        LogSettings::new(c.log_dir.clone())
    }
}

/// Starts and tracks one follower per workflow run. Cheap to clone.
#[derive(Clone)]
pub struct LogService {
    inner: Arc<Inner>,
}

struct Inner {
    client: kube::Client,
    store: Store,
    hub: LogHub,
    settings: LogSettings,
    /// log file → (run uid, task).
    running: Mutex<HashMap<String, (String, tokio::task::JoinHandle<()>)>>,
}

impl std::fmt::Debug for LogService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogService").field("dir", &self.inner.settings.dir).finish()
    }
}

impl LogService {
    /// `client`'s default namespace is used for runs whose metadata names none.
    pub fn new(client: kube::Client, store: Store, settings: LogSettings) -> Self {
        let hub = LogHub::new(settings.viewer_buffer);
        LogService {
            inner: Arc::new(Inner { client, store, hub, settings, running: Mutex::new(HashMap::new()) }),
        }
    }

    /// The hub `/logs` reads live lines from.
    pub fn hub(&self) -> LogHub {
        self.inner.hub.clone()
    }

    pub fn settings(&self) -> &LogSettings {
        &self.inner.settings
    }

    /// Register with `serve`'s Prometheus registry.
    pub fn metrics(&self) -> metrics::LogMetrics {
        self.inner.hub.metrics().clone()
    }

    /// State for [`server::router`].
    pub fn server_state(&self) -> server::LogsState {
        server::LogsState::new(self.inner.store.clone(), self.hub(), &self.inner.settings)
    }

    /// Make sure `run`'s log is being followed; idempotent (one follower per run). Call it from
    /// reconcile whenever the run has a PipelineRun and is not final; a run that was already
    /// followed to the end is recognised from the stored position and not followed again.
    /// Returns whether a follower was started.
    pub fn ensure_following(
        &self,
        run: &WorkflowRun,
        plan: &Plan,
        pipeline_run: &str,
    ) -> Result<bool, LogError> {
        let target = RunTarget::new(run, plan, pipeline_run, self.inner.client.default_namespace())?;
        Ok(self.start(target))
    }

    /// Start following `target` unless its run is already followed.
    pub fn start(&self, target: RunTarget) -> bool {
        let key = target.log_file();
        let mut running = self.inner.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((uid, task)) = running.get(&key) {
            if *uid == target.run_uid && !task.is_finished() {
                return false;
            }
            if *uid != target.run_uid {
                // A new run of the same workflow replaces the old run's follower.
                task.abort();
            }
        }
        let uid = target.run_uid.clone();
        let follower = follower::Follower::new(
            self.inner.client.clone(),
            self.inner.store.clone(),
            self.inner.hub.clone(),
            self.inner.settings.clone(),
            target,
        );
        let hub = self.inner.hub.clone();
        let file = key.clone();
        let task = tokio::spawn(async move {
            hub.metrics().followers.inc();
            if let Err(e) = follower.run().await {
                tracing::error!(error = %e, label = e.label(), file = %file, "log follower stopped");
                hub.metrics().follower_failures.inc();
                hub.writer_done(&file);
            }
            hub.metrics().followers.dec();
            hub.gc();
        });
        running.insert(key, (uid, task));
        true
    }

    /// Whether a follower for `log_file` is running.
    pub fn is_following(&self, log_file: &str) -> bool {
        let running = self.inner.running.lock().unwrap_or_else(|p| p.into_inner());
        running.get(log_file).is_some_and(|(_, t)| !t.is_finished())
    }

    /// After a restart: follow every WorkflowRun in `namespace` that has a PipelineRun and is
    /// either still running or has an unfinished stored position. Returns how many were started.
    pub async fn resume_all(&self, namespace: &str, plan_settings: &PlanSettings) -> Result<usize, LogError> {
        let unfinished: HashMap<String, String> = self
            .inner
            .store
            .unfinished_log_positions()
            .await?
            .into_iter()
            .map(|p| (p.log_file, p.run_uid))
            .collect();
        let api: Api<WorkflowRun> = Api::namespaced(self.inner.client.clone(), namespace);
        let mut started = 0;
        for run in api.list(&ListParams::default()).await?.items {
            let Some(pr) = run.status.as_ref().and_then(|s| s.pipeline_run_name.clone()) else { continue };
            let key = run.workflow_id().log_file_name();
            let pending = unfinished.get(&key).is_some_and(|uid| Some(uid) == run.metadata.uid.as_ref());
            if run.phase().is_final() && !pending {
                continue;
            }
            let plan = match crate::plan::plan(&run.spec, plan_settings) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, run = ?run.metadata.name, "cannot plan run; not following its log");
                    continue;
                }
            };
            match self.ensure_following(&run, &plan, &pr) {
                Ok(true) => started += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, run = ?run.metadata.name, "not following run's log"),
            }
        }
        Ok(started)
    }
}
