//! Configuration: the Go spindle's `SPINDLE_*` variables with their names and defaults (spec §1),
//! plus bobbin's own `BOBBIN_*` settings and a YAML file for the structured parts.
//!
//! Precedence: environment > config file > defaults. Any invalid value is one error naming the
//! variable; `bobbin serve` prints it and exits non-zero.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::ResourceRequirements;
use serde::Deserialize;

use crate::duration;

/// Default file for the structured settings (`BOBBIN_CONFIG` overrides it).
pub const DEFAULT_CONFIG_FILE: &str = "/etc/bobbin/config.yaml";

/// One configuration problem, naming the variable (or file key) at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {message}")]
pub struct ConfigError {
    pub variable: String,
    pub message: String,
}

fn err(variable: &str, message: impl Into<String>) -> ConfigError {
    ConfigError { variable: variable.to_owned(), message: message.into() }
}

/// How a workflow maps onto Tekton Tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// Tasks `setup`, `clone` and one per step, sharing a PVC workspace (what `tkn pr describe` shows
    /// step by step).
    #[default]
    PerStep,
    /// One Task, one pod, every step a Tekton step, an `emptyDir` workspace: faster, fewer pods.
    Packed,
}

impl Layout {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "per-step" => Some(Layout::PerStep),
            "packed" => Some(Layout::Packed),
            _ => None,
        }
    }
}

/// Where repo secrets live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretsProvider {
    /// In the SQLite database, encrypted with `BOBBIN_SECRETS_KEY`.
    Sqlite,
    /// One Kubernetes Secret per repo in bobbin's namespace.
    Kubernetes,
}

/// A Loom-style resource profile: steps scheduled by `node_selector` get `resources`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceProfile {
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default)]
    pub resources: ResourceRequirements,
}

/// Everything configurable.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    // --- the Go spindle's variables (spec §1) ---
    pub listen_addr: SocketAddr,
    pub db_path: PathBuf,
    pub hostname: String,
    pub jetstream_endpoint: String,
    pub plc_url: String,
    pub dev: bool,
    pub owner: String,
    pub secrets_provider: SecretsProvider,
    pub log_dir: PathBuf,
    pub queue_size: usize,
    pub max_job_count: usize,
    pub nixery: String,
    pub workflow_timeout: Duration,

    // --- bobbin's own ---
    /// Namespace for WorkflowRuns, PipelineRuns and Secrets; `None` = in-cluster namespace or the
    /// kubeconfig context's, as kubectl picks it.
    pub namespace: Option<String>,
    pub layout: Layout,
    /// `None` = the cluster's default StorageClass.
    pub storage_class: Option<String>,
    pub workspace_size: String,
    pub clone_image: String,
    pub setup_image: String,
    /// Timeout for image-engine workflows (nixery uses `workflow_timeout`).
    pub image_workflow_timeout: Duration,
    /// Architecture for workflows that name none; `None` = no node selector.
    pub default_architecture: Option<String>,
    /// Finished WorkflowRuns (and their Tekton objects) are deleted this long after completion.
    pub run_ttl: Duration,
    /// Image-pull errors, unschedulable pods and quota refusals fail the run after this long.
    pub fail_fast_grace: Duration,
    /// Log files older than this are deleted.
    pub log_retention: Duration,
    /// What replaces `localhost` in dev-mode clone URLs (the Go spindle uses host.docker.internal).
    pub dev_localhost_alias: String,
    /// 32-byte key (base64) for SQLite secrets at rest.
    pub secrets_key: Option<String>,
    /// File holding that key (`BOBBIN_SECRETS_KEY_FILE`), e.g. a mounted Kubernetes Secret.
    pub secrets_key_file: Option<PathBuf>,
    pub resource_profiles: Vec<ResourceProfile>,
    pub json_logs: bool,
}

/// The YAML config file: bobbin's structured settings (all optional).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileConfig {
    namespace: Option<String>,
    layout: Option<Layout>,
    storage_class: Option<String>,
    workspace_size: Option<String>,
    clone_image: Option<String>,
    setup_image: Option<String>,
    default_architecture: Option<String>,
    run_ttl: Option<String>,
    fail_fast_grace: Option<String>,
    log_retention: Option<String>,
    image_workflow_timeout: Option<String>,
    #[serde(default)]
    resource_profiles: Vec<ResourceProfile>,
}

