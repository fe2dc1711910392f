//! Computed traits: values derived from a customer's events (Segment's
//! computed traits): an event counter, the sum, average, minimum or maximum
//! of a numeric property, the most frequent, first or last value of a
//! property, a property's unique values or their count, each over the
//! events an [`EventFilter`] keeps and within a [`Window`].
//!
//! Their state folds like the profile: the value does not depend on the
//! order events arrive in, and absorbing another customer's state gives
//! what folding both customers' events into one would. Each event is
//! folded once: the caller folds only the events the profile applied
//! (`Profile::apply` returned true), in the same transaction.
//!
//! A windowed trait keeps each matching event's values with its time, so
//! its value at any instant is exact and [`Computed::next_expiry`] says
//! when it next changes without a new event (the stage's timer).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::DefinitionError;
use crate::{Channel, EventId, Touchpoint, UnixMillis};

/// Distinct values an all-time trait keeps per customer (the smallest in
/// their text order): unique lists, unique counts and most-frequent
/// values are exact below it.
pub const MAX_DISTINCT: usize = 1_000;

/// Events a windowed trait keeps per customer (the newest): its values
/// are exact while a customer has fewer matching events in the window.
pub const MAX_WINDOW_EVENTS: usize = 10_000;

/// The longest window: ten years.
pub const MAX_WINDOW_MS: i64 = 3_650 * DAY_MS;

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 60 * MINUTE_MS;
const DAY_MS: i64 = 24 * HOUR_MS;

/// What a computed trait computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    /// How many matching events.
    Count,
    /// The sum of a numeric property (0 without values).
    Sum,
    /// The mean of a numeric property.
    Avg,
    Min,
    Max,
    /// The value of a property seen most often (ties: the smallest).
    MostFrequent,
    /// The property's value on the earliest matching event.
    First,
    /// The property's value on the latest matching event.
    Last,
    /// The property's distinct values, as text, in order.
    UniqueList,
    /// How many distinct values the property had.
    UniqueCount,
}

impl Aggregate {
    pub const ALL: [Aggregate; 10] = [
        Aggregate::Count,
        Aggregate::Sum,
        Aggregate::Avg,
        Aggregate::Min,
        Aggregate::Max,
        Aggregate::MostFrequent,
        Aggregate::First,
        Aggregate::Last,
        Aggregate::UniqueList,
        Aggregate::UniqueCount,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Aggregate::Count => "count",
            Aggregate::Sum => "sum",
            Aggregate::Avg => "avg",
            Aggregate::Min => "min",
            Aggregate::Max => "max",
            Aggregate::MostFrequent => "most_frequent",
            Aggregate::First => "first",
            Aggregate::Last => "last",
            Aggregate::UniqueList => "unique_list",
            Aggregate::UniqueCount => "unique_count",
        }
    }

    fn numeric(self) -> bool {
        matches!(
            self,
            Aggregate::Sum | Aggregate::Avg | Aggregate::Min | Aggregate::Max
        )
    }

    fn distinct(self) -> bool {
        matches!(
            self,
            Aggregate::MostFrequent | Aggregate::UniqueList | Aggregate::UniqueCount
        )
    }
}

impl FromStr for Aggregate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Aggregate::ALL
            .into_iter()
            .find(|a| a.as_str() == s.trim())
            .ok_or_else(|| {
                format!(
                    "unknown aggregate {s:?}; expected one of {}",
                    Aggregate::ALL.map(Aggregate::as_str).join(", ")
                )
            })
    }
}

/// How far back a trait looks: all time, or the last N minutes, hours or
/// days before the instant it is read at. Written `"all"`, `"30m"`,
/// `"24h"`, `"7d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Window(Option<i64>);

impl Window {
    pub const ALL_TIME: Window = Window(None);

    /// The last `millis` milliseconds.
    pub fn last(millis: i64) -> Result<Window, String> {
        if millis <= 0 || millis > MAX_WINDOW_MS {
            return Err(format!(
                "a window must be longer than 0 and at most 3650d, found {millis} ms"
            ));
        }
        Ok(Window(Some(millis)))
    }

