//! The workflow YAML carried in `raw` (spec §4), parsed and validated into a [`Workflow`].
//!
//! Parsing is non-strict like go-yaml v3 (unknown keys such as `when` are ignored), but every shape
//! the runner relies on is checked here, so a bad workflow fails alone with a message that names the
//! field and, for YAML errors, the line and column.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use super::pipeline::{CloneOptions, PipelineWorkflow};
use crate::yaml;

/// Largest `raw` we accept. Knots never send anything near this; a bigger one is an attack or a bug.
pub const MAX_RAW_BYTES: usize = 1024 * 1024;

/// The architectures Kubernetes nodes report in `kubernetes.io/arch` that a workflow may ask for.
pub const ARCHITECTURES: &[&str] = &["amd64", "arm64", "arm", "ppc64le", "s390x", "riscv64"];

/// How a workflow's image is chosen. All engines run on Tekton.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// The image is built from `dependencies` by a Nixery registry (what tangled users write today).
    Nixery,
    /// Loom-compatible: `image` is required.
    Kubernetes,
    /// The upstream proposal's name for the same shape as `kubernetes`.
    Docker,
}

impl Engine {
    /// Resolve the record's `engine` string; anything else is `unknown engine "…"` (spec §5.1).
    pub fn parse(name: &str) -> Result<Self, WorkflowError> {
        match name {
            "nixery" => Ok(Engine::Nixery),
            "kubernetes" => Ok(Engine::Kubernetes),
            "docker" => Ok(Engine::Docker),
            other => Err(WorkflowError::UnknownEngine(other.to_owned())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Nixery => "nixery",
            Engine::Kubernetes => "kubernetes",
            Engine::Docker => "docker",
        }
    }

    /// Engines whose steps run in a user-chosen `image`.
    pub fn needs_image(self) -> bool {
        !matches!(self, Engine::Nixery)
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a workflow cannot run. `Display` is the text that goes into the `failed` status's `error`
/// and the log, so it never repeats the workflow name (the status already carries it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkflowError {
    /// Exactly Go's `unknown engine %#v`.
    #[error("unknown engine {}", go_quote(.0))]
    UnknownEngine(String),
    #[error("workflow is {0} bytes; the limit is {MAX_RAW_BYTES} bytes (1 MiB)")]
    TooLarge(usize),
    #[error("invalid workflow YAML: {0}")]
    Yaml(yaml::YamlError),
    #[error("{0}")]
    Invalid(String),
}

impl WorkflowError {
    /// A short stable label for metrics and Kubernetes Events.
    pub fn label(&self) -> &'static str {
        match self {
            WorkflowError::UnknownEngine(_) => "unknown_engine",
            WorkflowError::TooLarge(_) => "too_large",
            WorkflowError::Yaml(_) => "yaml",
            WorkflowError::Invalid(_) => "invalid",
        }
    }
}

/// Go's `%#v` for a string (strconv.Quote): double quotes, backslash escapes, `\x`/`\u` for the rest.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A parsed, validated workflow: the record's `name`, `engine` and `clone` plus what `raw` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workflow {
    pub name: String,
    pub engine: Engine,
    pub clone: CloneOptions,
    /// Required for image engines; ignored (and `None`) for nixery, whose image comes from dependencies.
    pub image: Option<String>,
    pub architecture: Option<String>,
    /// Registry → packages; `nixpkgs` packages go into the Nixery image, others are installed by a step.
    pub dependencies: BTreeMap<String, Vec<String>>,
    pub environment: BTreeMap<String, String>,
    pub steps: Vec<Step>,
}

/// One user step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Step {
    pub name: String,
    /// Run as `bash -c <command>`; a block scalar keeps its trailing newline.
    pub command: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, String>,
}

/// The shape of `raw` as YAML; validated into [`Workflow`].
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawWorkflow {
    image: Option<String>,
    architecture: Option<String>,
    #[serde(deserialize_with = "dependencies")]
    dependencies: BTreeMap<String, Vec<String>>,
    #[serde(deserialize_with = "environment")]
    environment: BTreeMap<String, String>,
    steps: Option<Vec<RawStep>>,
}

#[derive(Debug, Deserialize)]
struct RawStep {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    command: Option<String>,
    #[serde(default, deserialize_with = "environment")]
    environment: BTreeMap<String, String>,
}

/// Parse and validate one workflow of a pipeline record.
pub fn parse(record: &PipelineWorkflow) -> Result<Workflow, WorkflowError> {
    let engine = Engine::parse(&record.engine)?;
    parse_with_engine(&record.name, engine, record.clone.unwrap_or_default(), &record.raw)
}

