//! Intake: Jetstream records and knot event streams become registered repos and WorkflowRuns.