    pub fn millis(self) -> Option<i64> {
        self.0
    }
}

impl FromStr for Window {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() || s == "all" {
            return Ok(Window::ALL_TIME);
        }
        let bad =
            || format!("window {s:?} is not \"all\" or a number followed by m, h or d (\"7d\")");
        let unit = match s.chars().last() {
            Some('m') => MINUTE_MS,
            Some('h') => HOUR_MS,
            Some('d') => DAY_MS,
            _ => return Err(bad()),
        };
        let n: i64 = s[..s.len() - 1].parse().map_err(|_| bad())?;
        Window::last(n.checked_mul(unit).ok_or_else(bad)?)
    }
}

impl TryFrom<String> for Window {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Window> for String {
    fn from(w: Window) -> String {
        w.to_string()
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("all"),
            Some(ms) if ms % DAY_MS == 0 => write!(f, "{}d", ms / DAY_MS),
            Some(ms) if ms % HOUR_MS == 0 => write!(f, "{}h", ms / HOUR_MS),
            Some(ms) if ms % MINUTE_MS == 0 => write!(f, "{}m", ms / MINUTE_MS),
            // Only `Window::last` makes other lengths; shown in minutes, rounded up.
            Some(ms) => write!(f, "{}m", (ms + MINUTE_MS - 1) / MINUTE_MS),
        }
    }
}

/// How a [`Condition`] compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Some value equals `value`.
    Eq,
    /// No value equals `value` (true when the property is absent).
    Ne,
    Gt,
    Gte,
    Lt,
    Lte,
    /// The property has a value.
    Exists,
    /// Some value equals one of `value` (a list).
    In,
    /// Some text value contains `value` (text).
    Contains,
}

/// A condition on one property of an event. A property is a dotted path
/// into the event's properties (`products.product_id` reads every
/// product's id), or `$type`, `$channel`, `$source`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    pub property: String,
    pub op: Op,
    #[serde(default)]
    pub value: Value,
}

/// Which events a trait counts. Empty lists keep every type or channel.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventFilter {
    /// Event types, spelled as sent (`Order Completed`) or in snake case
    /// (`order_completed`): case, spaces, `_` and `-` do not count.
    #[serde(default)]
    pub types: Vec<String>,
    #[serde(default)]
    pub channels: Vec<Channel>,
    /// All must hold.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// A computed trait's definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraitDef {
    /// `[a-z][a-z0-9_]*`, at most 64 characters: how segments name it
    /// (`traits.orders_7d`).
    pub name: String,
    /// Set by the registry: each update gives a new version.
    #[serde(default)]
    pub version: u64,
    pub aggregate: Aggregate,
    /// The property aggregated; none for `count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub property: Option<String>,
    #[serde(default)]
    pub filter: EventFilter,
    #[serde(default)]
    pub window: Window,
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> DefinitionError {
    DefinitionError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Checks a definition's name: `[a-z][a-z0-9_]*`, at most 64 characters.
pub fn check_name(field: &str, name: &str) -> Result<(), DefinitionError> {
    let mut chars = name.chars();
    let ok = name.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(err(
            field,
            format!(
                "{name:?} is not a name: a lowercase letter, then lowercase letters, digits or \
                 '_', at most 64 characters"
            ),
        ))
    }
}

fn check_property(field: &str, property: &str) -> Result<(), DefinitionError> {
    if matches!(property, "$type" | "$channel" | "$source") {
        return Ok(());
    }
    if property.len() > 256 || property.split('.').any(|p| p.trim().is_empty()) {
        return Err(err(
            field,
            format!(
                "{property:?} is not a property: a dotted path of non-empty names \
                 (`products.product_id`), or $type, $channel, $source"
            ),
        ));
    }
    if property.starts_with('$') {
        return Err(err(
            field,
            format!("{property:?}: the names starting with $ are $type, $channel and $source"),
        ));
    }
    let personal = crate::access::PersonalKeys::default();
    if let Some(part) = property.split('.').find(|p| personal.is_personal(p)) {
        return Err(err(
            field,
            format!(
                "{part:?} holds personal data (an email, a phone, an address, a name...): \
                 audiences classify customers, they do not read who they are"
            ),
        ));
    }
    Ok(())
}

