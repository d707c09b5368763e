//! Tekton: the API types bobbin uses and the translation of a WorkflowRun into a PipelineRun.

pub mod types;

pub use types::{PipelineRun, PipelineRunSpec, PipelineRunStatus, TaskRun, TaskRunStatus};
