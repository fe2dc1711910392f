//! Structured logging with `tracing`, and spans exported to an OpenTelemetry
//! collector over OTLP/gRPC when `telemetry.otlp_endpoint` is set.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, TelemetryConfig};

/// Flushes exported spans when dropped (at the end of `main`).
#[must_use = "dropping the guard stops span export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("telemetry: span export did not shut down cleanly: {error}");
        }
    }
}

/// Installs the global subscriber for process `service`; logs go to stderr
/// (stdout carries only the `CDP_READY` line). `RUST_LOG`
/// overrides the configured filter. With an OTLP endpoint it must run inside
/// a Tokio runtime (the gRPC exporter lives on it). Calling it twice is
/// harmless (the second call installs nothing).
pub fn init(config: &TelemetryConfig, service: &str) -> Telemetry {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.filter));
    let mut export_error = None;
    let provider = config.otlp_endpoint.as_ref().and_then(|endpoint| {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
        {
            Ok(exporter) => Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        opentelemetry_sdk::Resource::builder()
                            .with_service_name(service.to_owned())
                            .build(),
                    )
                    .build(),
            ),
            Err(error) => {
                export_error = Some(error.to_string());
                None
            }
        }
    });
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service.to_owned())));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let result = match config.format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .json()
                    .with_current_span(false)
                    .with_target(true),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(true),
            )
            .try_init(),
    };
    if result.is_err() {
        tracing::debug!("tracing subscriber already installed");
    }
    if let Some(error) = export_error {
        tracing::error!(%error, "cannot export spans over OTLP; continuing without");
    } else if let Some(endpoint) = &config.otlp_endpoint {
        tracing::info!(%endpoint, "exporting spans over OTLP");
    }
    Telemetry { provider }
}
