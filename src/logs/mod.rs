//! Step logs: follow Tekton step containers, mask secrets, persist NDJSON files, fan out to viewers.
