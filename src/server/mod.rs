//! The HTTP server: motd, `/events`, `/logs`, XRPC, health and metrics.
