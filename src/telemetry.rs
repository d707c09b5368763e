//! Logging setup: `tracing` with an `EnvFilter` from `RUST_LOG`, text or JSON.
