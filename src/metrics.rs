//! Prometheus metrics: one registry, served on `/metrics`.
