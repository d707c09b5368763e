//! Status events: what `/events` sends (spec §6.2), and the TIDs that key them.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::ids::WorkflowId;

/// NSID of every frame on `/events`.
pub const STATUS_NSID: &str = "sh.tangled.pipeline.status";

/// A workflow's status as tangled knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StatusKind {
    Pending,
    Running,
    Success,
    Failed,
    Timeout,
    Cancelled,
}

impl StatusKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StatusKind::Pending => "pending",
            StatusKind::Running => "running",
            StatusKind::Success => "success",
            StatusKind::Failed => "failed",
            StatusKind::Timeout => "timeout",
            StatusKind::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => StatusKind::Pending,
            "running" => StatusKind::Running,
            "success" => StatusKind::Success,
            "failed" => StatusKind::Failed,
            "timeout" => StatusKind::Timeout,
            "cancelled" => StatusKind::Cancelled,
            _ => return None,
        })
    }

    /// success, failed, timeout and cancelled end a workflow.
    pub fn is_final(self) -> bool {
        !matches!(self, StatusKind::Pending | StatusKind::Running)
    }
}

impl std::fmt::Display for StatusKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `event` of a status frame. Field order is alphabetical, as Go's generic-map encoder writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRecord {
    #[serde(rename = "$type", default)]
    pub type_: String,
    /// RFC 3339, seconds precision, UTC `Z`.
    #[serde(rename = "createdAt")]
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(rename = "exitCode", default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    pub pipeline: String,
    pub status: StatusKind,
    pub workflow: String,
}

impl StatusRecord {
    /// A status for `id` created at `at` (its seconds are kept, as Go's formatting does).
    pub fn new(id: &WorkflowId, status: StatusKind, at: jiff::Timestamp) -> Self {
        StatusRecord {
            type_: String::new(),
            created_at: rfc3339_seconds(at),
            error: None,
            exit_code: None,
            pipeline: id.pipeline_uri(),
            status,
            workflow: id.name.clone(),
        }
    }

    /// Attach `error` and `exitCode`, as failures carry them.
    pub fn with_error(mut self, error: impl Into<String>, exit_code: i64) -> Self {
        self.error = Some(error.into());
        self.exit_code = Some(exit_code);
        self
    }
}

/// One `/events` frame: `{"event": {...}, "nsid": "sh.tangled.pipeline.status", "rkey": TID}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusFrame {
    pub event: StatusRecord,
    pub nsid: String,
    pub rkey: String,
}

impl StatusFrame {
    pub fn new(rkey: String, event: StatusRecord) -> Self {
        StatusFrame { event, nsid: STATUS_NSID.to_owned(), rkey }
    }

    /// Compact JSON, keys in Go's order.
    pub fn to_json(&self) -> String {
        // Serializing plain strings and integers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// `2025-12-03T09:21:50Z`: RFC 3339 truncated to seconds, UTC.
pub fn rfc3339_seconds(at: jiff::Timestamp) -> String {
    let secs = at.as_second();
    jiff::Timestamp::from_second(secs)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

const TID_ALPHABET: &[u8; 32] = b"234567abcdefghijklmnopqrstuvwxyz";

/// Encode a TID: 53-bit microseconds since the epoch and a 10-bit clock id, base32-sortable.
pub fn encode_tid(micros: u64, clock_id: u16) -> String {
    let value = ((micros & ((1 << 53) - 1)) << 10) | u64::from(clock_id & 0x3ff);
    (0..13).map(|i| TID_ALPHABET[((value >> (60 - i * 5)) & 0x1f) as usize] as char).collect()
}

/// Decode a TID back to (microseconds, clock id); `None` if it is not a TID.
pub fn decode_tid(tid: &str) -> Option<(u64, u16)> {
    if tid.len() != 13 {
        return None;
    }
    let mut value: u64 = 0;
    for b in tid.bytes() {
        let digit = TID_ALPHABET.iter().position(|&a| a == b)? as u64;
        value = (value << 5) | digit;
    }
    if value >> 63 != 0 {
        return None;
    }
    Some((value >> 10, (value & 0x3ff) as u16))
}

/// A monotonic TID source: every call returns a TID strictly greater than the last (clock id 0,
/// like Go's), even if the wall clock stalls or steps back.
#[derive(Debug, Default)]
pub struct TidClock {
    last: Mutex<u64>,
}

impl TidClock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Start after `micros`, e.g. the newest TID already stored, so restarts never reuse one.
    pub fn starting_after(micros: u64) -> Self {
        TidClock { last: Mutex::new(micros) }
    }

    pub fn next(&self) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let micros = now.max(*last + 1);
        *last = micros;
        encode_tid(micros, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_match_the_fixture_byte_for_byte() {
        let path = format!(
            "{}/../shared/spec/fixtures/spindle-events/status-sequence.jsonl",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(path).expect("fixture");
        for line in text.lines() {
            let frame: StatusFrame = serde_json::from_str(line).expect(line);
            assert_eq!(frame.to_json(), line);
        }
    }

    #[test]
    fn records_are_built_like_go() {
        let id = WorkflowId::new("knot1.tangled.sh", "3m734z2gwll22", "build.yml");
        let at: jiff::Timestamp = "2025-12-03T09:23:02.987654Z".parse().expect("ts");
        let rec = StatusRecord::new(&id, StatusKind::Failed, at).with_error("workflow failed", -1);
        let frame = StatusFrame::new("3m73537k6b622".into(), rec);
        assert_eq!(
            frame.to_json(),
            r#"{"event":{"$type":"","createdAt":"2025-12-03T09:23:02Z","error":"workflow failed","exitCode":-1,"pipeline":"at://did:web:knot1.tangled.sh/sh.tangled.pipeline/3m734z2gwll22","status":"failed","workflow":"build.yml"},"nsid":"sh.tangled.pipeline.status","rkey":"3m73537k6b622"}"#
        );
    }

    #[test]
    fn tids_round_trip_sort_and_stay_monotonic() {
        let tid = encode_tid(1_764_753_710_415_002, 0);
        assert_eq!(tid.len(), 13);
        assert_eq!(decode_tid(&tid), Some((1_764_753_710_415_002, 0)));
        assert!(encode_tid(1, 0) < encode_tid(2, 0));
        for fixture_tid in ["3m734z2jkaw22", "3m73537k6b622"] {
            let (micros, clock) = decode_tid(fixture_tid).expect("valid tid");
            assert_eq!(encode_tid(micros, clock), fixture_tid);
        }
        let clock = TidClock::starting_after(u64::MAX >> 12);
        let a = clock.next();
        let b = clock.next();
        assert!(a < b, "{a} < {b}");
        assert_eq!(decode_tid("not-a-tid-xxx"), None);
    }
}