impl TraitDef {
    /// Checks the definition; the error names the field and why.
    pub fn check(&self) -> Result<(), DefinitionError> {
        check_name("name", &self.name)?;
        match (&self.property, self.aggregate) {
            (Some(_), Aggregate::Count) => {
                return Err(err(
                    "property",
                    "count takes no property (to count events with a property, add an \
                     `exists` condition to the filter)",
                ));
            }
            (None, a) if a != Aggregate::Count => {
                return Err(err(
                    "property",
                    format!("{} needs the property it aggregates", a.as_str()),
                ));
            }
            (Some(p), _) => check_property("property", p)?,
            (None, _) => {}
        }
        for (i, t) in self.filter.types.iter().enumerate() {
            if t.trim().is_empty() {
                return Err(err(format!("filter.types[{i}]"), "an event type is empty"));
            }
        }
        for (i, c) in self.filter.conditions.iter().enumerate() {
            let field = format!("filter.conditions[{i}]");
            check_property(&format!("{field}.property"), &c.property)?;
            let value = format!("{field}.value");
            match c.op {
                Op::Exists => {}
                Op::Gt | Op::Gte | Op::Lt | Op::Lte if decimal(&c.value).is_none() => {
                    return Err(err(value, "this comparison needs a number"));
                }
                Op::In if !c.value.is_array() => {
                    return Err(err(value, "`in` needs a list of values"));
                }
                Op::Contains if !c.value.is_string() => {
                    return Err(err(value, "`contains` needs text"));
                }
                Op::Eq | Op::Ne if c.value.is_null() || c.value.is_object() => {
                    return Err(err(
                        value,
                        "needs a text, number or boolean (use `exists` for presence)",
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether `t` counts for this trait.
    pub fn matches(&self, t: &Touchpoint) -> bool {
        let f = &self.filter;
        let env = &t.envelope;
        (f.types.is_empty()
            || f.types
                .iter()
                .any(|ty| same_type(ty, env.event_type.as_str())))
            && (f.channels.is_empty() || f.channels.contains(&env.channel))
            && f.conditions
                .iter()
                .all(|c| holds(c, &values_of(t, &c.property)))
    }
}

/// Whether two event type names are the same once case, spaces, `_` and
/// `-` are left out (`order_completed` is `Order Completed`).
fn same_type(a: &str, b: &str) -> bool {
    fn key(s: &str) -> impl Iterator<Item = char> + '_ {
        s.chars()
            .filter(|c| !matches!(c, ' ' | '_' | '-'))
            .flat_map(char::to_lowercase)
    }
    key(a).eq(key(b))
}

/// The scalar values `property` has on `t` (arrays are read through).
pub fn values_of(t: &Touchpoint, property: &str) -> Vec<Value> {
    let env = &t.envelope;
    match property {
        "$type" => return vec![Value::String(env.event_type.as_str().to_owned())],
        "$channel" => return vec![Value::String(env.channel.as_str().to_owned())],
        "$source" => return vec![Value::String(env.source_id.clone())],
        _ => {}
    }
    let mut parts = property.split('.');
    let Some(first) = parts.next() else {
        return Vec::new();
    };
    let mut current: Vec<&Value> = env.properties.get(first).into_iter().collect();
    for part in parts {
        let mut next = Vec::new();
        for v in current {
            collect_field(v, part, &mut next);
        }
        current = next;
    }
    let mut out = Vec::new();
    for v in current {
        flatten(v, &mut out);
    }
    out
}

fn collect_field<'a>(v: &'a Value, name: &str, out: &mut Vec<&'a Value>) {
    match v {
        Value::Object(m) => out.extend(m.get(name)),
        Value::Array(items) => {
            for i in items {
                collect_field(i, name, out);
            }
        }
        _ => {}
    }
}

fn flatten(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        Value::String(_) | Value::Number(_) | Value::Bool(_) => out.push(v.clone()),
        Value::Null | Value::Object(_) => {}
    }
}

/// A number, or text that is one (`"125000"`).
fn decimal(v: &Value) -> Option<Decimal> {
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Some(Decimal::from(i))
            } else if let Some(u) = n.as_u64() {
                Some(Decimal::from(u))
            } else {
                Decimal::from_str(&n.to_string()).ok()
            }
        }
        Value::String(s) => Decimal::from_str(s.trim()).ok(),
        _ => None,
    }
}

