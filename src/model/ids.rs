//! Identities that appear on the wire: the pipeline at-uri, the workflow id, the log file name.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A workflow run as tangled names it: the knot (event source key), the pipeline rkey and the
/// workflow file name. Statuses, logs and the appview all key on this triple.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
pub struct WorkflowId {
    pub knot: String,
    pub rkey: String,
    pub name: String,
}

impl WorkflowId {
    pub fn new(knot: impl Into<String>, rkey: impl Into<String>, name: impl Into<String>) -> Self {
        WorkflowId { knot: knot.into(), rkey: rkey.into(), name: name.into() }
    }

    /// `at://did:web:<knot>/sh.tangled.pipeline/<rkey>`, the `pipeline` field of status events.
    pub fn pipeline_uri(&self) -> String {
        pipeline_uri(&self.knot, &self.rkey)
    }

    /// `<N(knot)>-<rkey>-<N(name)>.log`: the Go spindle's log file name (spec §6.3).
    pub fn log_file_name(&self) -> String {
        format!("{}-{}-{}.log", normalize(&self.knot), normalize(&self.rkey), normalize(&self.name))
    }
}

impl fmt::Display for WorkflowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.knot, self.rkey, self.name)
    }
}

/// The pipeline's at-uri, built from the knot source key verbatim (it may contain `:port`).
pub fn pipeline_uri(knot: &str, rkey: &str) -> String {
    format!("at://did:web:{knot}/sh.tangled.pipeline/{rkey}")
}

/// Split a pipeline at-uri back into (knot, rkey).
pub fn parse_pipeline_uri(uri: &str) -> Option<(&str, &str)> {
    let rest = uri.strip_prefix("at://did:web:")?;
    let (knot, rkey) = rest.split_once("/sh.tangled.pipeline/")?;
    (!knot.is_empty() && !rkey.is_empty() && !rkey.contains('/')).then_some((knot, rkey))
}

/// Go's normalisation for log file names: every character outside `[a-zA-Z0-9_.-]` becomes `-`.
pub fn normalize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || "_.-".contains(c) { c } else { '-' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_file_name_matches_go() {
        let id = WorkflowId::new("knot1.tangled.sh", "3m734z2gwll22", "test.yml");
        assert_eq!(id.log_file_name(), "knot1.tangled.sh-3m734z2gwll22-test.yml.log");
        assert_eq!(
            WorkflowId::new("localhost:6000", "r", "a b/c.yml").log_file_name(),
            "localhost-6000-r-a-b-c.yml.log"
        );
    }

    #[test]
    fn pipeline_uri_round_trips() {
        let uri = pipeline_uri("localhost:3000", "3m734z2gwll22");
        assert_eq!(uri, "at://did:web:localhost:3000/sh.tangled.pipeline/3m734z2gwll22");
        assert_eq!(parse_pipeline_uri(&uri), Some(("localhost:3000", "3m734z2gwll22")));
        assert_eq!(parse_pipeline_uri("at://did:plc:x/sh.tangled.pipeline/r"), None);
    }
}
