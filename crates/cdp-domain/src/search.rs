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

fn phone_terms(e164: &str) -> Vec<String> {
    let digits: String = e164.chars().filter(char::is_ascii_digit).collect();
    let mut out = vec![format!("tel:{digits}")];
    if let Some(national) = digits.strip_prefix("84") {
        out.push(format!("tel:0{national}"));
    }
    out
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
        let terms = phone_terms("+84912345678");
        assert!(terms.contains(&"tel:84912345678".to_string()));
        assert!(terms.contains(&"tel:0912345678".to_string()));
        assert!(query_prefixes("0912 345").contains(&"tel:0912345".to_string()));
        assert!(query_prefixes("+84 912").contains(&"tel:84912".to_string()));
    }
}
