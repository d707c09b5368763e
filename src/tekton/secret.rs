//! The per-run Secret: the repo's secret values for one run, referenced by the steps'
//! `secretKeyRef`s. It is the only object that holds values; it is owned by the WorkflowRun, so it
//! goes away with the run.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

use super::translate::{object_meta, secret_name};
use crate::crd::WorkflowRun;

/// The Secret for `run` holding `values` (key → value), named like [`secret_name`] (which the
/// PipelineRun references), labelled like the PipelineRun.
pub fn per_run_secret(run: &WorkflowRun, values: &BTreeMap<String, String>) -> Secret {
    Secret {
        metadata: object_meta(run, secret_name(run), None),
        type_: Some("Opaque".into()),
        data: Some(values.iter().map(|(k, v)| (k.clone(), ByteString(v.as_bytes().to_vec()))).collect()),
        ..Secret::default()
    }
}
