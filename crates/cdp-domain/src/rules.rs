//! Identity rules and validation limits, read from configuration.

use std::collections::{BTreeMap, BTreeSet};

use globset::{Glob, GlobMatcher};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::event::UnixMillis;
use crate::event::{IdKind, Identifier};
use crate::normalize::{EmailPolicy, PhonePolicy, normalize};

#[derive(Debug, Error)]
pub enum RulesError {
    #[error("identity rule for kind {kind:?}: invalid blocked pattern {pattern:?}: {reason}")]
    BadPattern {
        kind: String,
        pattern: String,
        reason: String,
    },
    #[error("identity rule for kind {kind:?}: {reason}")]
    BadKind { kind: String, reason: String },
    #[error("identity rule for kind {kind:?}: {field} value {value:?} {reason}")]
    BadValue {
        kind: String,
        field: &'static str,
        value: String,
        reason: String,
    },
}

/// How one identifier kind takes part in identity resolution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KindRule {
    /// Lower is stronger. The strongest identifier of an event decides which
    /// profile it lands on when identifiers disagree.
    pub priority: u32,
    /// At most this many identifiers of the kind on one profile. An identifier
    /// beyond the limit stays on the event but is not linked.
    pub limit: u32,
    /// Whether this kind may merge two existing profiles. Kinds that may not
    /// merge only attach to one profile (they can still fold an anonymous
    /// profile, one holding only such weak kinds, into an identified one).
    pub merge: bool,
    /// Values that never link (a placeholder phone, a test email), in any
    /// form an event may carry them: they are normalised like events when the
    /// rules load, and a value that is not a valid identifier of the kind is a
    /// configuration error.
    pub blocked: Vec<String>,
    /// Glob patterns over normalised values that never link (`pos-*` for
    /// a store's shared POS devices, `*@test.invalid`). Matched without
    /// regard to case for kinds whose values are case-folded (email, device
    /// and anonymous ids, loyalty cards).
    pub blocked_patterns: Vec<String>,
    /// How many different people (customers with identifiers of their own)
    /// one value of this kind may be seen with, within
    /// `shared_window_days`, before it is quarantined as shared: it then
    /// stops linking and attributing until an operator blocks or releases
    /// it. 0 turns detection off for the kind.
    pub shared_by_at_most: u32,
    /// Values the operator released from quarantine (normalised like
    /// `blocked`): they are never quarantined again.
    pub released: Vec<String>,
    /// For reassignable kinds (phone numbers, recycled by carriers): after
    /// this many days without being seen, a value that comes back with
    /// another person's identifiers starts a new claim instead of joining
    /// its old owner. Unset: never reassigned.
    pub recycle_after_days: Option<u32>,
}

impl Default for KindRule {
    fn default() -> Self {
        KindRule {
            priority: 50,
            limit: 5,
            merge: false,
            blocked: Vec::new(),
            blocked_patterns: Vec::new(),
            shared_by_at_most: 3,
            released: Vec::new(),
            recycle_after_days: None,
        }
    }
}

/// Identity resolution rules, as configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityRulesConfig {
    pub kinds: BTreeMap<String, KindRule>,
    pub email: EmailPolicy,
    pub phone: PhonePolicy,
    /// The window in which different people seen with one value count
    /// towards its kind's `shared_by_at_most`.
    pub shared_window_days: u32,
    /// Sources whose credentials are public by nature (a website's or an
    /// app's write key): their events may add identifiers to the customer
    /// they are already on (through an identifier such as an anonymous or
    /// device id), but may not attach anything to a customer found only
    /// through a contact identifier they carry (anyone can type someone
    /// else's email into a form). The platform adds the Segment sources
    /// that are not marked trusted.
    pub untrusted_sources: Vec<String>,
    /// The kinds anyone can type for someone else: what an untrusted source
    /// may not link through.
    pub contact_kinds: Vec<String>,
}