impl Config {
    /// Read the process environment (and the config file it points at).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::load(|k| std::env::var(k).ok(), |p| std::fs::read_to_string(p))
    }

    /// A configuration for tests and `bobbin render`: defaults, with the required values filled in.
    pub fn for_tests() -> Self {
        let vars: BTreeMap<&str, &str> = [
            ("SPINDLE_SERVER_HOSTNAME", "spindle.example.com"),
            ("SPINDLE_SERVER_OWNER", "did:plc:hbrpoigf3cbfnobm2o4rak3v"),
            ("BOBBIN_CONFIG", ""),
        ]
        .into_iter()
        .collect();
        Self::load(|k| vars.get(k).map(|v| v.to_string()), |_| Ok(String::new()))
            .unwrap_or_else(|e| unreachable!("defaults are valid: {e}"))
    }

    /// For `bobbin render`: the environment and config file as `serve` reads them, except that the
    /// server's required identity (hostname, owner) gets placeholders, since render serves nothing.
    pub fn for_render(
        var: impl Fn(&str) -> Option<String>,
        read_file: impl Fn(&str) -> std::io::Result<String>,
    ) -> Result<Self, ConfigError> {
        Self::load(
            |k| {
                let value = var(k);
                let placeholder = match k {
                    "SPINDLE_SERVER_HOSTNAME" => Some("render.invalid"),
                    "SPINDLE_SERVER_OWNER" => Some("did:plc:render"),
                    _ => None,
                };
                match placeholder {
                    Some(p) if value.as_deref().is_none_or(str::is_empty) => Some(p.to_owned()),
                    _ => value,
                }
            },
            read_file,
        )
    }

    /// Build from a variable lookup and a file reader (injected so tests need no process state).
    pub fn load(
        var: impl Fn(&str) -> Option<String>,
        read_file: impl Fn(&str) -> std::io::Result<String>,
    ) -> Result<Self, ConfigError> {
        let get = |k: &str| var(k).filter(|v| !v.is_empty());

        let config_path = var("BOBBIN_CONFIG");
        let file: FileConfig = match config_path.as_deref() {
            Some("") => FileConfig::default(),
            Some(path) => {
                let text =
                    read_file(path).map_err(|e| err("BOBBIN_CONFIG", format!("cannot read {path}: {e}")))?;
                parse_file(path, &text)?
            }
            None => match read_file(DEFAULT_CONFIG_FILE) {
                Ok(text) => parse_file(DEFAULT_CONFIG_FILE, &text)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileConfig::default(),
                Err(e) => {
                    return Err(err("BOBBIN_CONFIG", format!("cannot read {DEFAULT_CONFIG_FILE}: {e}")));
                }
            },
        };

        let required = |k: &str| get(k).ok_or_else(|| err(k, "is required"));
        let parse_bool = |k: &str, default: bool| match get(k) {
            None => Ok(default),
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "1" | "t" | "true" | "yes" | "on" => Ok(true),
                "0" | "f" | "false" | "no" | "off" => Ok(false),
                _ => Err(err(k, format!("{v:?} is not a boolean"))),
            },
        };
        let parse_count = |k: &str, default: usize| match get(k) {
            None => Ok(default),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(err(k, format!("{v:?} is not a positive whole number"))),
            },
        };
        let parse_duration = |k: &str, file_value: Option<&String>, default: &str| {
            let (source, text) = match get(k) {
                Some(v) => (k.to_owned(), v),
                None => match file_value {
                    Some(v) => (format!("{k} (config file)"), v.clone()),
                    None => (k.to_owned(), default.to_owned()),
                },
            };
            duration::parse(&text).map_err(|m| err(&source, m))
        };

        let hostname = required("SPINDLE_SERVER_HOSTNAME")?;
        if hostname.contains('/') || hostname.contains(char::is_whitespace) {
            return Err(err(
                "SPINDLE_SERVER_HOSTNAME",
                format!("{hostname:?} must be a bare host name such as spindle.example.com"),
            ));
        }
        let owner = required("SPINDLE_SERVER_OWNER")?;
        if !owner.starts_with("did:") {
            return Err(err("SPINDLE_SERVER_OWNER", format!("{owner:?} is not a DID")));
        }
        let listen = get("SPINDLE_SERVER_LISTEN_ADDR").unwrap_or_else(|| "0.0.0.0:6555".into());
        let listen_addr = listen
            .parse()
            .map_err(|_| err("SPINDLE_SERVER_LISTEN_ADDR", format!("{listen:?} is not host:port")))?;
        let secrets_provider = match get("SPINDLE_SERVER_SECRETS_PROVIDER").as_deref() {
            None | Some("sqlite") => SecretsProvider::Sqlite,
            Some("kubernetes") => SecretsProvider::Kubernetes,
            Some("openbao") => {
                return Err(err(
                    "SPINDLE_SERVER_SECRETS_PROVIDER",
                    "openbao is not supported by bobbin; use sqlite (encrypted at rest) or kubernetes (a Secret per repo)",
                ));
            }
            Some(other) => {
                return Err(err(
                    "SPINDLE_SERVER_SECRETS_PROVIDER",
                    format!("unknown provider {other:?}; use sqlite or kubernetes"),
                ));
            }
        };
        let layout = match get("BOBBIN_LAYOUT") {
            Some(v) => Layout::parse(&v)
                .ok_or_else(|| err("BOBBIN_LAYOUT", format!("{v:?} is not per-step or packed")))?,
            None => file.layout.unwrap_or_default(),
        };
        let workflow_timeout = parse_duration("SPINDLE_NIXERY_PIPELINES_WORKFLOW_TIMEOUT", None, "5m")?;
        let image_workflow_timeout =
            match get("BOBBIN_WORKFLOW_TIMEOUT").or(file.image_workflow_timeout.clone()) {
                Some(v) => duration::parse(&v).map_err(|m| err("BOBBIN_WORKFLOW_TIMEOUT", m))?,
                None => workflow_timeout,
            };
        let default_architecture = get("BOBBIN_DEFAULT_ARCHITECTURE").or(file.default_architecture);
        if let Some(arch) = &default_architecture
            && !crate::model::workflow::ARCHITECTURES.contains(&arch.as_str())
        {
            return Err(err(
                "BOBBIN_DEFAULT_ARCHITECTURE",
                format!("{arch:?} is not a Kubernetes architecture"),
            ));
        }
        let workspace_size =
            get("BOBBIN_WORKSPACE_SIZE").or(file.workspace_size).unwrap_or_else(|| "1Gi".into());
        if !is_quantity(&workspace_size) {
            return Err(err(
                "BOBBIN_WORKSPACE_SIZE",
                format!("{workspace_size:?} is not a Kubernetes quantity such as 1Gi"),
            ));
        }
        let namespace = get("BOBBIN_NAMESPACE").or(file.namespace);
        if let Some(ns) = &namespace
            && !crate::naming::is_dns1123_label(ns)
        {
            return Err(err("BOBBIN_NAMESPACE", format!("{ns:?} is not a valid namespace name")));
        }

        Ok(Config {
            listen_addr,
            db_path: get("SPINDLE_SERVER_DB_PATH").unwrap_or_else(|| "spindle.db".into()).into(),
            hostname,
            jetstream_endpoint: get("SPINDLE_SERVER_JETSTREAM_ENDPOINT")
                .unwrap_or_else(|| "wss://jetstream1.us-west.bsky.network/subscribe".into()),
            plc_url: get("SPINDLE_SERVER_PLC_URL").unwrap_or_else(|| "https://plc.directory".into()),
            dev: parse_bool("SPINDLE_SERVER_DEV", false)?,
            owner,
            secrets_provider,
            log_dir: get("SPINDLE_SERVER_LOG_DIR").unwrap_or_else(|| "/var/log/spindle".into()).into(),
            queue_size: parse_count("SPINDLE_SERVER_QUEUE_SIZE", 100)?,
            max_job_count: parse_count("SPINDLE_SERVER_MAX_JOB_COUNT", 2)?,
            nixery: get("SPINDLE_NIXERY_PIPELINES_NIXERY").unwrap_or_else(|| "nixery.tangled.sh".into()),
            workflow_timeout,
            namespace,
            layout,
            storage_class: get("BOBBIN_STORAGE_CLASS").or(file.storage_class),
            workspace_size,
            clone_image: get("BOBBIN_CLONE_IMAGE")
                .or(file.clone_image)
                .unwrap_or_else(|| "docker.io/alpine/git:2.47.2".into()),
            setup_image: get("BOBBIN_SETUP_IMAGE")
                .or(file.setup_image)
                .unwrap_or_else(|| "docker.io/library/busybox:1.37".into()),
            image_workflow_timeout,
            default_architecture,
            run_ttl: parse_duration("BOBBIN_RUN_TTL", file.run_ttl.as_ref(), "24h")?,
            fail_fast_grace: parse_duration("BOBBIN_FAIL_FAST_GRACE", file.fail_fast_grace.as_ref(), "2m")?,
            log_retention: parse_duration("BOBBIN_LOG_RETENTION", file.log_retention.as_ref(), "720h")?,
            dev_localhost_alias: get("BOBBIN_DEV_LOCALHOST_ALIAS")
                .unwrap_or_else(|| "host.docker.internal".into()),
            secrets_key: get("BOBBIN_SECRETS_KEY"),
            secrets_key_file: get("BOBBIN_SECRETS_KEY_FILE").map(PathBuf::from),
            resource_profiles: file.resource_profiles,
            json_logs: match get("BOBBIN_LOG_FORMAT").as_deref() {
                None | Some("text") => false,
                Some("json") => true,
                Some(other) => {
                    return Err(err("BOBBIN_LOG_FORMAT", format!("{other:?} is not text or json")));
                }
            },
        })
    }

    /// The timeout a workflow of `engine` gets when its WorkflowRun names none.
    pub fn default_timeout(&self, engine: crate::model::Engine) -> Duration {
        match engine {
            crate::model::Engine::Nixery => self.workflow_timeout,
            _ => self.image_workflow_timeout,
        }
    }

    /// The resource profile whose node selector is satisfied by `labels` (first match wins; an empty
    /// selector matches everything).
    pub fn resource_profile(&self, labels: &BTreeMap<String, String>) -> Option<&ResourceProfile> {
        self.resource_profiles.iter().find(|p| p.node_selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }
}

