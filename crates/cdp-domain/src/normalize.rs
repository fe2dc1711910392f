//! Identifier normalisation: one canonical form per kind, so the same person
//! typed in different ways is one identifier.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::event::{IdKind, Identifier};

/// Why an identifier value was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NormalizeError {
    #[error("is empty")]
    Empty,
    #[error("is longer than {max} characters")]
    TooLong { max: usize },
    #[error("contains control characters")]
    ControlCharacters,
    #[error("is not an email address: {0}")]
    Email(&'static str),
    #[error("is not a valid phone number: {0}")]
    Phone(String),
    #[error("must contain only digits")]
    NotNumeric,
    #[error("kind {0:?} is not declared in the identity rules")]
    UndeclaredKind(String),
}

/// Email normalisation policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmailPolicy {
    /// Domains where `local+tag@domain` is the same mailbox as `local@domain`.
    pub strip_plus_tag_domains: Vec<String>,
    /// Domains where dots in the local part are ignored (`a.b@gmail.com` is `ab@gmail.com`).
    pub ignore_dots_domains: Vec<String>,
    /// Domain aliases folded onto one canonical domain (`googlemail.com` -> `gmail.com`).
    pub domain_aliases: Vec<(String, String)>,
}

impl Default for EmailPolicy {
    fn default() -> Self {
        EmailPolicy {
            strip_plus_tag_domains: vec!["gmail.com".into(), "googlemail.com".into()],
            ignore_dots_domains: vec!["gmail.com".into(), "googlemail.com".into()],
            domain_aliases: vec![("googlemail.com".into(), "gmail.com".into())],
        }
    }
}

/// Phone normalisation policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PhonePolicy {
    /// ISO 3166 region used for national forms such as `0912 345 678`.
    pub default_region: String,
    /// Map Vietnam's pre-2018 11-digit mobile numbers onto their 10-digit form.
    pub vn_2018_renumbering: bool,
}

impl Default for PhonePolicy {
    fn default() -> Self {
        PhonePolicy {
            default_region: "VN".into(),
            vn_2018_renumbering: true,
        }
    }
}

pub const MAX_IDENTIFIER_LEN: usize = 256;

/// Normalises `raw` for `kind`. Custom kinds are trimmed and checked for
/// length and control characters; built-in kinds have their own rules.
pub fn normalize(
    kind: &IdKind,
    raw: &str,
    email: &EmailPolicy,
    phone: &PhonePolicy,
) -> Result<Identifier, NormalizeError> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err(NormalizeError::Empty);
    }
    if trimmed.chars().count() > MAX_IDENTIFIER_LEN {
        return Err(NormalizeError::TooLong {
            max: MAX_IDENTIFIER_LEN,
        });
    }
    if trimmed.chars().any(char::is_control) {
        return Err(NormalizeError::ControlCharacters);
    }
    let value = match kind {
        IdKind::Email => normalize_email(trimmed, email)?,
        IdKind::Phone => normalize_phone(trimmed, phone)?,
        IdKind::ZaloId | IdKind::FacebookPsid | IdKind::ShopeeBuyerId => {
            if !trimmed.chars().all(|c| c.is_ascii_digit()) {
                return Err(NormalizeError::NotNumeric);
            }
            trimmed.to_owned()
        }
        IdKind::LoyaltyId => trimmed
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '-')
            .flat_map(char::to_uppercase)
            .collect(),
        // Device and anonymous ids are usually UUIDs: compare them case-insensitively.
        IdKind::AnonymousId | IdKind::DeviceId => trimmed.to_lowercase(),
        IdKind::UserId | IdKind::LazadaBuyerId | IdKind::TikiBuyerId | IdKind::Custom(_) => {
            trimmed.to_owned()
        }
    };
    // Normalising can empty a value (a loyalty card of dashes) or lengthen
    // it (`ß` upper-cases to `SS`, `İ` lower-cases to two characters): the
    // canonical value keeps the limits of the raw one.
    if value.is_empty() {
        return Err(NormalizeError::Empty);
    }
    if value.chars().count() > MAX_IDENTIFIER_LEN {
        return Err(NormalizeError::TooLong {
            max: MAX_IDENTIFIER_LEN,
        });
    }
    Ok(Identifier::new(kind.clone(), value))
}

