//! Segments: a condition in the Common Expression Language (CEL, the
//! language of Kubernetes validation rules and Envoy's RBAC) over two
//! variables:
//!
//! - `profile`: the customer's view ([`segment_profile`]): `events_count`,
//!   `first_seen`, `last_seen` (Unix milliseconds), `channels` (the
//!   channels seen, a list), `last_seen_by_channel`, `preferred_channel`,
//!   `journey_stage`, `orders_count`, `spend` (total per currency),
//!   `refunds`, `first_order_at`, `last_order_at`, `cart_items`,
//!   `open_tickets`, `loyalty_points`, `last_feedback_rating`, `consent`
//!   (purpose to bool) and `traits` (the customer's own traits, without
//!   the personal ones: no email, phone, address, birthday or name);
//! - `traits`: the computed traits by name.
//!
//! For example `traits.orders_7d >= 1 && profile.journey_stage == "act" &&
//! "store" in profile.channels`.
//!
//! A condition reads nothing else, so it changes only when the profile,
//! a computed trait or a window's expiry changes, and it is evaluated at
//! each of those (no condition is left to a batch). Time goes into
//! computed traits' windows; a condition naming anything but these two
//! variables, or a computed trait that is not defined, is refused when it
//! is created, with the line and column.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, LazyLock};

use cel::common::ast::{EntryExpr, Expr, IdedExpr};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::DefinitionError;
use super::computed::{TraitDef, check_name};
use super::native::{Native, Values};
use crate::ProfileView;

/// The longest condition, in bytes.
pub const MAX_CONDITION_LEN: usize = 4_096;

/// The variables a condition may read.
pub const VARIABLES: [&str; 2] = ["profile", "traits"];

static ENV: LazyLock<Arc<cel::Env>> = LazyLock::new(|| Arc::new(cel::Env::stdlib()));

/// A segment's definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentDef {
    /// `[a-z][a-z0-9_]*`, at most 64 characters.
    pub name: String,
    /// Set by the registry: each update gives a new version.
    #[serde(default)]
    pub version: u64,
    /// A CEL expression that is true for members.
    pub condition: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// A checked, compiled segment.
#[derive(Clone)]
pub struct Segment {
    pub def: SegmentDef,
    program: Arc<cel::Program>,
    /// The computed traits the condition reads (`None`: it reads `traits`
    /// as a whole, so any of them).
    reads: Option<BTreeSet<String>>,
    /// The fields of `profile` it reads (`None`: it reads `profile` as a
    /// whole).
    reads_profile: Option<BTreeSet<String>>,
    /// The condition, when its shape is evaluated without the interpreter.
    native: Option<Arc<Native>>,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment").field("def", &self.def).finish()
    }
}

fn err(reason: String) -> DefinitionError {
    DefinitionError {
        field: "condition".into(),
        reason,
    }
}