/// Parse `raw` for a workflow whose engine and clone options are already known.
pub fn parse_with_engine(
    name: &str,
    engine: Engine,
    clone: CloneOptions,
    raw: &str,
) -> Result<Workflow, WorkflowError> {
    if raw.len() > MAX_RAW_BYTES {
        return Err(WorkflowError::TooLarge(raw.len()));
    }
    let value: yaml::Value = yaml::from_str(raw).map_err(WorkflowError::Yaml)?;
    let parsed: RawWorkflow = match value {
        yaml::Value::Null => RawWorkflow::default(),
        yaml::Value::Mapping(_) => yaml::from_str(raw).map_err(WorkflowError::Yaml)?,
        _ => return Err(WorkflowError::Invalid("workflow must be a YAML mapping".into())),
    };
    let invalid = |m: String| Err(WorkflowError::Invalid(m));

    let image = parsed.image.filter(|i| !i.trim().is_empty());
    let image = if engine.needs_image() {
        match image {
            Some(image) if image.chars().any(char::is_whitespace) => {
                return invalid(format!("image {image:?} contains whitespace"));
            }
            Some(image) => Some(image),
            None => {
                return invalid(format!(
                    "engine {engine:?} needs an image: add `image: <registry/name:tag>` to the workflow",
                    engine = engine.as_str()
                ));
            }
        }
    } else {
        None
    };
    let architecture = match parsed.architecture.filter(|a| !a.is_empty()) {
        Some(arch) if !ARCHITECTURES.contains(&arch.as_str()) => {
            return invalid(format!("architecture {arch:?} is not one of {}", ARCHITECTURES.join(", ")));
        }
        other => other,
    };
    check_env_names("environment", &parsed.environment)?;

    let raw_steps = parsed.steps.unwrap_or_default();
    if raw_steps.is_empty() {
        return invalid("workflow has no steps: add at least one entry under `steps`".into());
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut steps = Vec::with_capacity(raw_steps.len());
    for (i, raw) in raw_steps.into_iter().enumerate() {
        let name = raw.name.unwrap_or_default();
        if name.trim().is_empty() {
            return invalid(format!("steps[{i}]: every step needs a `name`"));
        }
        let Some(command) = raw.command else {
            return invalid(format!("steps[{i}] ({name:?}): every step needs a `command`"));
        };
        if let Some(first) = seen.insert(name.clone(), i) {
            return invalid(format!(
                "steps[{i}]: duplicate step name {name:?} (also steps[{first}]); step names must be unique"
            ));
        }
        check_env_names(&format!("steps[{i}].environment"), &raw.environment)?;
        steps.push(Step { name, command, environment: raw.environment });
    }

    Ok(Workflow {
        name: name.to_owned(),
        engine,
        clone,
        image,
        architecture,
        dependencies: if engine == Engine::Nixery { parsed.dependencies } else { BTreeMap::new() },
        environment: parsed.environment,
        steps,
    })
}

/// Kubernetes accepts `[-._a-zA-Z][-._a-zA-Z0-9]*` as an environment variable name.
fn check_env_names(field: &str, env: &BTreeMap<String, String>) -> Result<(), WorkflowError> {
    for key in env.keys() {
        let mut chars = key.chars();
        let ok = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || "-._".contains(c))
            && chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
        if !ok {
            return Err(WorkflowError::Invalid(format!(
                "{field}: {key:?} is not a valid environment variable name"
            )));
        }
    }
    Ok(())
}

/// An `environment` map: like go-yaml v3 decoding into `map[string]string`, a scalar becomes its
/// text (`CI: true` → `"true"`) and null becomes `""`; lists and maps are errors.
fn environment<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let map: Option<BTreeMap<String, ScalarText>> = Deserialize::deserialize(d)?;
    Ok(map.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect())
}

/// `dependencies`: registry → list of package names; a null list is empty.
fn dependencies<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Vec<String>>, D::Error> {
    let map: Option<BTreeMap<String, Option<Vec<String>>>> = Deserialize::deserialize(d)?;
    Ok(map.unwrap_or_default().into_iter().map(|(k, v)| (k, v.unwrap_or_default())).collect())
}

/// A YAML scalar kept as text.
struct ScalarText(String);