/// A value as text: how distinct values are told apart and listed.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(_) => decimal(v).map_or_else(|| v.to_string(), |d| d.normalize().to_string()),
        other => other.to_string(),
    }
}

fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(_), _) | (_, Value::Number(_)) => match (decimal(a), decimal(b)) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        },
        _ => a == b,
    }
}

fn holds(c: &Condition, values: &[Value]) -> bool {
    let cmp = |f: fn(std::cmp::Ordering) -> bool| {
        decimal(&c.value).is_some_and(|want| {
            values
                .iter()
                .filter_map(decimal)
                .any(|have| f(have.cmp(&want)))
        })
    };
    match c.op {
        Op::Exists => !values.is_empty(),
        Op::Eq => values.iter().any(|v| equal(v, &c.value)),
        Op::Ne => !values.iter().any(|v| equal(v, &c.value)),
        Op::Gt => cmp(|o| o.is_gt()),
        Op::Gte => cmp(|o| o.is_ge()),
        Op::Lt => cmp(|o| o.is_lt()),
        Op::Lte => cmp(|o| o.is_le()),
        Op::In => c
            .value
            .as_array()
            .is_some_and(|list| values.iter().any(|v| list.iter().any(|w| equal(v, w)))),
        Op::Contains => c.value.as_str().is_some_and(|needle| {
            values
                .iter()
                .any(|v| v.as_str().is_some_and(|s| s.contains(needle)))
        }),
    }
}

/// A property's value on one event, with when and which event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pick {
    pub at: UnixMillis,
    pub event: EventId,
    pub value: Value,
}

/// What an all-time trait keeps (only the parts its aggregate needs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    #[serde(default)]
    pub count: u64,
    #[serde(default, skip_serializing_if = "Decimal::is_zero")]
    pub sum: Decimal,
    /// How many numeric values the sum holds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub numbers: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<Decimal>,
    /// Distinct values (as text) and how often each was seen.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counts: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first: Option<Pick>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Pick>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn key(p: &Pick) -> (UnixMillis, EventId) {
    (p.at, p.event)
}

impl Totals {
    fn add(&mut self, aggregate: Aggregate, at: UnixMillis, event: EventId, values: &[Value]) {
        self.count += 1;
        if aggregate.numeric() {
            for d in values.iter().filter_map(decimal) {
                // A sum past Decimal's range (about 7.9e28) stays where it was.
                if let Some(s) = self.sum.checked_add(d) {
                    self.sum = s;
                    self.numbers += 1;
                }
                self.min = Some(self.min.map_or(d, |m| m.min(d)));
                self.max = Some(self.max.map_or(d, |m| m.max(d)));
            }
        }
        if aggregate.distinct() {
            for v in values {
                *self.counts.entry(text(v)).or_default() += 1;
            }
            self.cap();
        }
        if let Some(value) = values.first() {
            let pick = Pick {
                at,
                event,
                value: value.clone(),
            };
            match aggregate {
                Aggregate::First => self.take_first(pick),
                Aggregate::Last => self.take_last(pick),
                _ => {}
            }
        }
    }

    fn take_first(&mut self, pick: Pick) {
        if self.first.as_ref().is_none_or(|f| key(&pick) < key(f)) {
            self.first = Some(pick);
        }
    }

    fn take_last(&mut self, pick: Pick) {
        if self.last.as_ref().is_none_or(|l| key(&pick) > key(l)) {
            self.last = Some(pick);
        }
    }

