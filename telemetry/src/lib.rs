//! Logs and traces of the VOITHER Edge binaries (`voither-gateway`, `voither-hub`).
//!
//! [`init`] installs one `tracing` subscriber with two layers, each with its own filter:
//!
//! - **Logs** on stderr, human-readable text by default or JSON lines (`--log-json`,
//!   `[log] json = true`), filtered by `RUST_LOG` or the binary's default directives.
//! - **Traces** (cargo feature `otlp`, and only when an endpoint is given): every span that
//!   passes `VOITHER_OTLP_FILTER` (default: the binary's default directives, so INFO spans
//!   of our own crates) is exported over OTLP/HTTP with JSON encoding to
//!   `<endpoint>/v1/traces` when it closes. The spans are whatever the code declares
//!   (the gateway's `sync_batch`, the hub's `sink_commit`, …); this crate adds none.
//!
//! Without the feature the crate holds no exporter code; an endpoint passed anyway is
//! answered with one warning.
//!
//! Invariants of the exporter (feature `otlp`):
//! - Memory is bounded: a finished span goes through a bounded queue to one exporter
//!   thread, and is dropped and counted when the queue is full (collector slow or down).
//! - Instrumented code never waits for the network: closing a span is a `try_send`.
//! - [`Telemetry::shutdown`] flushes what is queued, bounded by a timeout.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "otlp")]
pub mod otlp;

use std::time::Duration;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

/// What [`init`] needs to know about the binary.
#[derive(Debug, Clone)]
pub struct Options {
    /// `service.name` of exported spans, for example `voither-gateway`.
    pub service: &'static str,
    /// `service.version`.
    pub version: &'static str,
    /// `service.instance.id` (the hub id, for example); the host name when `None`.
    pub instance_id: Option<String>,
    /// JSON lines instead of human-readable text.
    pub json: bool,
    /// Log filter directives used when `RUST_LOG` is unset or invalid; also the span
    /// filter of the exporter when `VOITHER_OTLP_FILTER` is unset.
    pub default_filter: &'static str,
    /// OTLP base endpoint (`http://host:4318`); spans go to `<endpoint>/v1/traces`.
    pub otlp_endpoint: Option<String>,
}

/// The installed logging and tracing; keep it until the end of `main` and call
/// [`Telemetry::shutdown`] to flush exported spans.
#[derive(Debug)]
#[must_use = "call shutdown() at exit so queued spans are exported"]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    exporter: Option<otlp::Exporter>,
}

impl Telemetry {
    /// Exports what is still queued (spans closed before this call), waiting at most
    /// `timeout`. Does nothing without an exporter.
    pub fn shutdown(self, timeout: Duration) {
        #[cfg(feature = "otlp")]
        if let Some(e) = self.exporter {
            e.shutdown(timeout);
        }
        #[cfg(not(feature = "otlp"))]
        let _ = timeout;
    }

    /// Counters of the span exporter (exported, dropped), when one runs.
    #[cfg(feature = "otlp")]
    pub fn otlp_stats(&self) -> Option<std::sync::Arc<otlp::Stats>> {
        self.exporter.as_ref().map(otlp::Exporter::stats)
    }
}

/// Installs the global `tracing` subscriber (logs, and spans export when built with
/// the feature `otlp` and `opts.otlp_endpoint` is set). Call once, before any thread
/// that logs is started.
pub fn init(opts: Options) -> Telemetry {
    let log_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(opts.default_filter));
    let logs = if opts.json {
        fmt::layer().json().with_writer(std::io::stderr).boxed()
    } else {
        fmt::layer().with_writer(std::io::stderr).boxed()
    };
    let registry = tracing_subscriber::registry().with(logs.with_filter(log_filter));
    let endpoint = opts.otlp_endpoint.clone().filter(|e| !e.trim().is_empty());

    #[cfg(feature = "otlp")]
    {
        let (layer, exporter, error) = match endpoint {
            None => (None, None, None),
            Some(ep) => match otlp::start(&ep, otlp::Resource::new(&opts)) {
                Ok((layer, exporter)) => {
                    (Some(layer.with_filter(otlp::span_filter(opts.default_filter))), Some(exporter), None)
                }
                Err(e) => (None, None, Some((ep, e))),
            },
        };
        registry.with(layer).init();
        if let Some(e) = &exporter {
            tracing::info!(url = %e.url(), service = opts.service, "Exporting spans over OTLP/HTTP.");
        }
        if let Some((endpoint, error)) = error {
            tracing::warn!(%endpoint, %error, "Invalid OTLP endpoint; no spans are exported.");
        }
        Telemetry { exporter }
    }

    #[cfg(not(feature = "otlp"))]
    {
        registry.init();
        if let Some(endpoint) = endpoint {
            tracing::warn!(
                %endpoint,
                "An OTLP endpoint is set, but this build has no OTLP export (cargo feature `otlp`); no spans are exported."
            );
        }
        Telemetry {}
    }
}
