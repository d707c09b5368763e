//! The knot's `sh.tangled.pipeline` record and the `{rkey, nsid, event}` envelope it arrives in
//! (spec §3.3 and §3.8).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ModelError;

/// NSID of the pipeline record; the only knot event a spindle processes.
pub const PIPELINE_NSID: &str = "sh.tangled.pipeline";

/// One knot event-stream frame: `{"event": {...}, "nsid": "...", "rkey": "..."}`.
///
/// Go matches `rkey`/`nsid` case-insensitively and ignores unknown keys; so do we.
#[derive(Debug, Clone, PartialEq)]
pub struct KnotEnvelope {
    pub rkey: String,
    pub nsid: String,
    pub event: Value,
}

impl KnotEnvelope {
    /// Parse one text frame.
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ModelError::Json { what: "knot event", message: e.to_string() })?;
        let Value::Object(map) = value else {
            return Err(ModelError::Invalid("knot event is not a JSON object".into()));
        };
        let mut rkey = None;
        let mut nsid = None;
        let mut event = None;
        for (key, value) in map {
            match key.to_ascii_lowercase().as_str() {
                "rkey" => rkey = Some(value),
                "nsid" => nsid = Some(value),
                "event" => event = Some(value),
                _ => {}
            }
        }
        let as_string = |field: &'static str, v: Option<Value>| match v {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(ModelError::Invalid(format!("knot event: `{field}` is not a string"))),
            None => Err(ModelError::Invalid(format!("knot event: `{field}` is missing"))),
        };
        Ok(KnotEnvelope {
            rkey: as_string("rkey", rkey)?,
            nsid: as_string("nsid", nsid)?,
            event: event.unwrap_or(Value::Null),
        })
    }

    /// Decode `event` as a pipeline record (only meaningful when `nsid` is [`PIPELINE_NSID`]).
    pub fn pipeline(&self) -> Result<PipelineRecord, ModelError> {
        PipelineRecord::from_value(self.event.clone())
    }
}

/// The `sh.tangled.pipeline` record (spec §3.8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineRecord {
    /// The Go knot emits `""`; `"sh.tangled.pipeline"` and a missing value are accepted too.
    #[serde(rename = "$type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(default)]
    pub trigger_metadata: Option<TriggerMetadata>,
    /// Go decodes `null` entries and skips them.
    #[serde(default)]
    pub workflows: Vec<Option<PipelineWorkflow>>,
}

impl PipelineRecord {
    /// Decode and check the record's `$type`.
    pub fn from_value(value: Value) -> Result<Self, ModelError> {
        let record: PipelineRecord = serde_json::from_value(value)
            .map_err(|e| ModelError::Json { what: "pipeline record", message: e.to_string() })?;
        match record.type_.as_deref() {
            None | Some("") | Some(PIPELINE_NSID) => Ok(record),
            Some(other) => Err(ModelError::Invalid(format!(
                "pipeline record has $type {other:?}, expected {PIPELINE_NSID:?}"
            ))),
        }
    }

    /// The trigger, with the checks Go makes before running anything (spec §3.6 steps 3–4).
    pub fn trigger(&self) -> Result<&TriggerMetadata, ModelError> {
        let trigger = self
            .trigger_metadata
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("no trigger metadata found".into()))?;
        if trigger.repo.is_none() {
            return Err(ModelError::Invalid("no repo data found".into()));
        }
        Ok(trigger)
    }
}

/// `triggerMetadata`: what caused the pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TriggerMetadata {
    /// `push` | `pull_request` | `manual`; kept as text so an unknown kind can be reported per workflow.
    pub kind: String,
    #[serde(default)]
    pub repo: Option<TriggerRepo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushTrigger>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_request: Option<PullRequestTrigger>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manual: Option<ManualTrigger>,
}