fn normalize_email(raw: &str, policy: &EmailPolicy) -> Result<String, NormalizeError> {
    let lower = raw.to_lowercase();
    if lower.chars().any(char::is_whitespace) {
        return Err(NormalizeError::Email("contains whitespace"));
    }
    let (local, domain) = lower
        .rsplit_once('@')
        .ok_or(NormalizeError::Email("missing '@'"))?;
    if local.is_empty() {
        return Err(NormalizeError::Email("empty local part before '@'"));
    }
    if local.contains('@') {
        return Err(NormalizeError::Email("more than one '@'"));
    }
    let domain = domain.trim_end_matches('.');
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 || labels.iter().any(|l| l.is_empty()) {
        return Err(NormalizeError::Email("domain must look like name.tld"));
    }
    if labels.iter().any(|l| {
        l.starts_with('-')
            || l.ends_with('-')
            || !l.chars().all(|c| c.is_alphanumeric() || c == '-')
    }) {
        return Err(NormalizeError::Email("domain has invalid characters"));
    }
    let domain = policy
        .domain_aliases
        .iter()
        .find(|(alias, _)| alias == domain)
        .map_or(domain, |(_, canonical)| canonical.as_str());
    let mut local = local.to_owned();
    if policy.strip_plus_tag_domains.iter().any(|d| d == domain)
        && let Some((base, _tag)) = local.split_once('+')
    {
        if base.is_empty() {
            return Err(NormalizeError::Email("empty local part before '+'"));
        }
        local = base.to_owned();
    }
    if policy.ignore_dots_domains.iter().any(|d| d == domain) {
        local.retain(|c| c != '.');
        if local.is_empty() {
            return Err(NormalizeError::Email("empty local part"));
        }
    }
    Ok(format!("{local}@{domain}"))
}

/// Vietnam's 2018 renumbering of 11-digit mobile numbers: old prefix (after
/// the national `0`) to new prefix.
const VN_2018_PREFIXES: [(&str, &str); 21] = [
    ("120", "70"),
    ("121", "79"),
    ("122", "77"),
    ("126", "76"),
    ("128", "78"),
    ("123", "83"),
    ("124", "84"),
    ("125", "85"),
    ("127", "81"),
    ("129", "82"),
    ("162", "32"),
    ("163", "33"),
    ("164", "34"),
    ("165", "35"),
    ("166", "36"),
    ("167", "37"),
    ("168", "38"),
    ("169", "39"),
    ("186", "56"),
    ("188", "58"),
    ("199", "59"),
];

fn normalize_phone(raw: &str, policy: &PhonePolicy) -> Result<String, NormalizeError> {
    if let Some(bad) = raw
        .chars()
        .find(|c| !(c.is_ascii_digit() || " +-().".contains(*c)))
    {
        return Err(NormalizeError::Phone(format!(
            "unexpected character {bad:?}"
        )));
    }
    let digits: String = raw.chars().filter(char::is_ascii_digit).collect();
    if digits.is_empty() {
        return Err(NormalizeError::Phone("no digits".into()));
    }
    let region: phonenumber::country::Id = policy.default_region.parse().map_err(|_| {
        NormalizeError::Phone(format!(
            "unknown default region {:?}",
            policy.default_region
        ))
    })?;
    let mut candidate = raw.to_owned();
    if policy.vn_2018_renumbering
        && let Some(renumbered) = vn_renumber(raw, &digits, region)
    {
        candidate = renumbered;
    }
    let number = phonenumber::parse(Some(region), &candidate)
        .map_err(|e| NormalizeError::Phone(e.to_string()))?;
    if !phonenumber::is_valid(&number) {
        return Err(NormalizeError::Phone(
            "no such number in its country's numbering plan".into(),
        ));
    }
    Ok(number.format().mode(phonenumber::Mode::E164).to_string())
}