    /// Keeps the [`MAX_DISTINCT`] smallest values: the same set whatever
    /// the order values came in or were merged.
    fn cap(&mut self) {
        while self.counts.len() > MAX_DISTINCT {
            self.counts.pop_last();
        }
    }

    fn absorb(&mut self, other: Totals) {
        self.count += other.count;
        if let Some(s) = self.sum.checked_add(other.sum) {
            self.sum = s;
            self.numbers += other.numbers;
        }
        self.min = match (self.min, other.min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.max = match (self.max, other.max) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        for (k, n) in other.counts {
            *self.counts.entry(k).or_default() += n;
        }
        self.cap();
        if let Some(f) = other.first {
            self.take_first(f);
        }
        if let Some(l) = other.last {
            self.take_last(l);
        }
    }

    fn value(&self, aggregate: Aggregate) -> Value {
        match aggregate {
            Aggregate::Count => Value::from(self.count),
            Aggregate::Sum => number(self.sum),
            Aggregate::Avg if self.numbers > 0 => {
                number((self.sum / Decimal::from(self.numbers)).round_dp(6))
            }
            Aggregate::Avg => Value::Null,
            Aggregate::Min => self.min.map_or(Value::Null, number),
            Aggregate::Max => self.max.map_or(Value::Null, number),
            Aggregate::MostFrequent => self
                .counts
                .iter()
                // The largest count; among equal counts the smallest value
                // (max_by_key keeps the last maximum, so iterate in reverse).
                .rev()
                .max_by_key(|(_, n)| **n)
                .map_or(Value::Null, |(k, _)| Value::String(k.clone())),
            Aggregate::First => self.first.as_ref().map_or(Value::Null, |p| p.value.clone()),
            Aggregate::Last => self.last.as_ref().map_or(Value::Null, |p| p.value.clone()),
            Aggregate::UniqueList => {
                Value::Array(self.counts.keys().cloned().map(Value::String).collect())
            }
            Aggregate::UniqueCount => Value::from(self.counts.len()),
        }
    }
}

/// A decimal as a JSON number: an integer when it is one.
pub(crate) fn number(d: Decimal) -> Value {
    let d = d.normalize();
    if d.fract().is_zero()
        && let Ok(i) = i64::try_from(d)
    {
        return Value::from(i);
    }
    f64::try_from(d).map_or(Value::Null, Value::from)
}

/// One matching event of a windowed trait. Stored as a list, `[at,
/// event]` or `[at, event, values]` (a customer keeps one per matching
/// event and trait, read and written with the profile at every event);
/// read from that or from an object with the same names.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Entry {
    pub at: UnixMillis,
    pub event: EventId,
    /// The property's values on it (none for `count`).
    #[serde(default)]
    pub values: Vec<Value>,
}

impl Serialize for Entry {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut t = serializer.serialize_tuple(if self.values.is_empty() { 2 } else { 3 })?;
        t.serialize_element(&self.at)?;
        t.serialize_element(&self.event)?;
        if !self.values.is_empty() {
            t.serialize_element(&self.values)?;
        }
        t.end()
    }
}

/// One trait's state for one customer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TraitState {
    /// The definition version it was folded under.
    pub version: u64,
    /// All-time traits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totals: Option<Totals>,
    /// Windowed traits: the matching events, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<Entry>,
    /// The entries keep each value once, on the newest event that had it
    /// (a unique list or count over a window: a value is in it while its
    /// newest event is).
    #[serde(default, skip_serializing_if = "is_false")]
    pub latest: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Whether `def`'s state keeps each value on its newest event only.
fn keeps_latest(def: &TraitDef) -> bool {
    def.window.millis().is_some()
        && matches!(
            def.aggregate,
            Aggregate::UniqueList | Aggregate::UniqueCount
        )
}

/// Whether two values count as the same distinct value (their text).
fn same_text(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(x), Value::String(y)) => x == y,
        _ => text(a) == text(b),
    }
}

