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
///
/// tokio-postgres logs every statement's text at debug, and some statements
/// carry a password (a move's `CREATE SUBSCRIPTION ... CONNECTION`): its
/// debug events stay off unless the filter names `tokio_postgres` itself.
pub fn init_logging(default_filter: &str) {
    let directives = std::env::var("SHARDLINE_LOG").unwrap_or_else(|_| default_filter.to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(with_quiet_statements(&directives))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// `directives` with `tokio_postgres=info` added unless they name it.
fn with_quiet_statements(directives: &str) -> String {
    if directives.contains("tokio_postgres") {
        directives.to_string()
    } else if directives.trim().is_empty() {
        "tokio_postgres=info".to_string()
    } else {
        format!("{directives},tokio_postgres=info")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_texts_stay_out_of_debug_logs_unless_asked_for() {
        assert_eq!(with_quiet_statements("debug"), "debug,tokio_postgres=info");
        assert_eq!(
            with_quiet_statements("info,tokio_postgres=trace"),
            "info,tokio_postgres=trace"
        );
        assert_eq!(with_quiet_statements(""), "tokio_postgres=info");
    }
}
