//! Log metrics: how much the followers write, how often streams had to be reopened, and how many
//! viewers watch (or were dropped for being too slow).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Cheap to clone; clones share the same series.
#[derive(Debug, Clone, Default)]
pub struct LogMetrics {
    pub lines_written: Counter,
    pub bytes_written: Counter,
    pub stream_reconnects: Counter,
    pub follower_failures: Counter,
    pub followers: Gauge,
    pub viewers: Gauge,
    pub viewers_dropped: Counter,
}

impl LogMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "bobbin_log_lines_written",
            "Log lines appended to log files",
            self.lines_written.clone(),
        );
        registry.register(
            "bobbin_log_bytes_written",
            "Bytes appended to log files",
            self.bytes_written.clone(),
        );
        registry.register(
            "bobbin_log_stream_reconnects",
            "pods/log streams reopened after a break or an idle period while the container ran",
            self.stream_reconnects.clone(),
        );
        registry.register(
            "bobbin_log_follower_failures",
            "Log followers that stopped with an error",
            self.follower_failures.clone(),
        );
        registry.register(
            "bobbin_log_followers",
            "Workflows whose logs are being followed",
            self.followers.clone(),
        );
        registry.register("bobbin_log_viewers", "Open /logs connections", self.viewers.clone());
        registry.register(
            "bobbin_log_viewers_dropped",
            "/logs viewers closed for falling behind",
            self.viewers_dropped.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_every_series() {
        let m = LogMetrics::default();
        m.lines_written.inc_by(3);
        m.viewers.inc();
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains("bobbin_log_lines_written_total 3"), "{text}");
        assert!(text.contains("bobbin_log_viewers 1"), "{text}");
        assert!(text.contains("bobbin_log_viewers_dropped_total 0"), "{text}");
    }
}
