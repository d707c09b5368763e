//! The WorkflowRun controller: reconcile into Tekton PipelineRuns, map their status, queue, cancel, clean up.
