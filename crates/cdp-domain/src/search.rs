//! Search terms: what an agent types (a name with or without diacritics, an
//! email or a phone prefix in any common form) and what it should find.

use unicode_normalization::UnicodeNormalization;

use crate::event::{IdKind, Touchpoint};

/// Lower case without diacritics: "Nguyễn Thị Lan" -> "nguyen thi lan".
pub fn fold_text(s: &str) -> String {
    s.nfd()
        .filter(|c| !unicode_normalization::char::is_combining_mark(*c))
        .map(|c| match c {
            'đ' | 'Đ' => 'd',
            other => other,
        })
        .flat_map(char::to_lowercase)
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A phone's search term: its digits in international form (`84912...`).
/// A national form typed in a query (`0912...`) is looked for in this form
/// too ([`query_prefixes`]), so one term per phone serves both.
fn phone_terms(e164: &str) -> Vec<String> {
    let digits: String = e164.chars().filter(char::is_ascii_digit).collect();
    vec![format!("tel:{digits}")]
}

/// The country code a phone typed with a national `0` is looked for under.
const NATIONAL_PREFIX_COUNTRY: &str = "84";

/// Terms earlier versions indexed for `term` besides it: a phone's national
/// form (`tel:0912...` beside `tel:84912...`). An erasure removes them too.
pub fn former_terms(term: &str) -> Option<String> {
    let national = term
        .strip_prefix("tel:")?
        .strip_prefix(NATIONAL_PREFIX_COUNTRY)?;
    (!national.is_empty()).then(|| format!("tel:0{national}"))
}

/// The search terms an event contributes to its customer.
pub fn terms(t: &Touchpoint) -> Vec<String> {
    terms_of(&t.personal.identifiers, |key| {
        t.personal.traits.get(key).and_then(|v| v.as_str())
    })
}

/// The search terms of identifiers and name traits (`trait_text` gives a
/// trait's text by name).
pub fn terms_of<'a>(
    identifiers: impl IntoIterator<Item = &'a crate::Identifier>,
    trait_text: impl Fn(&str) -> Option<&'a str>,
) -> Vec<String> {
    let mut out = Vec::new();
    for id in identifiers {
        match id.kind {
            IdKind::Email => out.push(format!("email:{}", id.value)),
            IdKind::Phone => out.extend(phone_terms(&id.value)),
            _ => {}
        }
    }
    for key in ["name", "full_name", "first_name", "last_name"] {
        if let Some(name) = trait_text(key) {
            let folded = fold_text(name);
            if folded.is_empty() {
                continue;
            }
            for word in folded.split(' ') {
                out.push(format!("name:{word}"));
            }
            out.push(format!("name:{folded}"));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The term prefixes a typed query looks for.
pub fn query_prefixes(query: &str) -> Vec<String> {
    let q = query.trim();
    if q.is_empty() {
        return Vec::new();
    }
    let mut out = vec![
        format!("name:{}", fold_text(q)),
        format!("email:{}", q.to_lowercase()),
    ];
    if q.chars()
        .all(|c| c.is_ascii_digit() || " +-().".contains(c))
    {
        let digits: String = q.chars().filter(char::is_ascii_digit).collect();
        if !digits.is_empty() {
            out.push(format!("tel:{digits}"));
        }
        // A national number (`0912...`) as its international digits, the
        // form phones are indexed in; the national form still finds
        // profiles indexed before that.
        if let Some(national) = digits.strip_prefix('0')
            && !national.is_empty()
            && !q.trim_start().starts_with('+')
        {
            out.push(format!("tel:{NATIONAL_PREFIX_COUNTRY}{national}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vietnamese_names_fold_to_plain_letters() {
        assert_eq!(fold_text("  Nguyễn Thị   Lan "), "nguyen thi lan");
        assert_eq!(fold_text("Đặng Văn Đức"), "dang van duc");
        assert_eq!(fold_text("TRẦN"), "tran");
    }

    #[test]
    fn a_name_query_matches_with_or_without_diacritics() {
        assert_eq!(query_prefixes("Nguyễn")[0], "name:nguyen");
        assert_eq!(query_prefixes("nguyen")[0], "name:nguyen");
    }

    #[test]
    fn phones_are_found_by_national_and_international_prefixes() {
        assert_eq!(phone_terms("+84912345678"), vec!["tel:84912345678"]);
        let national = query_prefixes("0912 345");
        assert!(national.contains(&"tel:84912345".to_string()));
        assert!(national.contains(&"tel:0912345".to_string()));
        assert!(query_prefixes("+84 912").contains(&"tel:84912".to_string()));
        assert!(!query_prefixes("+0912").contains(&"tel:84912".to_string()));
        assert!(!query_prefixes("0").iter().any(|p| p == "tel:84"));
        assert_eq!(
            former_terms("tel:84912345678").as_deref(),
            Some("tel:0912345678")
        );
        assert_eq!(former_terms("tel:14155552671"), None);
        assert_eq!(former_terms("email:a@b.vn"), None);
    }
}