fn parse_file(path: &str, text: &str) -> Result<FileConfig, ConfigError> {
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    crate::yaml::from_str(text).map_err(|e| err("BOBBIN_CONFIG", format!("{path}: {e}")))
}

/// A loose check for a Kubernetes quantity (`1Gi`, `500Mi`, `10G`, `1e3`).
fn is_quantity(s: &str) -> bool {
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &s[digits.len()..];
    !digits.is_empty()
        && digits.parse::<f64>().is_ok()
        && ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "k", "M", "G", "T", "P", "E", "m"].contains(&suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(vars: &[(&str, &str)], file: &str) -> Result<Config, ConfigError> {
        let vars: BTreeMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let file = file.to_owned();
        Config::load(|k| vars.get(k).cloned(), move |_| Ok(file.clone()))
    }

    const REQUIRED: [(&str, &str); 2] =
        [("SPINDLE_SERVER_HOSTNAME", "spindle.example.com"), ("SPINDLE_SERVER_OWNER", "did:plc:owner")];

    #[test]
    fn go_defaults() {
        let c = load(&REQUIRED, "").expect("valid");
        assert_eq!(c.listen_addr.to_string(), "0.0.0.0:6555");
        assert_eq!(c.db_path, PathBuf::from("spindle.db"));
        assert_eq!(c.jetstream_endpoint, "wss://jetstream1.us-west.bsky.network/subscribe");
        assert_eq!(c.plc_url, "https://plc.directory");
        assert!(!c.dev);
        assert_eq!(c.secrets_provider, SecretsProvider::Sqlite);
        assert_eq!(c.log_dir, PathBuf::from("/var/log/spindle"));
        assert_eq!((c.queue_size, c.max_job_count), (100, 2));
        assert_eq!(c.nixery, "nixery.tangled.sh");
        assert_eq!(c.workflow_timeout, Duration::from_secs(300));
        assert_eq!(c.layout, Layout::PerStep);
        assert_eq!(Config::for_tests().hostname, "spindle.example.com");
    }

    #[test]
    fn each_bad_value_names_its_variable() {
        let cases: &[(&str, &str)] = &[
            ("SPINDLE_SERVER_LISTEN_ADDR", "nope"),
            ("SPINDLE_SERVER_DEV", "maybe"),
            ("SPINDLE_SERVER_MAX_JOB_COUNT", "0"),
            ("SPINDLE_SERVER_QUEUE_SIZE", "-1"),
            ("SPINDLE_NIXERY_PIPELINES_WORKFLOW_TIMEOUT", "5 minutes"),
            ("SPINDLE_SERVER_SECRETS_PROVIDER", "vault"),
            ("SPINDLE_SERVER_SECRETS_PROVIDER", "openbao"),
            ("BOBBIN_LAYOUT", "stacked"),
            ("BOBBIN_WORKSPACE_SIZE", "lots"),
            ("BOBBIN_NAMESPACE", "Not_Valid"),
            ("BOBBIN_RUN_TTL", "forever"),
            ("BOBBIN_DEFAULT_ARCHITECTURE", "x86"),
            ("BOBBIN_LOG_FORMAT", "xml"),
        ];
        for (var, value) in cases {
            let mut vars = REQUIRED.to_vec();
            vars.push((var, value));
            let e = load(&vars, "").expect_err(var);
            assert_eq!(&e.variable, var, "{e}");
        }
        assert_eq!(load(&[], "").expect_err("missing").variable, "SPINDLE_SERVER_HOSTNAME");
        assert_eq!(load(&REQUIRED[..1], "").expect_err("missing").variable, "SPINDLE_SERVER_OWNER");
    }

    #[test]
    fn render_needs_no_server_identity_but_checks_the_rest() {
        let c = Config::for_render(|_| None, |_| Err(std::io::ErrorKind::NotFound.into())).expect("defaults");
        assert_eq!(c.layout, Layout::PerStep);
        let vars: BTreeMap<&str, &str> =
            [("SPINDLE_SERVER_HOSTNAME", ""), ("BOBBIN_LAYOUT", "packed")].into();
        let c =
            Config::for_render(|k| vars.get(k).map(|v| v.to_string()), |_| Ok(String::new())).expect("ok");
        assert_eq!(c.layout, Layout::Packed);
        let e = Config::for_render(|k| (k == "BOBBIN_LAYOUT").then(|| "x".into()), |_| Ok(String::new()))
            .expect_err("bad layout");
        assert_eq!(e.variable, "BOBBIN_LAYOUT");
    }

    #[test]
    fn file_then_env() {
        let file = "layout: packed\nworkspaceSize: 5Gi\nresourceProfiles:\n  - nodeSelector: {kubernetes.io/arch: arm64}\n    resources: {limits: {cpu: '2'}}\n  - resources: {limits: {cpu: '1'}}\n";
        let mut vars = REQUIRED.to_vec();
        vars.push(("BOBBIN_CONFIG", "/etc/x.yaml"));
        let c = load(&vars, file).expect("valid");
        assert_eq!(c.layout, Layout::Packed);
        assert_eq!(c.workspace_size, "5Gi");
        let arm: BTreeMap<String, String> = [("kubernetes.io/arch".to_string(), "arm64".to_string())].into();
        let cpu = |p: &ResourceProfile| p.resources.limits.as_ref().map(|l| l["cpu"].0.clone());
        assert_eq!(c.resource_profile(&arm).and_then(cpu).as_deref(), Some("2"));
        assert_eq!(c.resource_profile(&BTreeMap::new()).and_then(cpu).as_deref(), Some("1"));
        vars.push(("BOBBIN_LAYOUT", "per-step"));
        assert_eq!(load(&vars, file).expect("valid").layout, Layout::PerStep);
        let e = load(&vars, "layoutt: packed\n").expect_err("unknown key");
        assert_eq!(e.variable, "BOBBIN_CONFIG");
        assert!(e.message.contains("layoutt"), "{e}");
    }
}
