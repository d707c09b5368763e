//! bobbin: a tangled.org spindle that runs every workflow as a Tekton PipelineRun.
//!
//! Layout (see `../shared/DESIGN.md` for the data flow):
//! - [`model`]: tangled's wire types and workflow YAML, pure;
//! - [`crd`]: the `WorkflowRun` custom resource;
//! - [`tekton`]: Tekton API types and the pure WorkflowRun → PipelineRun translation;
//! - [`controller`]: the kube-runtime controller and the pure status mapping;
//! - [`intake`]: Jetstream and knot event streams → WorkflowRuns;
//! - [`logs`]: following step containers, masking, log files;
//! - [`server`]: `/events`, `/logs`, XRPC, health and metrics over HTTP;
//! - [`auth`], [`secrets`], [`store`]: service auth, secrets providers, the SQLite store.

pub mod atproto;
pub mod auth;
pub mod cli;
pub mod config;
pub mod controller;
pub mod crd;
pub mod duration;
pub mod intake;
pub mod logs;
pub mod metrics;
pub mod model;
pub mod naming;
pub mod plan;
pub mod secrets;
pub mod server;
pub mod store;
pub mod tekton;
pub mod telemetry;
#[cfg(test)]
pub(crate) mod testkit;
pub mod yaml;
