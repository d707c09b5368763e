//! Tekton: the API types bobbin uses and the translation of a WorkflowRun into a PipelineRun.

#[cfg(test)]
pub(crate) mod golden;
#[cfg(test)]
pub(crate) mod schema_check;
pub mod secret;
pub mod shell;
pub mod system_tasks;
pub mod translate;
pub mod types;

pub use secret::per_run_secret;
pub use translate::{TranslateError, TranslateInput, TranslateSettings, translate};
pub use types::{PipelineRun, PipelineRunSpec, PipelineRunStatus, TaskRun, TaskRunStatus};
