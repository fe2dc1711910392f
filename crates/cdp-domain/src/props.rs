//! Typed readers for the properties the fold understands (Segment's
//! e-commerce spec plus our omnichannel events). Validation and the fold use
//! the same readers, so what validation accepts the fold can read.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::Value;

use crate::event::Attributes;

/// Reads a string-like id (`"A1"` or `42`).
pub fn id(props: &Attributes, key: &str) -> Result<Option<String>, String> {
    match props.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Err("must not be empty".into()),
        Some(Value::String(s)) => Ok(Some(s.trim().to_owned())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err("must be a string or a number".into()),
    }
}

/// Reads a non-negative decimal amount (`1250000`, `"1250000"`, `19.99`).
pub fn amount(props: &Attributes, key: &str) -> Result<Option<Decimal>, String> {
    let text = match props.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) => s.trim().replace([',', '_'], ""),
        Some(_) => return Err("must be a number".into()),
    };
    let value = Decimal::from_str(&text)
        .or_else(|_| Decimal::from_scientific(&text))
        .map_err(|_| format!("{text:?} is not a decimal number"))?;
    if value.is_sign_negative() && !value.is_zero() {
        return Err("must not be negative".into());
    }
    Ok(Some(value.normalize()))
}

/// Reads a whole number within `[min, max]`.
pub fn integer(props: &Attributes, key: &str, min: i64, max: i64) -> Result<Option<i64>, String> {
    let n = match props.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
                    .map(|f| f as i64)
            })
            .ok_or_else(|| "must be a whole number".to_string())?,
        Some(Value::String(s)) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| "must be a whole number".to_string())?,
        Some(_) => return Err("must be a whole number".into()),
    };
    if n < min || n > max {
        return Err(format!("must be between {min} and {max}"));
    }
    Ok(Some(n))
}

/// Reads a string.
pub fn text(props: &Attributes, key: &str) -> Option<String> {
    match props.get(key) {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        _ => None,
    }
}

/// Reads a boolean (`true`, `"yes"`, `"granted"`...).
pub fn boolean(props: &Attributes, key: &str) -> Result<Option<bool>, String> {
    match props.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => boolean_value(v).map(Some),
    }
}

/// [`boolean`] of a value that is there.
pub fn boolean_value(v: &Value) -> Result<bool, String> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "granted" | "opt_in" | "1" => Ok(true),
            "false" | "no" | "denied" | "revoked" | "opt_out" | "0" => Ok(false),
            _ => Err("must be true or false".into()),
        },
        _ => Err("must be true or false".into()),
    }
}

/// Reads an ISO 4217 currency code, upper-cased.
pub fn currency(props: &Attributes, key: &str) -> Result<Option<String>, String> {
    match props.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let code = s.trim().to_ascii_uppercase();
            if code.len() == 3 && code.chars().all(|c| c.is_ascii_uppercase()) {
                Ok(Some(code))
            } else {
                Err(format!(
                    "{s:?} is not a three-letter ISO 4217 currency code"
                ))
            }
        }
        Some(_) => Err("must be a three-letter currency code".into()),
    }
}

/// The order amount: Segment's `total`, else `revenue`, else `value`.
pub const AMOUNT_KEYS: [&str; 3] = ["total", "revenue", "value"];

pub fn order_amount(
    props: &Attributes,
) -> Result<Option<(&'static str, Decimal)>, (&'static str, String)> {
    for key in AMOUNT_KEYS {
        match amount(props, key) {
            Ok(Some(v)) => return Ok(Some((key, v))),
            Ok(None) => {}
            Err(e) => return Err((key, e)),
        }
    }
    Ok(None)
}

/// A product line of an order or cart event.
#[derive(Debug, Clone, PartialEq)]
pub struct ProductLine {
    pub product_id: String,
    pub name: Option<String>,
    pub quantity: i64,
    pub price: Option<Decimal>,
}

/// Reads the product of a `Product Added`/`Product Removed`/`Product Viewed` event.
pub fn product(props: &Attributes) -> Result<Option<ProductLine>, (&'static str, String)> {
    let product_id = match id(props, "product_id").map_err(|e| ("product_id", e))? {
        Some(p) => p,
        None => match id(props, "sku").map_err(|e| ("sku", e))? {
            Some(s) => s,
            None => return Ok(None),
        },
    };
    let quantity = integer(props, "quantity", 1, 1_000_000)
        .map_err(|e| ("quantity", e))?
        .unwrap_or(1);
    let price = amount(props, "price").map_err(|e| ("price", e))?;
    Ok(Some(ProductLine {
        product_id,
        name: text(props, "name"),
        quantity,
        price,
    }))
}

/// Number of items of an order: the sum of `products[].quantity`, else `quantity`.
pub fn item_count(props: &Attributes) -> i64 {
    match props.get("products") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::Object(map) => integer(map, "quantity", 1, 1_000_000)
                    .ok()
                    .flatten()
                    .unwrap_or(1),
                _ => 1,
            })
            .sum(),
        _ => integer(props, "quantity", 0, 1_000_000)
            .ok()
            .flatten()
            .unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn attrs(v: Value) -> Attributes {
        match v {
            Value::Object(m) => m,
            _ => Attributes::new(),
        }
    }

    #[test]
    fn amounts_accept_numbers_and_numeric_strings() {
        let p = attrs(json!({"a": 1250000, "b": "1,250,000", "c": 19.99, "d": -1, "e": "abc"}));
        assert_eq!(amount(&p, "a").unwrap(), Some(Decimal::from(1_250_000)));
        assert_eq!(amount(&p, "b").unwrap(), Some(Decimal::from(1_250_000)));
        assert_eq!(amount(&p, "c").unwrap(), Some(Decimal::new(1999, 2)));
        assert!(amount(&p, "d").is_err());
        assert!(amount(&p, "e").is_err());
        assert_eq!(amount(&p, "missing").unwrap(), None);
    }

    #[test]
    fn item_count_sums_product_quantities() {
        let p =
            attrs(json!({"products": [{"product_id": "a", "quantity": 2}, {"product_id": "b"}]}));
        assert_eq!(item_count(&p), 3);
    }
}