impl<'de> Deserialize<'de> for ScalarText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ScalarText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string (environment values are text)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ScalarText, E> {
                Ok(ScalarText(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<ScalarText, E> {
                Ok(ScalarText(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<ScalarText, E> {
                Ok(ScalarText(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ScalarText, E> {
                Ok(ScalarText(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ScalarText, E> {
                Ok(ScalarText(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ScalarText, E> {
                Ok(ScalarText(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<ScalarText, E> {
                Ok(ScalarText(String::new()))
            }
            fn visit_none<E: de::Error>(self) -> Result<ScalarText, E> {
                Ok(ScalarText(String::new()))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = format!("{}/../shared/spec/fixtures/workflows/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn parse_raw(engine: &str, raw: &str) -> Result<Workflow, WorkflowError> {
        parse(&PipelineWorkflow {
            name: "ci.yml".into(),
            engine: engine.into(),
            clone: None,
            raw: raw.into(),
        })
    }

    #[test]
    fn parses_every_fixture() {
        let w = parse_raw("kubernetes", &fixture("env-and-clone.yml")).expect("env-and-clone");
        assert_eq!(w.image.as_deref(), Some("node:22-bookworm"));
        assert_eq!(w.architecture.as_deref(), Some("arm64"));
        assert_eq!(w.environment["CI"], "true");
        assert_eq!(w.environment["FORCE_COLOR"], "0");
        assert_eq!(w.steps.len(), 2);
        assert_eq!(w.steps[0].environment["NODE_ENV"], "development");
        assert_eq!(w.steps[1].command, "npm run lint\nnpm run build\nls -la dist/\n");

        let n = parse_raw("nixery", &fixture("nixery-deps.yml")).expect("nixery");
        assert_eq!(n.image, None);
        assert_eq!(n.dependencies["nixpkgs"], vec!["go", "gnumake"]);
        assert_eq!(n.dependencies["git+https://tangled.org/@example.com/my_pkg"], vec!["my_pkg"]);
        assert_eq!(n.steps[1].environment["GOFLAGS"], "");

        let s = parse_raw("docker", &fixture("simple-image.yml")).expect("simple");
        assert_eq!(s.engine, Engine::Docker);
        assert_eq!(s.steps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["Build", "Test"]);
    }

    #[test]
    fn scalars_in_environment_become_their_text() {
        let w = parse_raw(
            "nixery",
            "environment:\n  A: true\n  B: 3\n  C: 1.5\n  D:\n  E: ~\n  F: 'x'\nsteps:\n  - {name: s, command: c}\n",
        )
        .expect("ok");
        let got: Vec<_> = w.environment.values().cloned().collect();
        assert_eq!(got, ["true", "3", "1.5", "", "", "x"]);
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let cases: &[(&str, &str, &str)] = &[
            ("kubernetes", "steps: [\n", "line"),
            ("kubernetes", "image: a\nsteps: 3\n", "invalid type"),
            (
                "kubernetes",
                "image: a\nsteps:\n  - name: x\n    command: y\n    environment: [1, 2]\n",
                "line 5",
            ),
            ("kubernetes", "image: a\nenvironment:\n  X: [1]\nsteps: [{name: s, command: c}]\n", "line 3"),
            ("kubernetes", "steps: [{name: s, command: c}]\n", "needs an image"),
            ("docker", "image: ''\nsteps: [{name: s, command: c}]\n", "needs an image"),
            ("nixery", "steps: []\n", "no steps"),
            ("nixery", "environment: {A: b}\n", "no steps"),
            (
                "nixery",
                "steps: [{name: s, command: a}, {name: s, command: b}]\n",
                "duplicate step name \"s\"",
            ),
            ("nixery", "steps: [{command: a}]\n", "needs a `name`"),
            ("nixery", "steps: [{name: a}]\n", "needs a `command`"),
            ("nixery", "- a\n- b\n", "must be a YAML mapping"),
            (
                "nixery",
                "environment: {'1X': a}\nsteps: [{name: s, command: c}]\n",
                "not a valid environment variable",
            ),
            ("kubernetes", "image: a\narchitecture: x86\nsteps: [{name: s, command: c}]\n", "architecture"),
            ("podman", "steps: []\n", "unknown engine \"podman\""),
        ];
        for (engine, raw, want) in cases {
            let err = parse_raw(engine, raw).expect_err(raw);
            assert!(err.to_string().contains(want), "{raw:?}: {err} (wanted {want:?})");
        }
        let big = format!("# {}\nsteps: [{{name: s, command: c}}]\n", "x".repeat(MAX_RAW_BYTES));
        assert!(matches!(parse_raw("nixery", &big), Err(WorkflowError::TooLarge(_))));
    }

    #[test]
    fn unknown_engine_text_is_go_quoted() {
        assert_eq!(Engine::parse("docker\"x").expect_err("bad").to_string(), r#"unknown engine "docker\"x""#);
        assert_eq!(go_quote("a\tb\u{1}"), r#""a\tb\x01""#);
    }
}
