//! The common shapes of a condition evaluated without the CEL interpreter:
//! `&&`, `||` and `!` over comparisons (`==`, `!=`, `<`, `<=`, `>`, `>=`)
//! and `in` between `traits.<name>`, `profile.<field>` and literals (as in
//! `traits.orders_7d >= 1 && "store" in profile.channels`). A membership
//! is kept for every segment at every event, and most segments an analyst
//! writes have this shape, so the interpreter's context (every value read
//! converted and bound) is built only for the others.
//!
//! The result is the interpreter's, to the error: `&&` and `||` treat an
//! error as `cel` 0.15 does (`error && false` is false, `false && error`
//! too, `true && error` an error), comparisons between types that have no
//! ordering are errors. Where this evaluator is not sure to give the
//! interpreter's result (a NaN, a list compared with a list, a field the
//! profile has no value for) it says so and the interpreter decides. The
//! tests compare both over every pair of a grid of values and over random
//! conditions.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use cel::Value;
use cel::common::ast::{Expr, IdedExpr, LiteralValue, operators};

/// A condition in the shape this module evaluates.
#[derive(Debug, Clone)]
pub(crate) enum Native {
    And(Box<Native>, Box<Native>),
    Or(Box<Native>, Box<Native>),
    Not(Box<Native>),
    Compare(Op, Operand, Operand),
    /// `needle in haystack`.
    In(Operand, Operand),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone)]
pub(crate) enum Operand {
    /// A scalar literal.
    Literal(Value),
    /// A list literal of scalars.
    List(Vec<Value>),
    /// `traits.<name>`.
    Trait(String),
    /// `profile.<name>`.
    Field(String),
}

/// The values a condition reads, converted once for every segment.
#[derive(Debug, Default)]
pub(crate) struct Values {
    pub traits: BTreeMap<String, Value>,
    pub fields: BTreeMap<String, Value>,
}

/// What an evaluation gave: `Some` the interpreter's result (`Err`: it
/// would fail), `None` when only the interpreter can tell.
type Outcome = Option<Result<bool, ()>>;

impl Native {
    /// `e` in the shape this module evaluates, if it is.
    pub(crate) fn of(e: &IdedExpr) -> Option<Native> {
        let Expr::Call(call) = &e.expr else {
            return None;
        };
        if call.target.is_some() {
            return None;
        }
        match (call.func_name.as_str(), call.args.as_slice()) {
            (operators::LOGICAL_AND, [l, r]) => Some(Native::And(
                Box::new(Native::of(l)?),
                Box::new(Native::of(r)?),
            )),
            (operators::LOGICAL_OR, [l, r]) => Some(Native::Or(
                Box::new(Native::of(l)?),
                Box::new(Native::of(r)?),
            )),
            (operators::LOGICAL_NOT, [x]) => Some(Native::Not(Box::new(Native::of(x)?))),
            (operators::IN, [l, r]) => Some(Native::In(Operand::of(l)?, Operand::of(r)?)),
            (name, [l, r]) => {
                let op = match name {
                    operators::EQUALS => Op::Eq,
                    operators::NOT_EQUALS => Op::Ne,
                    operators::LESS => Op::Lt,
                    operators::LESS_EQUALS => Op::Le,
                    operators::GREATER => Op::Gt,
                    operators::GREATER_EQUALS => Op::Ge,
                    _ => return None,
                };
                Some(Native::Compare(op, Operand::of(l)?, Operand::of(r)?))
            }
            _ => None,
        }
    }

    /// Whether the condition holds for `values` (see [`Outcome`]).
    pub(crate) fn eval(&self, values: &Values) -> Outcome {
        match self {
            Native::And(l, r) => connective(false, l, r, values),
            Native::Or(l, r) => connective(true, l, r, values),
            Native::Not(x) => Some(x.eval(values)?.map(|b| !b)),
            Native::Compare(op, l, r) => compare(*op, l.scalar(values)?, r.scalar(values)?),
            Native::In(needle, haystack) => {
                let needle = needle.scalar(values)?;
                let found = |list: &[Value]| -> Outcome {
                    let mut found = false;
                    for v in list {
                        if !scalar(v) {
                            return None;
                        }
                        found |= needle == v;
                    }
                    Some(Ok(found))
                };
                match haystack {
                    Operand::List(list) => found(list),
                    other => match other.value(values)? {
                        Value::List(list) => found(list),
                        // A map's keys, a string...: the interpreter's.
                        _ => None,
                    },
                }
            }
        }
    }
}

/// `l && r` (`decides` false) or `l || r` (`decides` true), as the
/// interpreter evaluates them: the left first, which decides when it is
/// `decides`; then the right, whose error is the result; a left error is
/// forgiven only by a deciding right.
fn connective(decides: bool, l: &Native, r: &Native, values: &Values) -> Outcome {
    let left = l.eval(values)?;
    if left == Ok(decides) {
        return Some(Ok(decides));
    }
    Some(match (left, r.eval(values)?) {
        (Ok(_), right) => right,
        (Err(()), Ok(right)) if right == decides => Ok(decides),
        _ => Err(()),
    })
}

