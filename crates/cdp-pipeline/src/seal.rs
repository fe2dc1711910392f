//! How records keep personal data: sealed under the keys of the
//! identifiers they carry (crypto-shredding, see `cdp_seal`), so erasing a
//! customer's keys erases them from every copy of the log.
//!
//! - A touchpoint's identifiers, traits, dropped values and the **text** of
//!   its properties are sealed together; numbers, booleans and the text of
//!   a few properties that name things rather than people
//!   ([`CLEAR_PROPERTIES`]: currency, order and product ids, campaign
//!   fields...) stay readable, so an erased customer's events still count
//!   and their revenue still adds up.
//! - Identifiers in other records (merge causes, the identity graph's
//!   changes, alerts) are sealed under their own key.
//! - Record keys and the [`crate::header::SUBJECTS`] header name subjects
//!   by their HMAC, never by value.

use cdp_domain::{Attributes, Identifier};
use cdp_proto::v1;
use cdp_seal::{Hasher, KeySet, Sealed, Subject};
use serde_json::Value;

/// Text properties that stay readable after an erasure (matched on the
/// property's own name, at any depth): they name orders, products,
/// campaigns and places, not people.
pub const CLEAR_PROPERTIES: &[&str] = &[
    "currency",
    "order_id",
    "checkout_id",
    "cart_id",
    "product_id",
    "sku",
    "category",
    "brand",
    "variant",
    "coupon",
    "promotion_id",
    "status",
    "store_id",
    "branch_id",
    "shop_id",
    "payment_method",
    "shipping_method",
    "purpose",
    "channel",
    "notice_version",
    "list_id",
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "utm_content",
    "utm_term",
    "source",
    "medium",
    "campaign",
    "platform",
    "step",
    "stage",
    "locale",
];

/// Parts of property names under which even a number is personal (a phone
/// or an ID card number sent as a number).
pub const PERSONAL_NUMBER_NAMES: &[&str] = &[
    "phone",
    "mobile",
    "tel",
    "zalo",
    "cmnd",
    "cccd",
    "national",
    "passport",
    "id_number",
    "card",
    "account",
    "tax_code",
    "mst",
    "birth",
    "dob",
];

fn personal_number(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    PERSONAL_NUMBER_NAMES.iter().any(|p| name.contains(p))
}

/// What a stage needs to seal and open records: the platform's subject
/// hasher and the keys it fetched for a batch.
#[derive(Debug, Clone)]
pub struct Sealing {
    pub hasher: Hasher,
    pub keys: KeySet,
    /// Subjects computed already (see [`with_subjects`](Self::with_subjects)).
    known: std::collections::HashMap<Identifier, Subject>,
}

impl Sealing {
    pub fn new(hasher: Hasher, keys: KeySet) -> Self {
        Sealing {
            hasher,
            keys,
            known: std::collections::HashMap::new(),
        }
    }

    /// This sealing, remembering the subjects of identifiers the caller
    /// computed already: each is then named by one HMAC per batch, however
    /// many times the batch's records name it.
    pub fn with_subjects(mut self, known: std::collections::HashMap<Identifier, Subject>) -> Self {
        self.known = known;
        self
    }

    pub fn subject(&self, id: &Identifier) -> Subject {
        match self.known.get(id) {
            Some(s) => *s,
            None => cdp_store::keys::subject_of(&self.hasher, id),
        }
    }

    /// A sealing with a fresh hash secret and a fresh key for each of
    /// `ids` (tests, fuzzing, tools that write a log of their own).
    pub fn fresh<'a>(
        ids: impl IntoIterator<Item = &'a Identifier>,
    ) -> Result<Self, cdp_seal::SealError> {
        let hasher = Hasher::new(&cdp_seal::DataKey::generate()?);
        let mut keys = KeySet::new();
        for id in ids {
            keys.insert(
                cdp_store::keys::subject_of(&hasher, id),
                Some(cdp_seal::DataKey::generate()?),
            );
        }
        Ok(Sealing::new(hasher, keys))
    }

    /// The key of `id`, when it has one (not erased).
    pub fn key_of(&self, id: &Identifier) -> Option<(Subject, &cdp_seal::DataKey)> {
        let s = self.subject(id);
        self.keys.get(&s).map(|k| (s, k))
    }
}

