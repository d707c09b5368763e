//! Deterministic Kubernetes names for a workflow run.
//!
//! One name serves the WorkflowRun and its PipelineRun, so `kubectl get wfr,pr` lines up. It is a
//! DNS-1123 label (≤ 63 characters, `[a-z0-9-]`, alphanumeric at both ends) made of a readable
//! prefix from the workflow id and a hash of the full id, so ids that read alike (`test.yml` and
//! `test-yml`, or two long names sharing a prefix) never share a name.

use sha2::{Digest, Sha256};

use crate::model::WorkflowId;

/// Longest DNS-1123 label.
pub const MAX_NAME_LEN: usize = 63;
const HASH_LEN: usize = 10;

/// The WorkflowRun/PipelineRun name for a workflow id.
pub fn run_name(id: &WorkflowId) -> String {
    let hash = short_hash(&[&id.knot, &id.rkey, &id.name]);
    let readable =
        dns_label_prefix(&format!("{}-{}-{}", id.knot, id.rkey, id.name), MAX_NAME_LEN - HASH_LEN - 1);
    if readable.is_empty() { format!("wf-{hash}") } else { format!("{readable}-{hash}") }
}

/// Name of the per-run Secret that carries the repo's secrets into the steps.
pub fn secret_name(run_name: &str) -> String {
    format!("{run_name}-secrets")
}

/// Lowercase `s`, turn everything outside `[a-z0-9]` into single dashes, trim dashes and cut to
/// `max` characters (never ending on a dash).
pub fn dns_label_prefix(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars().flat_map(char::to_lowercase) {
        if out.len() >= max {
            break;
        }
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    out
}

/// A label value (≤ 63, `[A-Za-z0-9._-]`, alphanumeric ends) for an arbitrary string, or `None`
/// when the string cannot be kept readable as one (then it belongs in an annotation).
pub fn label_value(s: &str) -> Option<String> {
    let ok = s.len() <= MAX_NAME_LEN
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && s.chars().next().is_none_or(|c| c.is_ascii_alphanumeric())
        && s.chars().last().is_none_or(|c| c.is_ascii_alphanumeric());
    ok.then(|| s.to_owned())
}

/// Encode a string that may not be a valid label value (a DID, a repo name) into one that is:
/// readable prefix plus a hash when anything had to change.
pub fn encoded_label_value(s: &str) -> String {
    if let Some(v) = label_value(s) {
        return v;
    }
    let hash = short_hash(&[s]);
    let readable: String =
        s.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    let readable = readable.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    let cut: String = readable.chars().take(MAX_NAME_LEN - HASH_LEN - 1).collect();
    let cut = cut.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    if cut.is_empty() { hash } else { format!("{cut}.{hash}") }
}

/// First `HASH_LEN` hex characters of SHA-256 over the NUL-joined parts.
fn short_hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.update([0u8]);
        }
        h.update(p.as_bytes());
    }
    h.finalize().iter().take(HASH_LEN / 2).map(|b| format!("{b:02x}")).collect()
}

/// Is `s` a DNS-1123 label?
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn readable_and_stable() {
        let id = WorkflowId::new("knot1.tangled.sh", "3m734z2gwll22", "test.yml");
        let name = run_name(&id);
        assert!(name.starts_with("knot1-tangled-sh-3m734z2gwll22-test-yml-"), "{name}");
        assert_eq!(name, run_name(&id.clone()));
        assert_ne!(name, run_name(&WorkflowId::new("knot1.tangled.sh", "3m734z2gwll22", "test-yml")));
        assert!(is_dns1123_label(&name));
    }

    #[test]
    fn labels_encode_dids() {
        assert_eq!(label_value("knot1.tangled.sh").as_deref(), Some("knot1.tangled.sh"));
        let did = encoded_label_value("did:plc:rjnvgfygwwqc5hyfsxmecosf");
        assert!(did.starts_with("did_plc_rjnvgfygwwqc5hyfsxmecosf."), "{did}");
        assert!(label_value(&did).is_some());
        assert_ne!(encoded_label_value("a:b"), encoded_label_value("a_b"));
    }

    proptest! {
        #[test]
        fn names_are_valid_labels(knot in ".{0,80}", rkey in ".{0,40}", name in ".{0,120}") {
            let n = run_name(&WorkflowId::new(knot.clone(), rkey.clone(), name.clone()));
            prop_assert!(is_dns1123_label(&n), "{n:?}");
            prop_assert!(n.len() <= MAX_NAME_LEN);
            prop_assert_eq!(&n, &run_name(&WorkflowId::new(knot, rkey, name)));
        }

        #[test]
        fn different_ids_get_different_names(a in "[a-z.:-]{1,70}", b in "[a-z.:-]{1,70}", rkey in "[a-z2-7]{13}") {
            prop_assume!(a != b);
            prop_assert_ne!(
                run_name(&WorkflowId::new("knot", rkey.clone(), a)),
                run_name(&WorkflowId::new("knot", rkey, b))
            );
        }

        #[test]
        fn encoded_labels_are_valid(s in ".{0,200}") {
            let v = encoded_label_value(&s);
            prop_assert!(label_value(&v).is_some(), "{v:?}");
        }
    }
}