impl TraitState {
    fn insert(&mut self, entry: Entry) {
        if self.latest {
            self.insert_latest(entry);
            return;
        }
        let k = (entry.at, entry.event);
        match self.entries.binary_search_by(|e| (e.at, e.event).cmp(&k)) {
            Ok(_) => {}
            Err(i) => self.entries.insert(i, entry),
        }
        self.cap();
    }

    /// Each of the entry's values replaces the same value's entry when
    /// newer (the same set whatever the order events came in or were
    /// merged).
    fn insert_latest(&mut self, entry: Entry) {
        let k = (entry.at, entry.event);
        for value in entry.values {
            if let Some(i) = self
                .entries
                .iter()
                .position(|e| e.values.first().is_some_and(|v| same_text(v, &value)))
            {
                if (self.entries[i].at, self.entries[i].event) >= k {
                    continue;
                }
                self.entries.remove(i);
            }
            let key = text(&value);
            let at = self.entries.partition_point(|e| {
                (e.at, e.event) < k
                    || ((e.at, e.event) == k && e.values.first().is_some_and(|v| text(v) < key))
            });
            self.entries.insert(
                at,
                Entry {
                    at: k.0,
                    event: k.1,
                    values: vec![value],
                },
            );
        }
        self.cap();
    }

    fn cap(&mut self) {
        if self.entries.len() > MAX_WINDOW_EVENTS {
            let extra = self.entries.len() - MAX_WINDOW_EVENTS;
            self.entries.drain(..extra);
        }
    }

    fn value(&self, def: &TraitDef, now: UnixMillis) -> Value {
        match def.window.millis() {
            None => self.totals.as_ref().map_or_else(
                || Totals::default().value(def.aggregate),
                |t| t.value(def.aggregate),
            ),
            Some(w) => {
                let mut totals = Totals::default();
                for e in self.entries.iter().filter(|e| e.at.saturating_add(w) > now) {
                    totals.add(def.aggregate, e.at, e.event, &e.values);
                }
                totals.value(def.aggregate)
            }
        }
    }
}

/// A customer's computed-trait states, by trait name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Computed {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub traits: BTreeMap<String, TraitState>,
}

impl Computed {
    pub fn is_empty(&self) -> bool {
        self.traits.is_empty()
    }

    /// The state of `def` at its version: a state folded under another
    /// version (or another definition of the name) starts over, since its
    /// events were counted by other rules (the stage refolds the customer's
    /// events after an update).
    fn state(&mut self, def: &TraitDef) -> &mut TraitState {
        let state = self.traits.entry(def.name.clone()).or_default();
        let latest = keeps_latest(def);
        if state.version != def.version || (state.totals.is_none() && state.entries.is_empty()) {
            *state = TraitState {
                version: def.version,
                totals: def.window.millis().is_none().then(Totals::default),
                entries: Vec::new(),
                latest,
            };
        } else if latest && !state.latest {
            // Kept whole by an earlier build: each value on its newest
            // event from now on.
            state.latest = true;
            for e in std::mem::take(&mut state.entries) {
                state.insert_latest(e);
            }
        }
        state
    }

    /// Folds `t` into every trait whose filter keeps it; returns their
    /// names. Call once per event (see the module's docs).
    pub fn fold(&mut self, defs: &[TraitDef], t: &Touchpoint) -> Vec<String> {
        let env = &t.envelope;
        let mut changed = Vec::new();
        // A state kept under a newer version (folded by a process further
        // ahead) is not started over by an older definition.
        let newer = |d: &TraitDef| {
            self.traits
                .get(&d.name)
                .is_some_and(|s| s.version > d.version)
        };
        let defs: Vec<&TraitDef> = defs.iter().filter(|d| !newer(d) && d.matches(t)).collect();
        for def in defs {
            let values = def
                .property
                .as_deref()
                .map(|p| values_of(t, p))
                .unwrap_or_default();
            let state = self.state(def);
            match def.window.millis() {
                None => state.totals.get_or_insert_with(Totals::default).add(
                    def.aggregate,
                    env.occurred_at,
                    env.event_id,
                    &values,
                ),
                Some(_) => state.insert(Entry {
                    at: env.occurred_at,
                    event: env.event_id,
                    values,
                }),
            }
            changed.push(def.name.clone());
        }
        changed
    }