impl Default for IdentityRulesConfig {
    fn default() -> Self {
        let rule = |priority, limit, merge| KindRule {
            priority,
            limit,
            merge,
            ..KindRule::default()
        };
        let mut kinds = BTreeMap::new();
        kinds.insert("user_id".into(), rule(1, 1, true));
        kinds.insert(
            "email".into(),
            KindRule {
                blocked_patterns: vec!["*@test.invalid".into(), "noreply@*".into()],
                ..rule(2, 3, true)
            },
        );
        kinds.insert("loyalty_id".into(), rule(3, 2, true));
        kinds.insert(
            "phone".into(),
            KindRule {
                // A family's home phone is given by up to four people.
                shared_by_at_most: 4,
                recycle_after_days: Some(180),
                ..rule(4, 2, true)
            },
        );
        kinds.insert("zalo_id".into(), rule(5, 2, true));
        kinds.insert("facebook_psid".into(), rule(5, 5, true));
        kinds.insert("shopee_buyer_id".into(), rule(6, 2, true));
        kinds.insert("lazada_buyer_id".into(), rule(6, 2, true));
        kinds.insert("tiki_buyer_id".into(), rule(6, 2, true));
        kinds.insert(
            "device_id".into(),
            KindRule {
                blocked_patterns: vec!["pos-*".into()],
                ..rule(8, 10, false)
            },
        );
        kinds.insert("anonymous_id".into(), rule(9, 50, false));
        IdentityRulesConfig {
            kinds,
            email: EmailPolicy::default(),
            phone: PhonePolicy::default(),
            shared_window_days: 90,
            untrusted_sources: Vec::new(),
            contact_kinds: vec!["email".into(), "phone".into()],
        }
    }
}

#[derive(Debug, Clone)]
struct CompiledRule {
    rule: KindRule,
    blocked: BTreeSet<String>,
    released: BTreeSet<String>,
    patterns: Vec<(String, GlobMatcher)>,
}

/// Compiled identity rules. Built once from [`IdentityRulesConfig`].
#[derive(Debug, Clone)]
pub struct IdentityRules {
    config: IdentityRulesConfig,
    kinds: BTreeMap<IdKind, CompiledRule>,
    untrusted_sources: BTreeSet<String>,
    contact_kinds: BTreeSet<IdKind>,
}

const DAY_MS: i64 = 86_400_000;

/// Normalises configured values of `kind` like event values.
fn normalise_values(
    kind: &IdKind,
    field: &'static str,
    values: &[String],
    email: &EmailPolicy,
    phone: &PhonePolicy,
) -> Result<BTreeSet<String>, RulesError> {
    values
        .iter()
        .map(|v| {
            normalize(kind, v, email, phone)
                .map(|id| id.value)
                .map_err(|e| RulesError::BadValue {
                    kind: kind.as_str().to_owned(),
                    field,
                    value: v.clone(),
                    reason: e.to_string(),
                })
        })
        .collect()
}

/// Case-folds a blocked pattern the way the kind's values are folded.
fn fold_pattern(kind: &IdKind, pattern: &str) -> String {
    let pattern = pattern.trim();
    match kind {
        IdKind::Email | IdKind::AnonymousId | IdKind::DeviceId => pattern.to_lowercase(),
        IdKind::LoyaltyId => pattern.to_uppercase(),
        _ => pattern.to_owned(),
    }
}

/// Why an identifier of an event was not linked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockReason {
    Value(String),
    Pattern(String),
}

