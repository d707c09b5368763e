//! Logging setup: `tracing` with an `EnvFilter` from `RUST_LOG` (default `info` for bobbin, `warn` for
//! dependencies), human-readable text or one JSON object per line (`BOBBIN_LOG_FORMAT=json`).

use tracing_subscriber::EnvFilter;

/// The filter used when `RUST_LOG` is unset or invalid.
pub const DEFAULT_FILTER: &str = "warn,bobbin=info";

/// Install the global subscriber. Calling it twice is harmless (the second call does nothing), so
/// tests and subcommands can call it freely.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

#[cfg(test)]
mod tests {
    #[test]
    fn init_is_idempotent_and_the_default_filter_parses() {
        super::init(false);
        super::init(true);
        assert!(tracing_subscriber::EnvFilter::try_new(super::DEFAULT_FILTER).is_ok());
    }
}
