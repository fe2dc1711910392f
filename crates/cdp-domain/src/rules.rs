//! Identity rules and validation limits, read from configuration.

use std::collections::BTreeMap;

use globset::{Glob, GlobMatcher};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::event::{IdKind, Identifier};
use crate::normalize::{EmailPolicy, PhonePolicy};

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
    /// Exact normalised values that never link (a placeholder phone, a test email).
    pub blocked: Vec<String>,
    /// Glob patterns over normalised values that never link (`pos-*` for
    /// a store's shared POS devices, `*@test.invalid`).
    pub blocked_patterns: Vec<String>,
}

impl Default for KindRule {
    fn default() -> Self {
        KindRule {
            priority: 50,
            limit: 5,
            merge: false,
            blocked: Vec::new(),
            blocked_patterns: Vec::new(),
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
        kinds.insert("phone".into(), rule(4, 2, true));
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
        }
    }
}

#[derive(Debug, Clone)]
struct CompiledRule {
    rule: KindRule,
    patterns: Vec<(String, GlobMatcher)>,
}

/// Compiled identity rules. Built once from [`IdentityRulesConfig`].
#[derive(Debug, Clone)]
pub struct IdentityRules {
    config: IdentityRulesConfig,
    kinds: BTreeMap<IdKind, CompiledRule>,
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
            let patterns = rule
                .blocked_patterns
                .iter()
                .map(|p| {
                    Glob::new(p)
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
                    patterns,
                },
            );
        }
        Ok(IdentityRules { config, kinds })
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
        if compiled.rule.blocked.iter().any(|b| b == &id.value) {
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
}
