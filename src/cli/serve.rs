//! `bobbin serve`: the spindle. Wires every area together and runs until SIGTERM/SIGINT:
//!
//! 1. configuration (`SPINDLE_*`, `BOBBIN_*`, the config file) and logging;
//! 2. the log directory (refuse to start if unusable, B14), the SQLite store, the Kubernetes client;
//! 3. the HTTP server (`/`, `/events`, `/logs`, `/xrpc`, `/healthz`, `/readyz`, `/metrics`);
//! 4. the controller: startup checks (Tekton served, CRD installed, namespace present → ready), then,
//!    while this replica holds the Lease, reconciliation plus the leader-only tasks: Jetstream and
//!    knot intake, and resuming the log followers of runs that were live before a restart.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SecretsProvider};
use crate::plan::PlanSettings;
use crate::secrets::SecretValues;
use crate::{atproto, auth, controller, intake, logs, server, store::Store};

/// How often old log files are looked for (`BOBBIN_LOG_RETENTION` decides which).
const RETENTION_SWEEP: Duration = Duration::from_secs(3600);

/// Run the spindle. Configuration errors (including a missing secrets key) exit 2 before anything
/// starts; runtime failures exit 1.
pub async fn run() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    // The sqlite provider's key is configuration too: check it before touching disk or cluster.
    if config.secrets_provider == SecretsProvider::Sqlite
        && let Err(e) = crate::secrets::sqlite::SecretsKey::from_config(&config)
    {
        eprintln!("error: invalid configuration: {e}");
        return ExitCode::from(2);
    }
    crate::telemetry::init(config.json_logs);
    match serve(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = error_chain(&e);
            tracing::error!(error = %message, "bobbin stopped");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `outer: inner: …`, leaving out a cause whose text its parent already ends with (our error types
/// put their source in their own message, and anyhow would print it again).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    logs::check_log_dir(&config.log_dir)?;
    let store = Store::open(&config.db_path)?;
    let client = kube_client(&config).await?;
    let namespace = client.default_namespace().to_owned();
    tracing::info!(
        hostname = %config.hostname,
        namespace = %namespace,
        layout = ?config.layout,
        "starting bobbin"
    );

    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());

    // Every area registers its metrics before the registry is frozen behind `/metrics`.
    let mut registry = Registry::default();
    let secrets = crate::secrets::from_config(&config, store.clone(), Some(client.clone()), &namespace)?;
    let (resolver, pds) = atproto::clients(&config)?;
    let service_auth = auth::ServiceAuth::new(auth::service_did(&config.hostname), resolver.clone());
    let log_service = logs::LogService::new(client.clone(), store.clone(), logs::LogSettings::from(&*config));
    let server_metrics = server::ServerMetrics::default();
    let controller_metrics = Arc::new(controller::metrics::ControllerMetrics::default());
    let intake_metrics = intake::IntakeMetrics::default();
    server_metrics.register(&mut registry);
    resolver.metrics().register(&mut registry);
    service_auth.metrics().register(&mut registry);
    log_service.metrics().register(&mut registry);
    controller_metrics.register(&mut registry);
    intake_metrics.register(&mut registry);

    let ready = Arc::new(AtomicBool::new(false));
    let app = server::app(server::AppParts {
        events: server::events::EventsState {
            store: store.clone(),
            config: server::events::EventsConfig::default(),
            metrics: server_metrics.events.clone(),
            shutdown: shutdown.clone(),
        },
        xrpc: server::xrpc::XrpcState {
            owner: config.owner.clone(),
            auth: service_auth,
            resolver: resolver.clone(),
            pds: pds.clone(),
            store: store.clone(),
            secrets: secrets.clone(),
        },
        ready: ready.clone(),
        registry: Arc::new(registry),
        http_metrics: server_metrics.http.clone(),
        extra: vec![logs::server::router(log_service.server_state())],
    });
    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("SPINDLE_SERVER_LISTEN_ADDR: cannot listen on {}", config.listen_addr))?;
    tracing::info!(addr = %config.listen_addr, "listening");
    let http = tokio::spawn(server::serve(listener, app, shutdown.clone()));
    let retention =
        logs::file::spawn_retention(config.log_dir.clone(), config.log_retention, RETENTION_SWEEP);

    let on_run_started: controller::RunHook = {
        let logs = log_service.clone();
        Arc::new(move |started: controller::StartedRun| {
            if let Err(e) = logs.ensure_following(&started.run, &started.plan, &started.pipeline_run) {
                tracing::warn!(run = %started.pipeline_run, error = %e, "cannot follow the run's logs");
            }
        })
    };
    let while_leading: controller::LeaderTasks = {
        let (config, store, client, namespace) =
            (config.clone(), store.clone(), client.clone(), namespace.clone());
        let (logs, metrics) = (log_service.clone(), intake_metrics.clone());
        Arc::new(move |stop: CancellationToken| {
            let intake = intake::Intake::new(
                &config,
                store.clone(),
                client.clone(),
                &namespace,
                Arc::new(intake::AtprotoCollaborators::new(resolver.clone(), pds.clone())),
                metrics.clone(),
            );
            let (logs, namespace, plan_settings) =
                (logs.clone(), namespace.clone(), PlanSettings::from(&*config));
            Box::pin(async move {
                match logs.resume_all(&namespace, &plan_settings).await {
                    Ok(n) => tracing::info!(followers = n, "resumed log followers"),
                    Err(e) => tracing::warn!(error = %e, "could not resume log followers"),
                }
                intake.run(stop).await;
            })
        })
    };
    let secret_values: Arc<dyn SecretValues> = secrets;
    let result = controller::run(
        controller::Deps {
            client,
            config: config.clone(),
            namespace,
            store,
            secrets: secret_values,
            ready,
            metrics: controller_metrics,
            on_run_started,
            identity: controller::default_identity(),
            while_leading: Some(while_leading),
        },
        shutdown.clone(),
    )
    .await;

    shutdown.cancel();
    retention.abort();
    let served = http.await;
    result.context("startup checks failed")?;
    served.context("HTTP server task")?.context("HTTP server")?;
    tracing::info!("bobbin stopped");
    Ok(())
}

/// The Kubernetes client: in-cluster or from `KUBECONFIG`, as kubectl finds it; its default
/// namespace is `BOBBIN_NAMESPACE` when set, so every area works in one namespace.
async fn kube_client(config: &Config) -> anyhow::Result<kube::Client> {
    let mut kube_config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration (in-cluster service account or KUBECONFIG)")?;
    if let Some(namespace) = &config.namespace {
        kube_config.default_namespace = namespace.clone();
    }
    kube::Client::try_from(kube_config).context("cannot build the Kubernetes client")
}

/// Cancel `shutdown` on SIGTERM (Kubernetes stopping the pod) or SIGINT (Ctrl-C).
fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            _ = terminate => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        shutdown.cancel();
    });
}