impl Operand {
    fn of(e: &IdedExpr) -> Option<Operand> {
        match &e.expr {
            Expr::Literal(l) => literal(l).map(Operand::Literal),
            Expr::List(list) if list.optional_indices.is_empty() => list
                .elements
                .iter()
                .map(|x| match &x.expr {
                    Expr::Literal(l) => literal(l),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .map(Operand::List),
            Expr::Select(s) if !s.test => match &s.operand.expr {
                Expr::Ident(root) if root == "traits" => Some(Operand::Trait(s.field.clone())),
                Expr::Ident(root) if root == "profile" => Some(Operand::Field(s.field.clone())),
                _ => None,
            },
            _ => None,
        }
    }

    /// The value read (`None`: none is, the interpreter tells why).
    fn value<'v>(&'v self, values: &'v Values) -> Option<&'v Value> {
        match self {
            Operand::Literal(v) => Some(v),
            Operand::List(_) => None,
            Operand::Trait(name) => values.traits.get(name),
            Operand::Field(name) => values.fields.get(name),
        }
    }

    /// The value read, when it is a scalar.
    fn scalar<'v>(&'v self, values: &'v Values) -> Option<&'v Value> {
        self.value(values).filter(|v| scalar(v))
    }
}

fn literal(l: &LiteralValue) -> Option<Value> {
    Some(match l {
        LiteralValue::Boolean(b) => Value::Bool(*b.inner()),
        LiteralValue::Double(d) => Value::Float(*d.inner()),
        LiteralValue::Int(i) => Value::Int(*i.inner()),
        LiteralValue::UInt(u) => Value::UInt(*u.inner()),
        LiteralValue::String(s) => Value::String(std::sync::Arc::new(s.inner().to_owned())),
        LiteralValue::Null => Value::Null,
        LiteralValue::Bytes(_) => return None,
    })
}

fn scalar(v: &Value) -> bool {
    match v {
        Value::Float(f) => !f.is_nan(),
        Value::Int(_) | Value::UInt(_) | Value::String(_) | Value::Bool(_) | Value::Null => true,
        _ => false,
    }
}

fn numeric(v: &Value) -> bool {
    matches!(v, Value::Int(_) | Value::UInt(_) | Value::Float(_))
}

fn compare(op: Op, l: &Value, r: &Value) -> Outcome {
    let comparable = (numeric(l) && numeric(r))
        || matches!(
            (l, r),
            (Value::String(_), Value::String(_)) | (Value::Bool(_), Value::Bool(_))
        );
    Some(Ok(match op {
        // Numbers equal across types, anything else only its own type.
        Op::Eq => l == r,
        Op::Ne => l != r,
        // No ordering between these types (null included).
        _ if !comparable => return Some(Err(())),
        Op::Lt => l.partial_cmp(r)? == Ordering::Less,
        Op::Le => l.partial_cmp(r)? != Ordering::Greater,
        Op::Gt => l.partial_cmp(r)? == Ordering::Greater,
        Op::Ge => l.partial_cmp(r)? != Ordering::Less,
    }))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::{Arc, LazyLock};

    use proptest::prelude::*;

    use super::*;

    static ENV: LazyLock<Arc<cel::Env>> = LazyLock::new(|| Arc::new(cel::Env::stdlib()));

    /// Values of every type a trait or a profile field can hold, and the
    /// edges of each.
    fn grid() -> Vec<Value> {
        let s = |x: &str| Value::String(Arc::new(x.to_owned()));
        vec![
            Value::Int(0),
            Value::Int(1),
            Value::Int(-1),
            Value::Int(i64::MAX),
            Value::UInt(0),
            Value::UInt(1),
            Value::UInt(u64::MAX),
            Value::Float(0.0),
            Value::Float(-0.0),
            Value::Float(1.0),
            Value::Float(0.5),
            Value::Float(f64::NAN),
            Value::Float(f64::INFINITY),
            s(""),
            s("store"),
            s("web"),
            Value::Bool(true),
            Value::Bool(false),
            Value::Null,
            Value::List(Arc::new(vec![])),
            Value::List(Arc::new(vec![s("store"), s("app")])),
            Value::List(Arc::new(vec![Value::Int(1), Value::Float(2.0)])),
            Value::List(Arc::new(vec![Value::Null])),
        ]
    }

    /// What the interpreter gives for `source` over `traits` (an error
    /// or a value that is not a boolean: `Err`).
    fn interpreted(source: &str, traits: &[(&str, &Value)]) -> Result<bool, ()> {
        let program = ENV.compile(source).expect("compiles");
        let mut context = cel::Context::with_env(ENV.clone());
        let map: HashMap<String, Value> = traits
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).clone()))
            .collect();
        context.add_variable_from_value("traits", Value::from(map));
        match program.execute(&context) {
            Ok(Value::Bool(b)) => Ok(b),
            _ => Err(()),
        }
    }

    fn native(source: &str, traits: &[(&str, &Value)]) -> Outcome {
        let program = ENV.compile(source).expect("compiles");
        let native = Native::of(program.expression()).expect("a native shape");
        let values = Values {
            traits: traits
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).clone()))
                .collect(),
            fields: BTreeMap::new(),
        };
        native.eval(&values)
    }

    const OPS: [&str; 7] = ["==", "!=", "<", "<=", ">", ">=", "in"];

    #[test]
    fn every_operator_over_every_pair_of_values_gives_the_interpreters_result() {
        let mut decided = 0;
        for op in OPS {
            let source = format!("traits.a {op} traits.b");
            for a in grid() {
                for b in grid() {
                    let traits = [("a", &a), ("b", &b)];
                    if let Some(n) = native(&source, &traits) {
                        decided += 1;
                        assert_eq!(n, interpreted(&source, &traits), "{a:?} {op} {b:?}");
                    }
                }
            }
        }
        // Most pairs are decided without the interpreter.
        assert!(decided > 7 * 23 * 23 / 2, "{decided}");
    }

    #[test]
    fn literals_and_lists_of_literals_read_as_the_interpreter_reads_them() {
        let literals = [
            "0",
            "1",
            "-1",
            "1u",
            "0.5",
            "-2.5",
            "1e3",
            "\"store\"",
            "''",
            "true",
            "false",
            "null",
            "[\"store\", \"web\"]",
            "[1, 2.0, 3u]",
            "[]",
        ];
        for op in OPS {
            for literal in literals {
                for a in grid() {
                    let traits = [("a", &a)];
                    for source in [
                        format!("traits.a {op} {literal}"),
                        format!("{literal} {op} traits.a"),
                    ] {
                        let Ok(program) = ENV.compile(&source) else {
                            continue;
                        };
                        // A negative number is a call in CEL's grammar
                        // when it is not folded: the interpreter's.
                        let Some(n) = Native::of(program.expression()) else {
                            continue;
                        };
                        let values = Values {
                            traits: BTreeMap::from([("a".to_owned(), a.clone())]),
                            fields: BTreeMap::new(),
                        };
                        if let Some(n) = n.eval(&values) {
                            assert_eq!(n, interpreted(&source, &traits), "{source} with {a:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_shapes_analysts_write_are_native() {
        for source in [
            "traits.orders_7d >= 1",
            "traits.avg != null && traits.avg >= 1500000",
            r#"traits.top == "SKU" || traits.other == "SKU""#,
            r#""store" in profile.channels && !(profile.journey_stage in ["appeal", "ask"])"#,
            "profile.cart_items > 0 && traits.orders_7d == 0",
        ] {
            let program = ENV.compile(source).expect("compiles");
            assert!(Native::of(program.expression()).is_some(), "{source}");
        }
        for source in [
            "size(profile.channels) > 1",
            "has(traits.a)",
            "traits.a + 1 > 2",
            "profile.channels.exists(c, c == 'web')",
            "traits.a > 1 ? true : false",
        ] {
            let program = ENV.compile(source).expect("compiles");
            assert!(Native::of(program.expression()).is_none(), "{source}");
        }
    }

    /// A random condition over traits `a`, `b` and `c`.
    fn condition() -> impl Strategy<Value = String> {
        let leaf = (
            prop::sample::select(vec!["a", "b", "c"]),
            prop::sample::select(OPS.to_vec()),
            prop_oneof![
                prop::sample::select(vec!["a", "b", "c"]).prop_map(|t| format!("traits.{t}")),
                prop::sample::select(vec![
                    "0",
                    "1",
                    "2.5",
                    "1u",
                    "\"web\"",
                    "true",
                    "null",
                    "[\"web\", 1]",
                ])
                .prop_map(str::to_owned),
            ],
        )
            .prop_map(|(t, op, rhs)| format!("traits.{t} {op} {rhs}"));
        leaf.prop_recursive(4, 16, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone()).prop_map(|(l, r)| format!("({l}) && ({r})")),
                (inner.clone(), inner.clone()).prop_map(|(l, r)| format!("({l}) || ({r})")),
                inner.prop_map(|x| format!("!({x})")),
            ]
        })
    }

    proptest! {
        #[test]
        fn random_conditions_give_the_interpreters_result(
            source in condition(),
            values in prop::collection::vec(prop::sample::select(grid()), 3),
        ) {
            let traits = [("a", &values[0]), ("b", &values[1]), ("c", &values[2])];
            if let Some(n) = native(&source, &traits) {
                prop_assert_eq!(n, interpreted(&source, &traits), "{} with {:?}", source, values);
            }
        }
    }
}