/// Line and column (from 1) of byte `offset` in `source`.
fn position(source: &str, offset: u32) -> (usize, usize) {
    let offset = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(source.len());
    let before = source.get(..offset).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Every node of `e`, depth first, with the variables comprehensions bind
/// over it.
fn walk<'a>(
    e: &'a IdedExpr,
    bound: &mut Vec<&'a str>,
    visit: &mut dyn FnMut(&'a IdedExpr, &[&'a str]),
) {
    visit(e, bound);
    match &e.expr {
        Expr::Call(c) => {
            if let Some(t) = &c.target {
                walk(t, bound, visit);
            }
            for a in &c.args {
                walk(a, bound, visit);
            }
        }
        Expr::Comprehension(c) => {
            walk(&c.iter_range, bound, visit);
            walk(&c.accu_init, bound, visit);
            let depth = bound.len();
            bound.push(&c.iter_var);
            if let Some(v) = &c.iter_var2 {
                bound.push(v);
            }
            bound.push(&c.accu_var);
            walk(&c.loop_cond, bound, visit);
            walk(&c.loop_step, bound, visit);
            walk(&c.result, bound, visit);
            bound.truncate(depth);
        }
        Expr::List(l) => {
            for x in &l.elements {
                walk(x, bound, visit);
            }
        }
        Expr::Map(m) => {
            for entry in &m.entries {
                if let EntryExpr::MapEntry(me) = &entry.expr {
                    walk(&me.key, bound, visit);
                    walk(&me.value, bound, visit);
                }
            }
        }
        Expr::Struct(s) => {
            for entry in &s.entries {
                if let EntryExpr::StructField(f) = &entry.expr {
                    walk(&f.value, bound, visit);
                }
            }
        }
        Expr::Select(s) => walk(&s.operand, bound, visit),
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
}

impl Segment {
    /// Checks and compiles a definition against the computed traits
    /// defined; the error gives the line and column of what is wrong.
    pub fn compile(def: SegmentDef, traits: &[TraitDef]) -> Result<Segment, DefinitionError> {
        check_name("name", &def.name)?;
        let source = def.condition.as_str();
        if source.trim().is_empty() {
            return Err(err("a condition is empty".into()));
        }
        if source.len() > MAX_CONDITION_LEN {
            return Err(err(format!(
                "a condition is at most {MAX_CONDITION_LEN} bytes, found {}",
                source.len()
            )));
        }
        let program = ENV.compile(source).map_err(|errors| {
            let first = errors.errors.first();
            err(first.map_or_else(
                || "does not parse".to_owned(),
                // cel's positions count from 1 already.
                |e| format!("line {}, column {}: {}", e.pos.0, e.pos.1, e.msg),
            ))
        })?;
        let mut problem: Option<(u64, String)> = None;
        // Per variable, `<variable>.<name>` selections and every reading of
        // the variable: when each reading is a selection, the condition
        // reads those names only.
        let mut reads = [Reads::default(), Reads::default()];
        walk(program.expression(), &mut Vec::new(), &mut |e, bound| {
            for (variable, reads) in VARIABLES.iter().zip(reads.iter_mut()) {
                if bound.contains(variable) {
                    continue;
                }
                match &e.expr {
                    Expr::Ident(name) if name == variable => reads.readings += 1,
                    Expr::Select(s) if matches!(&s.operand.expr, Expr::Ident(root) if root == variable) =>
                    {
                        reads.selections += 1;
                        reads.selected.insert(s.field.clone());
                    }
                    _ => {}
                }
            }
            if problem.is_some() {
                return;
            }
            match &e.expr {
                Expr::Ident(name)
                    if !bound.contains(&name.as_str()) && !VARIABLES.contains(&name.as_str()) =>
                {
                    let hint = if matches!(name.as_str(), "now" | "today" | "time") {
                        "; time goes into a computed trait's window (\"window\": \"7d\")"
                    } else {
                        ""
                    };
                    problem = Some((
                        e.id,
                        format!(
                            "unknown variable `{name}`: a condition reads `profile` and `traits`{hint}"
                        ),
                    ));
                }
                Expr::Select(s) => {
                    if let Expr::Ident(root) = &s.operand.expr
                        && root == "traits"
                        && !bound.contains(&"traits")
                        && !traits.iter().any(|t| t.name == s.field)
                    {
                        let defined: Vec<&str> = traits.iter().map(|t| t.name.as_str()).collect();
                        // Pointed at `traits`, where the selection starts.
                        problem = Some((
                            s.operand.id,
                            format!(
                                "no computed trait is named `{}` (defined: {})",
                                s.field,
                                if defined.is_empty() {
                                    "none".to_owned()
                                } else {
                                    defined.join(", ")
                                }
                            ),
                        ));
                    }
                }
                _ => {}
            }
        });
        if let Some((id, reason)) = problem {
            let (line, column) = program
                .source_info()
                .offset_for(id)
                .map_or((1, 1), |(start, _)| position(source, start));
            return Err(err(format!("line {line}, column {column}: {reason}")));
        }
        let [profile, traits] = reads;
        let native = Native::of(program.expression()).map(Arc::new);
        Ok(Segment {
            def,
            native,
            program: Arc::new(program),
            reads: traits.names(),
            reads_profile: profile.names(),
        })
    }

    /// Whether the condition reads the computed trait `name`.
    pub fn reads(&self, name: &str) -> bool {
        self.reads.as_ref().is_none_or(|r| r.contains(name))
    }

    /// The computed traits the condition reads (`None`: any of them).
    pub fn traits_read(&self) -> Option<&BTreeSet<String>> {
        self.reads.as_ref()
    }

    /// The fields of `profile` the condition reads (`None`: all of them).
    pub fn profile_read(&self) -> Option<&BTreeSet<String>> {
        self.reads_profile.as_ref()
    }

    /// Whether the condition reads `profile` at all.
    pub fn reads_profile(&self) -> bool {
        self.reads_profile.as_ref().is_none_or(|r| !r.is_empty())
    }

    /// Whether the customer described by `input` is a member; an error
    /// (a type mismatch, a missing key) is the reason it cannot tell, and
    /// counts as not a member.
    pub fn matches(&self, input: &Input) -> Result<bool, String> {
        match self.program.execute(&input.context) {
            Ok(cel::Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("the condition gave {other:?}, not true or false")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Whether the customer whose values the condition reads are `values`
    /// is a member (an error counting as not), when the condition's shape
    /// is evaluated without the interpreter and this evaluation is sure
    /// to give its result; `None`: ask [`matches`](Self::matches).
    pub(crate) fn decide(&self, values: &Values) -> Option<bool> {
        let outcome = self.native.as_ref()?.eval(values)?;
        Some(outcome == Ok(true))
    }
}

/// How a condition reads one variable.
#[derive(Default)]
struct Reads {
    /// Readings of the variable, as a whole or selected from.
    readings: usize,
    /// Readings of `<variable>.<name>`, and the names.
    selections: usize,
    selected: BTreeSet<String>,
}

impl Reads {
    /// The names read, when every reading selects one (`None`: the
    /// variable is read as a whole).
    fn names(self) -> Option<BTreeSet<String>> {
        (self.selections == self.readings).then_some(self.selected)
    }
}

/// What a condition reads about one customer, converted (and bound to the
/// condition's variables) once for every segment.
pub struct Input {
    context: cel::Context<'static, 'static>,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Input").finish_non_exhaustive()
    }
}

impl Input {
    pub fn new(profile: &ProfileView, traits: &BTreeMap<String, Value>) -> Input {
        Input::of(segment_profile(profile), traits)
    }

    /// With the `profile` fields in `fields` only (`None`: all of them):
    /// what the conditions evaluated read.
    pub fn with_fields(
        profile: &ProfileView,
        fields: Option<&BTreeSet<String>>,
        traits: &BTreeMap<String, Value>,
    ) -> Input {
        match fields {
            None => Input::new(profile, traits),
            Some(fields) => Input::of(profile_fields(profile, fields), traits),
        }
    }

    fn of(profile: Value, traits: &BTreeMap<String, Value>) -> Input {
        let convert = |v: &Value| cel::to_value(v).unwrap_or(cel::Value::Null);
        let mut context = cel::Context::with_env(ENV.clone());
        context.add_variable_from_value("profile", convert(&profile));
        let traits: serde_json::Map<String, Value> =
            traits.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        context.add_variable_from_value("traits", convert(&Value::Object(traits)));
        Input { context }
    }
}

/// The fields of the `profile` a condition reads named in `fields` (a
/// name that is no field is left out, as [`segment_profile`] has no such
/// key).
pub fn profile_fields(v: &ProfileView, fields: &BTreeSet<String>) -> Value {
    Value::Object(
        fields
            .iter()
            .filter_map(|name| Some((name.clone(), profile_field(v, name)?)))
            .collect(),
    )
}

/// The fields of the `profile` a condition reads.
pub const PROFILE_FIELDS: [&str; 18] = [
    "events_count",
    "first_seen",
    "last_seen",
    "channels",
    "last_seen_by_channel",
    "preferred_channel",
    "journey_stage",
    "orders_count",
    "spend",
    "refunds",
    "first_order_at",
    "last_order_at",
    "cart_items",
    "open_tickets",
    "loyalty_points",
    "last_feedback_rating",
    "consent",
    "traits",
];

/// The `profile` a condition reads (see the module's docs).
pub fn segment_profile(v: &ProfileView) -> Value {
    Value::Object(
        PROFILE_FIELDS
            .iter()
            .filter_map(|name| Some(((*name).to_owned(), profile_field(v, name)?)))
            .collect(),
    )
}

/// One field of the `profile` a condition reads (`None`: no such field).
pub fn profile_field(v: &ProfileView, name: &str) -> Option<Value> {
    let amounts = |spend: &[crate::profile::SpendView]| -> Value {
        Value::Object(
            spend
                .iter()
                .map(|s| (s.currency.clone(), super::computed::number(s.total)))
                .collect(),
        )
    };
    Some(match name {
        "events_count" => json!(v.events_count),
        "first_seen" => json!(v.first_seen),
        "last_seen" => json!(v.last_seen),
        "channels" => json!(
            v.last_seen_by_channel
                .keys()
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
        ),
        "last_seen_by_channel" => Value::Object(
            v.last_seen_by_channel
                .iter()
                .map(|(c, t)| (c.as_str().to_owned(), json!(t)))
                .collect(),
        ),
        "preferred_channel" => json!(v.preferred_channel.map(|c| c.as_str())),
        "journey_stage" => json!(v.stage.as_str()),
        "orders_count" => json!(v.orders_count),
        "spend" => amounts(&v.spend),
        "refunds" => amounts(&v.refunds),
        "first_order_at" => json!(v.first_order_at),
        "last_order_at" => json!(v.last_order_at),
        "cart_items" => json!(v.cart.iter().map(|c| c.quantity).sum::<i64>()),
        "open_tickets" => json!(v.open_tickets),
        "loyalty_points" => json!(v.loyalty_points),
        "last_feedback_rating" => json!(v.last_feedback_rating),
        "consent" => json!(v.consent),
        // The customer's own traits without the personal ones (email,
        // phone, address, birthday, names...): a condition classifies
        // people, it does not look them up.
        "traits" => {
            let personal = crate::access::PersonalKeys::default();
            Value::Object(
                v.traits
                    .iter()
                    .filter(|(k, _)| !personal.is_personal(k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            )
        }
        _ => return None,
    })
}