impl IdentityRules {
    pub fn new(config: IdentityRulesConfig) -> Result<Self, RulesError> {
        let mut kinds = BTreeMap::new();
        for (name, rule) in &config.kinds {
            let kind = IdKind::parse(name).map_err(|reason| RulesError::BadKind {
                kind: name.clone(),
                reason,
            })?;
            if rule.limit == 0 {
                return Err(RulesError::BadKind {
                    kind: name.clone(),
                    reason: "limit must be at least 1".into(),
                });
            }
            if rule.shared_by_at_most as usize > crate::identity::MAX_SIGHTINGS {
                return Err(RulesError::BadKind {
                    kind: name.clone(),
                    reason: format!(
                        "shared_by_at_most must be at most {}",
                        crate::identity::MAX_SIGHTINGS
                    ),
                });
            }
            let blocked = normalise_values(
                &kind,
                "blocked",
                &rule.blocked,
                &config.email,
                &config.phone,
            )?;
            let released = normalise_values(
                &kind,
                "released",
                &rule.released,
                &config.email,
                &config.phone,
            )?;
            let patterns = rule
                .blocked_patterns
                .iter()
                .map(|p| {
                    Glob::new(&fold_pattern(&kind, p))
                        .map(|g| (p.clone(), g.compile_matcher()))
                        .map_err(|e| RulesError::BadPattern {
                            kind: name.clone(),
                            pattern: p.clone(),
                            reason: e.to_string(),
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            kinds.insert(
                kind,
                CompiledRule {
                    rule: rule.clone(),
                    blocked,
                    released,
                    patterns,
                },
            );
        }
        let contact_kinds = config
            .contact_kinds
            .iter()
            .map(|name| {
                IdKind::parse(name).map_err(|reason| RulesError::BadKind {
                    kind: name.clone(),
                    reason,
                })
            })
            .collect::<Result<_, _>>()?;
        let untrusted_sources = config.untrusted_sources.iter().cloned().collect();
        Ok(IdentityRules {
            config,
            kinds,
            untrusted_sources,
            contact_kinds,
        })
    }

    /// These rules, with `sources` added to the untrusted ones.
    pub fn with_untrusted_sources(
        mut self,
        sources: impl IntoIterator<Item = String>,
    ) -> IdentityRules {
        for s in sources {
            if self.untrusted_sources.insert(s.clone()) {
                self.config.untrusted_sources.push(s);
            }
        }
        self
    }

    /// Whether events of `source_id` may link only to the customer they are on.
    pub fn is_untrusted(&self, source_id: &str) -> bool {
        self.untrusted_sources.contains(source_id)
    }

    /// Whether anyone can type a value of `kind` for someone else.
    pub fn is_contact(&self, kind: &IdKind) -> bool {
        self.contact_kinds.contains(kind)
    }

    /// How many different people one value of `kind` may be seen with
    /// before it is quarantined (0: never), unless the value was released.
    pub fn shared_by_at_most(&self, id: &Identifier) -> u32 {
        match self.kinds.get(&id.kind) {
            Some(c) if c.released.contains(&id.value) => 0,
            Some(c) => c.rule.shared_by_at_most,
            None => KindRule::default().shared_by_at_most,
        }
    }

    /// Whether the operator released `id` from quarantine.
    pub fn released(&self, id: &Identifier) -> bool {
        self.kinds
            .get(&id.kind)
            .is_some_and(|c| c.released.contains(&id.value))
    }

    /// The window in which sightings count towards `shared_by_at_most`.
    pub fn shared_window_ms(&self) -> i64 {
        i64::from(self.config.shared_window_days).saturating_mul(DAY_MS)
    }

    /// After how long without being seen a value of `kind` may pass to
    /// another person.
    pub fn recycle_after_ms(&self, kind: &IdKind) -> Option<UnixMillis> {
        self.rule(kind)
            .and_then(|r| r.recycle_after_days)
            .map(|d| i64::from(d).saturating_mul(DAY_MS))
    }

    pub fn config(&self) -> &IdentityRulesConfig {
        &self.config
    }

    /// Whether `kind` may appear on events: every built-in kind, plus custom
    /// kinds declared in the rules.
    pub fn is_known(&self, kind: &IdKind) -> bool {
        !matches!(kind, IdKind::Custom(_)) || self.kinds.contains_key(kind)
    }

    fn rule(&self, kind: &IdKind) -> Option<&KindRule> {
        self.kinds.get(kind).map(|c| &c.rule)
    }

    pub fn priority(&self, kind: &IdKind) -> u32 {
        self.rule(kind)
            .map_or(KindRule::default().priority, |r| r.priority)
    }

    /// Identifiers strongest first: by priority, then kind and value, so
    /// equals always come in one order. The strongest identifier of an
    /// event routes and anchors it; the strongest of a customer's finds the
    /// customer again.
    pub fn strongest_first<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a Identifier>,
    ) -> Vec<&'a Identifier> {
        let mut ids: Vec<&Identifier> = ids.into_iter().collect();
        ids.sort_by(|a, b| {
            (self.priority(&a.kind), &a.kind, &a.value).cmp(&(
                self.priority(&b.kind),
                &b.kind,
                &b.value,
            ))
        });
        ids
    }

    pub fn limit(&self, kind: &IdKind) -> u32 {
        self.rule(kind)
            .map_or(KindRule::default().limit, |r| r.limit)
    }

    pub fn may_merge(&self, kind: &IdKind) -> bool {
        self.rule(kind).is_some_and(|r| r.merge)
    }

    /// Whether a normalised identifier is blocked from linking, and by which rule.
    pub fn blocked(&self, id: &Identifier) -> Option<BlockReason> {
        let compiled = self.kinds.get(&id.kind)?;
        if compiled.blocked.contains(&id.value) {
            return Some(BlockReason::Value(id.value.clone()));
        }
        compiled
            .patterns
            .iter()
            .find(|(_, m)| m.is_match(&id.value))
            .map(|(p, _)| BlockReason::Pattern(p.clone()))
    }

    pub fn email_policy(&self) -> &EmailPolicy {
        &self.config.email
    }

    pub fn phone_policy(&self) -> &PhonePolicy {
        &self.config.phone
    }
}

impl Default for IdentityRules {
    fn default() -> Self {
        // The default configuration is known to compile.
        match IdentityRules::new(IdentityRulesConfig::default()) {
            Ok(r) => r,
            Err(e) => panic!("default identity rules are invalid: {e}"),
        }
    }
}

/// Limits applied to incoming touchpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationLimits {
    /// Largest accepted event, encoded as JSON, in bytes (Segment: 32 KB).
    pub max_event_bytes: usize,
    /// How far in the future `occurred_at` may be (clock skew), in seconds.
    pub max_future_skew_secs: i64,
    /// How far in the past `occurred_at` may be, in days.
    pub max_age_days: i64,
    /// At most this many identifiers on one event.
    pub max_identifiers: usize,
    /// Currency assumed when an order has none.
    pub default_currency: String,
}

impl Default for ValidationLimits {
    fn default() -> Self {
        ValidationLimits {
            max_event_bytes: 32 * 1024,
            max_future_skew_secs: 300,
            max_age_days: 365 * 30,
            max_identifiers: 32,
            default_currency: "VND".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rules_block_shared_pos_devices_and_test_emails() {
        let rules = IdentityRules::default();
        assert_eq!(
            rules.blocked(&Identifier::new(IdKind::DeviceId, "pos-q1-01")),
            Some(BlockReason::Pattern("pos-*".into()))
        );
        assert_eq!(
            rules.blocked(&Identifier::new(IdKind::Email, "qa@test.invalid")),
            Some(BlockReason::Pattern("*@test.invalid".into()))
        );
        assert_eq!(
            rules.blocked(&Identifier::new(IdKind::DeviceId, "iphone-1")),
            None
        );
    }

    #[test]
    fn custom_kinds_must_be_declared() {
        let mut config = IdentityRulesConfig::default();
        let rules = IdentityRules::new(config.clone()).unwrap();
        assert!(!rules.is_known(&IdKind::Custom("crm_id".into())));
        config.kinds.insert(
            "crm_id".into(),
            KindRule {
                merge: true,
                ..KindRule::default()
            },
        );
        let rules = IdentityRules::new(config).unwrap();
        assert!(rules.is_known(&IdKind::Custom("crm_id".into())));
        assert!(rules.may_merge(&IdKind::Custom("crm_id".into())));
    }

    #[test]
    fn bad_patterns_and_zero_limits_are_config_errors() {
        let mut config = IdentityRulesConfig::default();
        config.kinds.insert(
            "phone".into(),
            KindRule {
                blocked_patterns: vec!["[".into()],
                ..KindRule::default()
            },
        );
        assert!(matches!(
            IdentityRules::new(config),
            Err(RulesError::BadPattern { .. })
        ));
        let mut config = IdentityRulesConfig::default();
        config.kinds.insert(
            "phone".into(),
            KindRule {
                limit: 0,
                ..KindRule::default()
            },
        );
        assert!(matches!(
            IdentityRules::new(config),
            Err(RulesError::BadKind { .. })
        ));
    }

    #[test]
    fn blocked_values_are_normalised_like_events_and_invalid_ones_refused() {
        let mut config = IdentityRulesConfig::default();
        if let Some(device) = config.kinds.get_mut("device_id") {
            device.blocked.push("TABLET-Q1".into());
            device.blocked_patterns.push("KIOSK-*".into());
        }
        if let Some(phone) = config.kinds.get_mut("phone") {
            phone.blocked.push("0900 000 000".into());
        }
        let rules = IdentityRules::new(config).unwrap();
        assert!(
            rules
                .blocked(&Identifier::new(IdKind::DeviceId, "tablet-q1"))
                .is_some()
        );
        assert!(
            rules
                .blocked(&Identifier::new(IdKind::DeviceId, "kiosk-7"))
                .is_some()
        );
        assert!(
            rules
                .blocked(&Identifier::new(IdKind::Phone, "+84900000000"))
                .is_some()
        );
        let mut config = IdentityRulesConfig::default();
        if let Some(phone) = config.kinds.get_mut("phone") {
            phone.blocked.push("not a phone".into());
        }
        let err = IdentityRules::new(config).unwrap_err();
        assert!(
            matches!(
                err,
                RulesError::BadValue {
                    field: "blocked",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("not a phone"), "{err}");
    }
}
