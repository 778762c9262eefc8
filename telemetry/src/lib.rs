//! telemetry: how shardline's binaries report to operators, apart from their
//! own output.
//!
//! - [`metrics_http`]: the `GET /metrics` endpoint Prometheus scrapes; each
//!   daemon renders its own metrics text.
//! - [`init_logging`]: logs to stderr, filtered by `SHARDLINE_LOG`.
//!
//! It knows nothing of the map, etcd or Postgres, so every binary can use it
//! without pulling in another's dependencies.

pub mod metrics_http;

pub use metrics_http::{counter, encode, gauge, serve, CONTENT_TYPE};

/// Sends `tracing` events to stderr. `SHARDLINE_LOG` (an `EnvFilter`
/// directive such as `debug` or `proxy=trace,info`) picks what is shown;
/// without it, `default_filter` does (daemons say `info`, the CLI `warn` so
/// that its own output stays readable).
pub fn init_logging(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHARDLINE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
