//! Intake: Jetstream records and knot event streams become registered repos and WorkflowRuns.
//!
//! - [`jetstream`]: one WebSocket to Jetstream; member, repo and collaborator records from the
//!   owner and members are applied in order by [`ingest`]; the cursor is the `time_us` of the last
//!   processed event.
//! - [`knot`]: one WebSocket per knot; `sh.tangled.pipeline` events go to [`pipeline`], which
//!   validates them and creates one `WorkflowRun` per workflow (or a `failed` status).
//!
//! Both streams share [`ws`]: connect with a timeout, ping every 30 s, reconnect when no frame
//! arrived for the read deadline, jittered exponential backoff, and a bounded channel between the
//! socket reader and the processor, so a slow processor stops the reader instead of losing events.
//!
//! `serve` builds everything with [`Intake::new`] and runs [`Intake::run`] as one task. The
//! construction order is what fixes B24: the knot consumer (and its [`KnotSources`]) exists before
//! the Jetstream ingester that adds sources to it.

pub mod atproto_source;
pub mod ingest;
pub mod jetstream;
pub mod knot;
pub mod metrics;
pub mod pipeline;
pub mod ws;

#[cfg(test)]
mod seam_tests;
#[cfg(test)]
mod testkit;

pub use atproto_source::AtprotoCollaborators;
pub use ingest::{CollaboratorPage, CollaboratorRecord, CollaboratorSource, Ingester};
pub use jetstream::Jetstream;
pub use knot::{KnotChange, KnotConsumer, KnotSources};
pub use metrics::IntakeMetrics;
pub use pipeline::{PipelineIntake, RunCreator};

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::crd::WorkflowRun;
use crate::store::{Store, StoreError};

/// An intake failure. The label is stable for metrics.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The Kubernetes API could not take a WorkflowRun now; the event is retried.
    #[error("cannot create WorkflowRun {name}: {message}")]
    Kube { name: String, message: String },
    /// The owner's PDS could not list collaborator records.
    #[error("cannot list collaborators of {owner}: {message}")]
    Collaborators { owner: String, message: String },
    /// A stream endpoint URL that cannot be used.
    #[error("invalid stream URL {url:?}: {message}")]
    Url { url: String, message: String },
}

impl IntakeError {
    pub fn label(&self) -> &'static str {
        match self {
            IntakeError::Store(_) => "store",
            IntakeError::Kube { .. } => "kube",
            IntakeError::Collaborators { .. } => "collaborators",
            IntakeError::Url { .. } => "url",
        }
    }
}

pub type Result<T, E = IntakeError> = std::result::Result<T, E>;

/// Both intake streams, wired together.
pub struct Intake {
    pub jetstream: Jetstream,
    pub knots: KnotConsumer,
}

impl Intake {
    /// Wire Jetstream → ingestion rules → knot sources → pipeline intake → WorkflowRuns in
    /// `namespace` (the resolved namespace: `config.namespace` or the client's default).
    /// `collaborators` is normally [`AtprotoCollaborators`].
    pub fn new(
        config: &Config,
        store: Store,
        client: kube::Client,
        namespace: &str,
        collaborators: Arc<dyn CollaboratorSource>,
        metrics: IntakeMetrics,
    ) -> Intake {
        let runs: Arc<dyn RunCreator> = Arc::new(kube::Api::<WorkflowRun>::namespaced(client, namespace));
        let pipelines = Arc::new(
            PipelineIntake::new(store.clone(), runs, namespace, config.owner.clone())
                .with_metrics(metrics.clone()),
        );
        let (knots, sources) = KnotConsumer::new(store.clone(), pipelines, config.dev);
        let me = ingest::Identity { hostname: config.hostname.clone(), owner: config.owner.clone() };
        let ingester = Ingester::new(store.clone(), me, collaborators, sources);
        Intake {
            jetstream: Jetstream::new(config.jetstream_endpoint.clone(), store, ingester)
                .with_metrics(metrics.clone()),
            knots: knots.with_metrics(metrics),
        }
    }

    /// Set both streams' connection timing.
    pub fn with_timing(self, timing: ws::Timing) -> Self {
        Intake { jetstream: self.jetstream.with_timing(timing), knots: self.knots.with_timing(timing) }
    }

    /// Run both streams until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) {
        tokio::join!(self.jetstream.run(stop.clone()), self.knots.run(stop));
    }
}