/// Rewrites an old 11-digit Vietnamese mobile number (`0162 xxx xxxx`,
/// `84 162 ...`, `+84 162 ...`) to its post-2018 form in E.164.
fn vn_renumber(raw: &str, digits: &str, region: phonenumber::country::Id) -> Option<String> {
    let national = if raw.trim_start().starts_with('+') || digits.len() == 11 + 1 {
        digits.strip_prefix("84")?
    } else if region == phonenumber::country::Id::VN {
        digits.strip_prefix('0')?
    } else {
        return None;
    };
    if national.len() != 10 {
        return None;
    }
    VN_2018_PREFIXES.iter().find_map(|(old, new)| {
        national
            .strip_prefix(old)
            .map(|rest| format!("+84{new}{rest}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn email(s: &str) -> Result<String, NormalizeError> {
        normalize(
            &IdKind::Email,
            s,
            &EmailPolicy::default(),
            &PhonePolicy::default(),
        )
        .map(|i| i.value)
    }

    fn phone(s: &str) -> Result<String, NormalizeError> {
        normalize(
            &IdKind::Phone,
            s,
            &EmailPolicy::default(),
            &PhonePolicy::default(),
        )
        .map(|i| i.value)
    }

    #[test]
    fn emails_fold_case_and_spaces() {
        assert_eq!(
            email("  Lan.Nguyen@Example.VN ").unwrap(),
            "lan.nguyen@example.vn"
        );
        assert_eq!(email("LAN@EXAMPLE.COM").unwrap(), "lan@example.com");
    }

    #[test]
    fn gmail_ignores_dots_and_plus_tags_other_providers_keep_them() {
        assert_eq!(
            email("Lan.Nguyen+shop@gmail.com").unwrap(),
            "lannguyen@gmail.com"
        );
        assert_eq!(
            email("lan.nguyen@googlemail.com").unwrap(),
            "lannguyen@gmail.com"
        );
        assert_eq!(
            email("lan.nguyen+x@yahoo.com").unwrap(),
            "lan.nguyen+x@yahoo.com"
        );
    }

    #[test]
    fn malformed_emails_are_rejected_with_a_reason() {
        assert!(matches!(
            email("lan.example.com"),
            Err(NormalizeError::Email("missing '@'"))
        ));
        assert!(matches!(
            email("@example.com"),
            Err(NormalizeError::Email(_))
        ));
        assert!(matches!(
            email("lan@localhost"),
            Err(NormalizeError::Email(_))
        ));
        assert!(matches!(
            email("la n@example.com"),
            Err(NormalizeError::Email(_))
        ));
        assert!(matches!(
            email("a@b@example.com"),
            Err(NormalizeError::Email(_))
        ));
        assert!(matches!(email("   "), Err(NormalizeError::Empty)));
    }

    #[test]
    fn vietnamese_mobile_forms_are_one_number() {
        for form in [
            "0912 345 678",
            "0912345678",
            "84912345678",
            "+84 912 345 678",
            "+84-912-345-678",
            "(+84) 912.345.678",
        ] {
            assert_eq!(phone(form).unwrap(), "+84912345678", "form {form:?}");
        }
    }

    #[test]
    fn old_eleven_digit_mobiles_map_to_their_2018_numbers() {
        assert_eq!(phone("0162 345 6789").unwrap(), "+84323456789");
        assert_eq!(phone("+84 1683456789").unwrap(), "+84383456789");
        assert_eq!(phone("841203456789").unwrap(), "+84703456789");
        assert_eq!(phone("0323456789").unwrap(), "+84323456789");
    }

    #[test]
    fn foreign_numbers_in_international_form_are_kept() {
        assert_eq!(phone("+1 650-253-0000").unwrap(), "+16502530000");
    }

    #[test]
    fn malformed_phones_are_rejected() {
        assert!(matches!(phone("0000000000"), Err(NormalizeError::Phone(_))));
        assert!(matches!(phone("12"), Err(NormalizeError::Phone(_))));
        assert!(matches!(phone("0912abc678"), Err(NormalizeError::Phone(_))));
    }

    #[test]
    fn numeric_platform_ids_must_be_digits() {
        let p = PhonePolicy::default();
        let e = EmailPolicy::default();
        assert_eq!(
            normalize(&IdKind::ZaloId, " 84123 ", &e, &p).unwrap().value,
            "84123"
        );
        assert_eq!(
            normalize(&IdKind::ZaloId, "abc", &e, &p),
            Err(NormalizeError::NotNumeric)
        );
    }

    #[test]
    fn device_ids_compare_case_insensitively_user_ids_do_not() {
        let p = PhonePolicy::default();
        let e = EmailPolicy::default();
        assert_eq!(
            normalize(&IdKind::DeviceId, "ABC-1", &e, &p).unwrap().value,
            "abc-1"
        );
        assert_eq!(
            normalize(&IdKind::UserId, "ABC-1", &e, &p).unwrap().value,
            "ABC-1"
        );
    }

    #[test]
    fn values_that_normalise_to_nothing_or_past_the_limit_are_rejected() {
        let p = PhonePolicy::default();
        let e = EmailPolicy::default();
        assert_eq!(
            normalize(&IdKind::LoyaltyId, "- -", &e, &p),
            Err(NormalizeError::Empty)
        );
        assert_eq!(
            normalize(&IdKind::LoyaltyId, &"\u{df}".repeat(200), &e, &p),
            Err(NormalizeError::TooLong {
                max: MAX_IDENTIFIER_LEN
            })
        );
    }

    #[test]
    fn control_characters_and_overlong_values_are_rejected() {
        let p = PhonePolicy::default();
        let e = EmailPolicy::default();
        assert_eq!(
            normalize(&IdKind::UserId, "a\u{7}b", &e, &p),
            Err(NormalizeError::ControlCharacters)
        );
        assert_eq!(
            normalize(&IdKind::UserId, &"x".repeat(300), &e, &p),
            Err(NormalizeError::TooLong {
                max: MAX_IDENTIFIER_LEN
            })
        );
    }
}