pub(crate) fn part(s: Sealed) -> v1::SealedPart {
    v1::SealedPart {
        subjects: s.subjects.iter().map(|s| s.0.to_vec()).collect(),
        salt: s.salt,
        ciphertext: s.ciphertext,
    }
}

pub(crate) fn sealed(p: &v1::SealedPart) -> Result<Sealed, cdp_seal::SealError> {
    Ok(Sealed {
        subjects: p
            .subjects
            .iter()
            .map(|s| Subject::from_slice(s))
            .collect::<Result<_, _>>()?,
        salt: p.salt.clone(),
        ciphertext: p.ciphertext.clone(),
    })
}

/// The subjects a sealed part opens with.
pub fn subjects_of(p: &v1::SealedPart) -> impl Iterator<Item = Subject> + '_ {
    p.subjects
        .iter()
        .filter_map(|s| Subject::from_slice(s).ok())
}

/// The [`crate::header::SUBJECTS`] header: the subjects, 32 bytes each.
pub fn subjects_header(subjects: &[Subject]) -> Vec<u8> {
    subjects.iter().flat_map(|s| s.0).collect()
}

/// The subjects a [`crate::header::SUBJECTS`] header names.
pub fn read_subjects_header(h: &[u8]) -> Vec<Subject> {
    h.chunks_exact(32)
        .filter_map(|c| Subject::from_slice(c).ok())
        .collect()
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn split(value: &mut Value, path: &str, name: Option<&str>, out: &mut Vec<(String, Value)>) {
    match value {
        Value::String(_) if !name.is_some_and(|n| CLEAR_PROPERTIES.contains(&n)) => {
            out.push((path.to_owned(), value.take()));
        }
        Value::Number(_) if name.is_some_and(personal_number) => {
            out.push((path.to_owned(), value.take()));
        }
        Value::Array(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                split(v, &format!("{path}/{i}"), name, out);
            }
        }
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                split(v, &format!("{path}/{}", escape(k)), Some(k), out);
            }
        }
        _ => {}
    }
}

/// Takes the text values that may be personal out of `properties` (a null
/// stays in their place) and returns them as `[pointer, value]` pairs.
pub fn split_properties(properties: &mut Attributes) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (k, v) in properties.iter_mut() {
        split(v, &format!("/{}", escape(k)), Some(k), &mut out);
    }
    out
}

/// Puts the values [`split_properties`] took back in their place.
pub fn restore_properties(properties: &mut Attributes, taken: Vec<(String, Value)>) {
    let mut root = Value::Object(std::mem::take(properties));
    for (pointer, value) in taken {
        if let Some(slot) = root.pointer_mut(&pointer) {
            *slot = value;
        }
    }
    if let Value::Object(map) = root {
        *properties = map;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_is_taken_out_and_put_back_numbers_and_named_ids_stay() {
        let original = json!({
            "order_id": "SO-1", "revenue": 1250000, "currency": "VND",
            "shipping_address": "12 Lý Thái Tổ, Hà Nội",
            "products": [{"product_id": "P1", "name": "Áo dài", "price": 450000}],
            "a/b~c": {"note": "gọi trước 0912345678"},
            "gift": true,
            "receiver_phone": 912345679
        });
        let mut props = original.as_object().unwrap().clone();
        let taken = split_properties(&mut props);
        let clear = serde_json::to_string(&props).unwrap();
        for secret in ["Lý Thái Tổ", "Áo dài", "0912345678", "912345679"] {
            assert!(!clear.contains(secret), "{secret} in {clear}");
        }
        assert_eq!(props["order_id"], "SO-1");
        assert_eq!(props["revenue"], 1250000);
        assert_eq!(props["products"][0]["price"], 450000);
        assert_eq!(props["shipping_address"], Value::Null);
        assert_eq!(taken.len(), 4);
        restore_properties(&mut props, taken);
        assert_eq!(Value::Object(props), original);
    }
}