    /// The traits of `defs` whose state is kept under a newer version than
    /// `defs` has (folded by a process further ahead).
    pub fn newer_than(&self, defs: &[TraitDef]) -> Vec<String> {
        defs.iter()
            .filter(|d| {
                self.traits
                    .get(&d.name)
                    .is_some_and(|s| s.version > d.version)
            })
            .map(|d| d.name.clone())
            .collect()
    }

    /// Folds `events` into `def`'s state from scratch (a backfill).
    pub fn refold(&mut self, def: &TraitDef, events: &[Touchpoint]) {
        self.traits.remove(&def.name);
        for t in events {
            self.fold(std::slice::from_ref(def), t);
        }
    }

    /// Takes in the states of a customer merged into this one.
    pub fn absorb(&mut self, other: Computed) {
        for (name, theirs) in other.traits {
            match self.traits.get_mut(&name) {
                None => {
                    self.traits.insert(name, theirs);
                }
                Some(ours) if ours.version != theirs.version => {
                    // Keep the newer definition's state.
                    if theirs.version > ours.version {
                        *ours = theirs;
                    }
                }
                Some(ours) => {
                    match (&mut ours.totals, theirs.totals) {
                        (Some(a), Some(b)) => a.absorb(b),
                        (a @ None, b) => *a = b,
                        (Some(_), None) => {}
                    }
                    if theirs.latest && !ours.latest {
                        // Theirs keeps each value once (one entry per
                        // value of an event): ours is made to as well.
                        ours.latest = true;
                        for e in std::mem::take(&mut ours.entries) {
                            ours.insert_latest(e);
                        }
                    }
                    for e in theirs.entries {
                        ours.insert(e);
                    }
                }
            }
        }
    }

    /// Drops the events windows no longer hold at `now`, and the states of
    /// traits no longer defined (except `held` ones: defined, but not
    /// usable now); returns the defined traits that let events go.
    pub fn expire(
        &mut self,
        defs: &[TraitDef],
        held: &std::collections::BTreeSet<String>,
        now: UnixMillis,
    ) -> Vec<String> {
        self.traits
            .retain(|name, _| held.contains(name) || defs.iter().any(|d| &d.name == name));
        let mut expired = Vec::new();
        for def in defs {
            if let (Some(w), Some(state)) = (def.window.millis(), self.traits.get_mut(&def.name)) {
                // Entries are kept oldest first: those gone are a prefix.
                let kept = state
                    .entries
                    .partition_point(|e| e.at.saturating_add(w) <= now);
                if kept > 0 {
                    state.entries.drain(..kept);
                    expired.push(def.name.clone());
                }
            }
        }
        expired
    }

    /// When a windowed value next changes without a new event: the first
    /// instant an event it holds leaves its window.
    pub fn next_expiry(&self, defs: &[TraitDef]) -> Option<UnixMillis> {
        defs.iter()
            .filter_map(|d| {
                let w = d.window.millis()?;
                let state = self.traits.get(&d.name)?;
                (state.version == d.version)
                    .then(|| state.entries.first())
                    .flatten()
                    .map(|e| e.at.saturating_add(w))
            })
            .min()
    }

    /// The value of `def` at `now` (its empty value when nothing was
    /// folded under its version: 0, an empty list or null).
    pub fn value(&self, def: &TraitDef, now: UnixMillis) -> Value {
        match self.traits.get(&def.name) {
            Some(s) if s.version == def.version => s.value(def, now),
            _ => TraitState::default().value(def, now),
        }
    }

    /// Every defined trait's value at `now`.
    pub fn values(&self, defs: &[TraitDef], now: UnixMillis) -> BTreeMap<String, Value> {
        defs.iter()
            .map(|d| (d.name.clone(), self.value(d, now)))
            .collect()
    }
}