/// The repository the pipeline belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TriggerRepo {
    pub knot: String,
    pub did: String,
    pub repo: String,
    #[serde(default)]
    pub default_branch: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushTrigger {
    #[serde(rename = "ref")]
    pub ref_: String,
    pub new_sha: String,
    #[serde(default)]
    pub old_sha: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PullRequestTrigger {
    pub source_branch: String,
    pub target_branch: String,
    pub source_sha: String,
    #[serde(default)]
    pub action: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ManualTrigger {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<ManualInput>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ManualInput {
    pub key: String,
    pub value: String,
}

/// One entry of `workflows[]`: the knot copies `engine` and `clone` out of the YAML, and the runner
/// trusts these copies over `raw`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineWorkflow {
    pub name: String,
    #[serde(default)]
    pub engine: String,
    #[serde(default)]
    pub clone: Option<CloneOptions>,
    #[serde(default)]
    pub raw: String,
}

/// `clone`: how the workspace gets the repository.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default)]
pub struct CloneOptions {
    pub skip: bool,
    /// `0` (or absent) means 1; negative values are passed to git unchanged, as Go does.
    pub depth: i64,
    pub submodules: bool,
}

impl CloneOptions {
    /// The `--depth` git gets.
    pub fn effective_depth(&self) -> i64 {
        if self.depth == 0 { 1 } else { self.depth }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = format!("{}/../shared/spec/fixtures/knot-events/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn parses_push_and_pull_request_fixtures_pretty_and_wire_exact() {
        for name in [
            "pipeline-push.json",
            "pipeline-push.frame.txt",
            "pipeline-pull-request.json",
            "pipeline-pull-request.frame.txt",
        ] {
            let env = KnotEnvelope::parse(&fixture(name)).expect(name);
            assert_eq!(env.nsid, PIPELINE_NSID);
            let record = env.pipeline().expect(name);
            assert_eq!(record.type_.as_deref(), Some(""));
            let trigger = record.trigger().expect("trigger");
            let repo = trigger.repo.as_ref().expect("repo");
            assert_eq!(repo.knot, "knot1.tangled.sh");
            assert_eq!(repo.default_branch, "");
            assert_eq!(record.workflows.len(), 2);
        }
        let pr = KnotEnvelope::parse(&fixture("pipeline-pull-request.json"))
            .and_then(|e| e.pipeline())
            .expect("pr");
        let t = pr.trigger().expect("trigger");
        assert_eq!(t.kind, "pull_request");
        let p = t.pull_request.as_ref().expect("pullRequest");
        assert_eq!(p.source_sha, "da4b9237bacccdf19c0760cab7aec4a8359010b0");
        assert!(t.push.is_none());
        let ci = pr.workflows[0].as_ref().expect("ci.yml");
        assert_eq!(ci.clone, Some(CloneOptions { skip: false, depth: 50, submodules: true }));
    }

    #[test]
    fn envelope_keys_are_case_insensitive_and_type_is_optional() {
        let env = KnotEnvelope::parse(
            r#"{"RKEY":"3m","Nsid":"sh.tangled.pipeline","event":{"triggerMetadata":{"kind":"manual","repo":{"knot":"k","did":"did:plc:a","repo":"r"},"manual":{}},"workflows":[null]}}"#,
        )
        .expect("parse");
        assert_eq!(env.rkey, "3m");
        let record = env.pipeline().expect("record without $type");
        assert_eq!(record.workflows, vec![None]);
        assert!(record.trigger_metadata.as_ref().expect("t").manual.is_some());
    }

    #[test]
    fn rejects_foreign_type_and_missing_trigger() {
        let err = PipelineRecord::from_value(serde_json::json!({"$type": "sh.tangled.repo"}))
            .expect_err("wrong $type");
        assert!(err.to_string().contains("sh.tangled.repo"), "{err}");
        let record = PipelineRecord::from_value(serde_json::json!({"workflows": []})).expect("ok");
        assert_eq!(record.trigger().expect_err("no trigger").to_string(), "no trigger metadata found");
        let record =
            PipelineRecord::from_value(serde_json::json!({"triggerMetadata": {"kind": "push"}})).expect("ok");
        assert_eq!(record.trigger().expect_err("no repo").to_string(), "no repo data found");
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        for bad in ["", "[]", "{", r#"{"rkey":1,"nsid":"x"}"#, r#"{"nsid":"x"}"#] {
            assert!(KnotEnvelope::parse(bad).is_err(), "{bad:?}");
        }
        let env =
            KnotEnvelope::parse(r#"{"rkey":"a","nsid":"sh.tangled.pipeline","event":{"workflows":"x"}}"#)
                .expect("envelope ok");
        assert!(env.pipeline().is_err());
    }
}
