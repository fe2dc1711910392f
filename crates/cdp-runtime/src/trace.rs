//! W3C trace context (`traceparent`) on log records (the header is
//! `cdp_pipeline::header::TRACEPARENT`): ingest writes it on touchpoint
//! records and identity copies it onto the resolved record, so the records
//! of one request carry one trace id through the log.
//!
//! With OTLP export on, the header carries the ingest span's context, so the
//! exported trace and the records agree. The workers' batch spans are not
//! yet linked to the records' traces (a batch holds many).

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `traceparent` of the current span, or a new trace's.
pub fn current_traceparent() -> String {
    let context = tracing::Span::current().context();
    let span = context.span();
    let sc = span.span_context();
    if sc.is_valid() {
        return format_traceparent(sc.trace_id(), sc.span_id(), sc.trace_flags());
    }
    let ids = uuid::Uuid::new_v4().as_u128();
    let trace = TraceId::from_bytes(ids.to_be_bytes());
    let span_bytes: [u8; 8] = (u64::try_from(ids >> 64).unwrap_or(1) | 1).to_be_bytes();
    format_traceparent(trace, SpanId::from_bytes(span_bytes), TraceFlags::SAMPLED)
}

fn format_traceparent(trace: TraceId, span: SpanId, flags: TraceFlags) -> String {
    format!("00-{trace}-{span}-{:02x}", flags.to_u8())
}

/// Parses a `traceparent` header (version 00).
pub fn parse_traceparent(value: &[u8]) -> Option<SpanContext> {
    let text = std::str::from_utf8(value).ok()?;
    let mut parts = text.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() || trace.len() != 32 || span.len() != 16 {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let sc = SpanContext::new(
        trace,
        span,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_traceparent_parses_back() {
        let t = current_traceparent();
        let sc = parse_traceparent(t.as_bytes()).unwrap();
        assert_eq!(
            format_traceparent(sc.trace_id(), sc.span_id(), sc.trace_flags()),
            t
        );
        assert_ne!(current_traceparent(), t, "two requests share a trace id");
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-xyz-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad}");
        }
        assert!(
            parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_some()
        );
    }
}
