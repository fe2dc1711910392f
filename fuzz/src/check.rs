//! The invariants every target checks: bounded memory per decoder call,
//! precise errors, and helpers to state the rest.

use std::fmt;

/// What a decoder made of one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted; the text describes the shape of what was decoded (which
    /// decoders accepted, how many items), not its content.
    Accepted(String),
    /// Refused with these errors (as the decoder displays them).
    Rejected(String),
}

/// An invariant the decoder broke on one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub message: String,
    /// The id of a known, reported defect this is an instance of (see
    /// [`KNOWN`]): counted and shown, not a failure.
    pub known: Option<&'static str>,
}

impl Violation {
    pub fn new(message: impl Into<String>) -> Self {
        Violation {
            message: message.into(),
            known: None,
        }
    }

    pub fn known(id: &'static str, message: impl Into<String>) -> Self {
        Violation {
            message: message.into(),
            known: Some(id),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.known {
            Some(id) => write!(f, "[known {id}] {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Defects the targets found that are reported but not fixed here: each
/// has a regression seed `corpus/<target>/bug-<id>*` that must keep
/// reproducing it (the smoke test checks), so that whoever fixes one
/// removes it from this list and renames its seed.
pub const KNOWN: &[(&str, &str)] = &[
    (
        "config-number-without-key",
        "a configuration integer beyond the TOML range (`partitions = 18446744073709551615`, or below it, or a float past f64) is refused \
         with \"number too large to fit in target type in <file>\", naming neither the key nor the line \
         (the `config` crate drops both)",
    ),
    (
        "credentials-untyped-field",
        "a `credentials` record with a field of the wrong type is refused with serde's \
         \"invalid type: ..., expected ...\" and no position or field (the record is an internally \
         tagged enum, which serde buffers before it reads the fields)",
    ),
];

/// Bytes one decoder call may hold per input byte.
pub const BYTES_PER_INPUT_BYTE: u64 = 64;

/// The same for the configuration loader: the `toml` and `config` crates
/// hold about 100 bytes per byte of TOML (measured: 149x for 2.5 KB, 113x
/// for 10 KB, 102x for 80 KB, 103x for 190 KB: linear, not growing), and
/// a configuration is the operator's file, not a client's body.
pub const CONFIG_BYTES_PER_INPUT_BYTE: u64 = 160;

/// The most one decoder call may hold allocated at once, for an input of
/// `len` bytes: 64 bytes per input byte plus 1 MiB.
pub fn memory_bound(len: usize) -> u64 {
    memory_bound_with(BYTES_PER_INPUT_BYTE, len)
}

/// `per_byte` bytes per input byte plus 1 MiB.
pub fn memory_bound_with(per_byte: u64, len: usize) -> u64 {
    (len as u64)
        .saturating_mul(per_byte)
        .saturating_add(1 << 20)
}

/// Runs one decoder call, failing when it held more than
/// [`memory_bound`] of `len` at any one time (allocations of this thread).
///
/// A call over the bound runs again and only fails when it is over again:
/// the first use of a lazily built table (the phone numbering plans, a
/// compiled pattern) is held by the process, not by the call.
pub fn measured<T>(what: &str, len: usize, f: impl Fn() -> T) -> Result<T, Violation> {
    measured_with(BYTES_PER_INPUT_BYTE, what, len, f)
}

/// [`measured`] with a bound of `per_byte` bytes per input byte.
pub fn measured_with<T>(
    per_byte: u64,
    what: &str,
    len: usize,
    f: impl Fn() -> T,
) -> Result<T, Violation> {
    let bound = memory_bound_with(per_byte, len);
    let mut out = None;
    let info = allocation_counter::measure(|| out = Some(f()));
    if info.bytes_max > bound {
        let again = allocation_counter::measure(|| out = Some(f()));
        if again.bytes_max > bound {
            return Err(Violation::new(format!(
                "{what} held {} bytes at once for an input of {len} bytes (bound {bound})",
                again.bytes_max
            )));
        }
    }
    out.ok_or_else(|| Violation::new(format!("{what} returned nothing")))
}

/// Fails with `message` unless `condition` holds.
pub fn ensure(condition: bool, message: impl FnOnce() -> String) -> Result<(), Violation> {
    if condition {
        Ok(())
    } else {
        Err(Violation::new(message()))
    }
}

/// A serde_json error from parsing bytes: it must say where (lines are
/// 1-based; line 0 means serde_json did not know).
pub fn json_syntax_error(what: &str, e: &serde_json::Error) -> Result<String, Violation> {
    let text = e.to_string();
    ensure(e.line() > 0, || {
        format!("{what}: a JSON error without a position: {text:?}")
    })?;
    non_empty(what, &text)?;
    Ok(text)
}

/// Whether two JSON values are equal but for floats one rounding apart.
pub fn json_close(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) if x.is_finite() && y.is_finite() => {
                x == y || (x - y).abs() <= x.abs().max(y.abs()) * 4.0 * f64::EPSILON
            }
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_close(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_close(v, w)))
        }
        _ => a == b,
    }
}

/// Whether an error text names what is wrong: a field or key (serde quotes
/// them in backticks: "missing field `x`", "unknown field `x`"; the config
/// crate in double quotes), or a position.
pub fn names_a_field_or_position(text: &str) -> bool {
    text.contains("field `")
        || text.contains("field \"")
        || text.contains("variant `")
        || text.contains("key `")
        || text.contains("key \"")
        || text.contains(" line ")
        || text.contains("column ")
}

/// An error text must have something to say.
pub fn non_empty(what: &str, text: &str) -> Result<(), Violation> {
    ensure(!text.trim().is_empty(), || {
        format!("{what}: an empty error")
    })
}

/// A [`cdp_domain::FieldError`] must name a field and say why.
pub fn field_error(what: &str, e: &cdp_domain::FieldError) -> Result<String, Violation> {
    ensure(!e.field.trim().is_empty(), || {
        format!("{what}: an error without a field: {e:?}")
    })?;
    ensure(!e.reason.trim().is_empty(), || {
        format!("{what}: an error without a reason: {e:?}")
    })?;
    Ok(e.to_string())
}

/// Every error of a rejection must be precise, and there must be one.
pub fn field_errors(what: &str, errors: &[cdp_domain::FieldError]) -> Result<String, Violation> {
    ensure(!errors.is_empty(), || {
        format!("{what}: refused without a reason")
    })?;
    let parts = errors
        .iter()
        .map(|e| field_error(what, e))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(parts.join("; "))
}

/// The shape of an error or outcome text, for telling kinds of outcomes
/// apart: quoted parts and numbers are blanked, so that two inputs refused
/// for the same reason count once.
pub fn shape(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(256));
    let mut quote: Option<char> = None;
    let mut last_digit = false;
    for c in text.chars() {
        match quote {
            Some(q) if c == q => {
                out.push(c);
                quote = None;
            }
            Some(_) => {}
            None if c == '"' || c == '`' => {
                out.push(c);
                out.push('…');
                quote = Some(c);
            }
            None if c.is_ascii_digit() => {
                if !last_digit {
                    out.push('#');
                }
            }
            None => out.push(c),
        }
        last_digit = quote.is_none() && c.is_ascii_digit();
        if out.len() > 240 {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_blank_quoted_parts_and_numbers() {
        assert_eq!(
            shape("\"yesterday\" is not a timestamp at line 12 column 3"),
            "\"…\" is not a timestamp at line # column #"
        );
        assert_eq!(shape("missing field `batch`"), "missing field `…`");
    }

    #[test]
    fn the_memory_bound_fails_a_call_that_holds_too_much() {
        let held = measured("big", 10, || vec![0u8; 4 << 20].len());
        assert!(held.is_err(), "{held:?}");
        assert_eq!(measured("small", 10, || vec![0u8; 1024].len()), Ok(1024));
    }

    #[test]
    fn json_errors_without_a_position_are_violations() {
        let parsed = serde_json::from_slice::<serde_json::Value>(b"{");
        let e = parsed.expect_err("not JSON");
        assert!(json_syntax_error("x", &e).is_ok());
        let typed = serde_json::from_value::<String>(serde_json::json!(5));
        let e = typed.expect_err("not a string");
        assert!(json_syntax_error("x", &e).is_err());
        assert!(!names_a_field_or_position(&e.to_string()));
    }
}
