//! Who may do what, and what they see of personal data: roles and their
//! permissions, the permission every API method needs, and the masking
//! rules every response goes through. Pure rules; the gRPC layer, the
//! console and the services apply them (`cdp-runtime::auth`).
//!
//! Masking is decided here once, by kind of value, so no screen or API can
//! show more than another: a phone is `0912***678`, an email `l***@shop.vn`,
//! a name `N*** T*** L***`, free text has its phone numbers and emails
//! masked, and analysts see stable pseudonyms (`ps_…`, a keyed hash) they
//! can join on but not read.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;

use crate::event::{Attributes, Identifier, Touchpoint};
use crate::profile::Profile;
use crate::timeline::TimelineEntry;

/// A built-in role. Credentials carry exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Appends touchpoints for the sources its credential names.
    Ingest,
    /// Looks up, searches and watches customers; personal fields masked.
    Agent,
    /// An agent who may also reveal a field (with a reason) and read the
    /// audit of their team.
    Supervisor,
    /// Replays the log and exports it, with pseudonymised identifiers.
    Analyst,
    /// Runs the platform: projections, dead letters, identity rules. Sees
    /// no personal data.
    Operator,
    /// Everything, including credentials and the whole audit.
    Admin,
    /// The data protection officer: records consent, answers access
    /// requests (exports) and reads the audit.
    Privacy,
}

impl Role {
    pub const ALL: [Role; 7] = [
        Role::Ingest,
        Role::Agent,
        Role::Supervisor,
        Role::Analyst,
        Role::Operator,
        Role::Admin,
        Role::Privacy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Agent => "agent",
            Role::Supervisor => "supervisor",
            Role::Analyst => "analyst",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Privacy => "privacy",
        }
    }

    /// Whether the role grants `p`. Appending touchpoints is the `ingest`
    /// role's alone: every touchpoint is then bound to a source its
    /// credential names (see [`source_of`]).
    pub fn allows(self, p: Permission) -> bool {
        use Permission as P;
        match self {
            // Reflection lists the API (public in `proto/` anyway), no data.
            Role::Ingest => matches!(p, P::Ingest | P::Reflect),
            // Agents take consent given on the phone or at the counter.
            Role::Agent => matches!(p, P::ReadProfiles | P::RecordConsent | P::Reflect),
            Role::Supervisor => matches!(
                p,
                P::ReadProfiles | P::RecordConsent | P::Reveal | P::ReadAudit | P::Reflect
            ),
            Role::Privacy => matches!(
                p,
                P::ReadProfiles | P::RecordConsent | P::Privacy | P::ReadAudit | P::Reflect
            ),
            // Analysts (marketing) define the audiences.
            Role::Analyst => matches!(p, P::Replay | P::Audiences | P::Reflect),
            Role::Operator => matches!(p, P::Operate | P::Reflect),
            Role::Admin => !matches!(p, P::Ingest),
        }
    }

    /// How personal values are shown to this role unless its credential
    /// says otherwise.
    pub fn default_disclosure(self) -> Disclosure {
        match self {
            Role::Agent | Role::Supervisor | Role::Admin | Role::Ingest | Role::Privacy => {
                Disclosure::Masked
            }
            Role::Analyst | Role::Operator => Disclosure::Pseudonymised,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s.trim())
            .ok_or_else(|| {
                format!(
                    "unknown role {s:?}: use one of {}",
                    Role::ALL.map(Role::as_str).join(", ")
                )
            })
    }
}

/// What an API method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    Ingest,
    ReadProfiles,
    Reveal,
    ReadAudit,
    Replay,
    Operate,
    ManageCredentials,
    /// gRPC server reflection (lists the API, no data).
    Reflect,
    /// Records a customer's consent (`PrivacyService/RecordConsent`).
    RecordConsent,
    /// Answers a customer's requests about their data: a full, unmasked
    /// export (and erasure).
    Privacy,
    /// Defines computed traits and segments (no customer data).
    Audiences,
}

impl Permission {
    /// Whether calls needing it count against the caller's read limit
    /// (`access.reads_per_minute`): reads of personal data, the audit's too.
    pub fn is_rate_limited(self) -> bool {
        matches!(
            self,
            Permission::ReadProfiles
                | Permission::Reveal
                | Permission::Replay
                | Permission::ReadAudit
                | Permission::Privacy
        )
    }
}

/// Whether a gRPC method answers without a credential (health checks).
pub fn is_public(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
}

/// The permission a gRPC method (`/package.Service/Method`) needs; `None`
/// for a method nobody may call (default deny: a method added without an
/// entry here is refused).
pub fn permission_of(path: &str) -> Option<Permission> {
    use Permission as P;
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let p = match (service, method) {
        ("cdp.v1.IngestService", "Track" | "TrackBatch" | "TrackStream") => P::Ingest,
        (
            "cdp.v1.ProfileService",
            "GetProfile" | "ListTimeline" | "SearchCustomers" | "WatchProfile",
        ) => P::ReadProfiles,
        ("cdp.v1.IdentityService", "Explain" | "ListMerges") => P::ReadProfiles,
        ("cdp.v1.IdentityService", "GetDecision" | "ListQuarantined") => P::Operate,
        ("cdp.v1.DeadLetterService", "ListDeadLetters" | "Redrive") => P::Operate,
        (
            "cdp.v1.ProjectionService",
            "StartRebuild" | "GetRebuild" | "CancelRebuild" | "ListGenerations"
            | "ActivateGeneration" | "DropGeneration" | "GetPipelineStatus" | "CompareGenerations",
        ) => P::Operate,
        ("cdp.v1.ReplayService", "Replay") => P::Replay,
        ("cdp.v1.AccessService", "RevealField") => P::Reveal,
        ("cdp.v1.AccessService", "ListAudit") => P::ReadAudit,
        // The whole chain, every team's records: admins only.
        (
            "cdp.v1.AccessService",
            "ExportAudit" | "IssueCredential" | "ListCredentials" | "RevokeCredential",
        ) => P::ManageCredentials,
        ("cdp.v1.AccessService", "WhoAmI") => return Some(P::Reflect),
        ("cdp.v1.PrivacyService", "GetConsent" | "CheckConsent") => P::ReadProfiles,
        ("cdp.v1.PrivacyService", "RecordConsent") => P::RecordConsent,
        ("cdp.v1.PrivacyService", "Export" | "Erase" | "GetErasure") => P::Privacy,
        ("cdp.v1.PrivacyService", "RotateMasterKey") => P::Operate,
        (
            "cdp.v1.AudienceService",
            "SaveComputedTrait" | "SaveSegment" | "DeleteDefinition" | "ListDefinitions"
            | "ValidateSegment" | "ListChanges" | "GetBackfill" | "ListMembers" | "PreviewSegment",
        ) => P::Audiences,
        // One customer's view, audited like GetProfile.
        ("cdp.v1.AudienceService", "ExplainMembership" | "GetMemberships") => P::ReadProfiles,
        ("grpc.reflection.v1.ServerReflection", _)
        | ("grpc.reflection.v1alpha.ServerReflection", _) => P::Reflect,
        _ => return None,
    };
    Some(p)
}

/// Every method of the API with the permission it needs (for the access
/// matrix tests and the docs).
pub const METHODS: &[&str] = &[
    "/cdp.v1.IngestService/Track",
    "/cdp.v1.IngestService/TrackBatch",
    "/cdp.v1.IngestService/TrackStream",
    "/cdp.v1.ProfileService/GetProfile",
    "/cdp.v1.ProfileService/ListTimeline",
    "/cdp.v1.ProfileService/SearchCustomers",
    "/cdp.v1.ProfileService/WatchProfile",
    "/cdp.v1.IdentityService/Explain",
    "/cdp.v1.IdentityService/ListMerges",
    "/cdp.v1.IdentityService/GetDecision",
    "/cdp.v1.IdentityService/ListQuarantined",
    "/cdp.v1.DeadLetterService/ListDeadLetters",
    "/cdp.v1.DeadLetterService/Redrive",
    "/cdp.v1.ProjectionService/StartRebuild",
    "/cdp.v1.ProjectionService/GetRebuild",
    "/cdp.v1.ProjectionService/CancelRebuild",
    "/cdp.v1.ProjectionService/ListGenerations",
    "/cdp.v1.ProjectionService/ActivateGeneration",
    "/cdp.v1.ProjectionService/DropGeneration",
    "/cdp.v1.ProjectionService/GetPipelineStatus",
    "/cdp.v1.ProjectionService/CompareGenerations",
    "/cdp.v1.ReplayService/Replay",
    "/cdp.v1.AccessService/RevealField",
    "/cdp.v1.AccessService/ListAudit",
    "/cdp.v1.AccessService/ExportAudit",
    "/cdp.v1.AccessService/IssueCredential",
    "/cdp.v1.AccessService/ListCredentials",
    "/cdp.v1.AccessService/RevokeCredential",
    "/cdp.v1.AccessService/WhoAmI",
    "/cdp.v1.PrivacyService/RecordConsent",
    "/cdp.v1.PrivacyService/GetConsent",
    "/cdp.v1.PrivacyService/CheckConsent",
    "/cdp.v1.PrivacyService/Export",
    "/cdp.v1.PrivacyService/Erase",
    "/cdp.v1.PrivacyService/GetErasure",
    "/cdp.v1.PrivacyService/RotateMasterKey",
    "/cdp.v1.AudienceService/SaveComputedTrait",
    "/cdp.v1.AudienceService/SaveSegment",
    "/cdp.v1.AudienceService/DeleteDefinition",
    "/cdp.v1.AudienceService/ListDefinitions",
    "/cdp.v1.AudienceService/ValidateSegment",
    "/cdp.v1.AudienceService/ListChanges",
    "/cdp.v1.AudienceService/GetBackfill",
    "/cdp.v1.AudienceService/ListMembers",
    "/cdp.v1.AudienceService/ExplainMembership",
    "/cdp.v1.AudienceService/GetMemberships",
    "/cdp.v1.AudienceService/PreviewSegment",
];

/// The source a touchpoint sent with `claimed` (free text, may be empty)
/// is recorded under, given the sources its credential may send for: the
/// claimed one when the credential names it, the credential's only source
/// when none is claimed. `*` names every source (a relay trusted with all
/// of them). Anything else is refused: no client borrows another source's
/// trust.
pub fn source_of(claimed: &str, allowed: &[String]) -> Result<String, String> {
    let claimed = claimed.trim();
    if claimed.is_empty() {
        return match allowed {
            [only] if only != "*" => Ok(only.clone()),
            _ => Err("name the source: this credential may send for several".into()),
        };
    }
    if allowed.iter().any(|s| s == claimed || s == "*") {
        Ok(claimed.to_owned())
    } else {
        Err(format!(
            "source {claimed:?} is not one this credential may send for ({})",
            allowed.join(", ")
        ))
    }
}

/// How personal values are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Disclosure {
    /// As they are (a credential granted it explicitly, or a reveal).
    Clear,
    /// Partly hidden: `0912***678`, `l***@shop.vn`.
    Masked,
    /// Replaced by a stable keyed hash: joinable, not readable.
    Pseudonymised,
}

impl Disclosure {
    pub fn as_str(self) -> &'static str {
        match self {
            Disclosure::Clear => "clear",
            Disclosure::Masked => "masked",
            Disclosure::Pseudonymised => "pseudonymised",
        }
    }
}

impl FromStr for Disclosure {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "clear" => Ok(Disclosure::Clear),
            "masked" => Ok(Disclosure::Masked),
            "pseudonymised" | "pseudonymized" => Ok(Disclosure::Pseudonymised),
            other => Err(format!(
                "unknown disclosure {other:?}: use clear, masked or pseudonymised"
            )),
        }
    }
}

/// What counts as personal in free-form traits and properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersonalKeys {
    /// A key containing one of these (case-insensitive) holds personal data:
    /// `shipping_address`, `customer_phone`.
    pub containing: Vec<String>,
    /// Keys that are personal only when they are exactly one of these
    /// (`name`, but not `product_name`).
    pub exact: Vec<String>,
    /// Keys the `Masked` disclosure leaves visible (agents greet customers
    /// by name): by default `name`, `first_name`, `last_name`.
    pub visible_when_masked: Vec<String>,
}

impl Default for PersonalKeys {
    fn default() -> Self {
        let list = |xs: &[&str]| xs.iter().map(|s| (*s).to_owned()).collect();
        PersonalKeys {
            containing: list(&[
                "email",
                "phone",
                "mobile",
                "address",
                "street",
                "birthday",
                "birth_date",
                "birthdate",
                "date_of_birth",
                "national_id",
                "passport",
                "id_card",
                "tax_code",
                "postal",
                "zip",
                "ip",
            ]),
            exact: list(&[
                "name",
                "first_name",
                "last_name",
                "full_name",
                "firstname",
                "lastname",
                "customer_name",
                "recipient",
                "dob",
                "gender",
            ]),
            visible_when_masked: list(&["name", "first_name", "last_name", "full_name"]),
        }
    }
}

impl PersonalKeys {
    /// Whether values under `key` are personal.
    pub fn is_personal(&self, key: &str) -> bool {
        // Keys are mostly lower case already: no allocation then.
        let k: std::borrow::Cow<'_, str> = if key.bytes().any(|b| b.is_ascii_uppercase()) {
            std::borrow::Cow::Owned(key.to_ascii_lowercase())
        } else {
            std::borrow::Cow::Borrowed(key)
        };
        if self.exact.iter().any(|e| *e == *k) {
            return true;
        }
        // `ip` only as a whole word: `ip`, `ip_address`, `client_ip`, not `shipping`.
        self.containing.iter().any(|c| {
            if c.len() <= 3 {
                k.split(|ch: char| !ch.is_ascii_alphanumeric())
                    .any(|w| w == c)
            } else {
                k.contains(c.as_str())
            }
        })
    }
}

/// Applies a disclosure to personal values. Cheap to clone.
#[derive(Clone)]
pub struct Masker {
    pub disclosure: Disclosure,
    pub keys: std::sync::Arc<PersonalKeys>,
    /// Key of the pseudonyms (from the platform secret).
    pub pseudonym_key: std::sync::Arc<[u8]>,
}

impl fmt::Debug for Masker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Masker")
            .field("disclosure", &self.disclosure)
            .finish_non_exhaustive()
    }
}

impl Masker {
    pub fn new(disclosure: Disclosure, keys: PersonalKeys, pseudonym_key: &[u8]) -> Self {
        Masker {
            disclosure,
            keys: std::sync::Arc::new(keys),
            pseudonym_key: pseudonym_key.into(),
        }
    }

    /// The same rules with another disclosure.
    pub fn with(&self, disclosure: Disclosure) -> Self {
        Masker {
            disclosure,
            ..self.clone()
        }
    }

    pub fn is_clear(&self) -> bool {
        self.disclosure == Disclosure::Clear
    }

    /// A stable pseudonym of `what` (kind-qualified so two kinds never
    /// collide): `ps_` and 16 hex digits of an HMAC-SHA256.
    pub fn pseudonym(&self, what: &str) -> String {
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.pseudonym_key) {
            Ok(m) => m,
            // HMAC takes keys of any length; this arm cannot be reached.
            Err(_) => return "ps_".to_owned(),
        };
        mac.update(what.as_bytes());
        let out = mac.finalize().into_bytes();
        let mut s = String::with_capacity(19);
        s.push_str("ps_");
        for b in &out[..8] {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// An identifier value of `kind`.
    pub fn identifier_value(&self, kind: &str, value: &str) -> String {
        match self.disclosure {
            Disclosure::Clear => value.to_owned(),
            Disclosure::Pseudonymised => self.pseudonym(&format!("{kind}:{value}")),
            Disclosure::Masked => match kind {
                "phone" => mask_phone(value),
                "email" => mask_email(value),
                _ => mask_token(value),
            },
        }
    }

    pub fn identifier(&self, id: &mut Identifier) {
        id.value = self.identifier_value(id.kind.as_str(), &id.value);
    }

    /// A value found under `key` in traits or properties.
    pub fn keyed(&self, key: &str, value: &mut Value) {
        if self.is_clear() {
            return;
        }
        if self.keys.is_personal(key) {
            let visible = self.disclosure == Disclosure::Masked
                && self
                    .keys
                    .visible_when_masked
                    .iter()
                    .any(|k| k.eq_ignore_ascii_case(key));
            if !visible {
                self.whole(key, value);
            }
            return;
        }
        match value {
            Value::Object(map) => self.attributes(map),
            Value::Array(items) => items.iter_mut().for_each(|v| self.keyed(key, v)),
            Value::String(s) => *s = self.text(s),
            _ => {}
        }
    }

    /// Every string inside a personal value.
    fn whole(&self, key: &str, value: &mut Value) {
        match value {
            Value::String(s) => *s = self.personal_string(key, s),
            Value::Number(n) => {
                *value = Value::String(self.personal_string(key, &n.to_string()));
            }
            Value::Object(map) => map.values_mut().for_each(|v| self.whole(key, v)),
            Value::Array(items) => items.iter_mut().for_each(|v| self.whole(key, v)),
            Value::Bool(_) | Value::Null => {}
        }
    }

    fn personal_string(&self, key: &str, s: &str) -> String {
        match self.disclosure {
            Disclosure::Clear => s.to_owned(),
            Disclosure::Pseudonymised => self.pseudonym(&format!("{key}:{s}")),
            Disclosure::Masked => {
                let k = key.to_ascii_lowercase();
                if k.contains("email") || s.contains('@') {
                    mask_email(s)
                } else if k.contains("phone") || k.contains("mobile") {
                    mask_phone(s)
                } else if self.keys.exact.contains(&k) {
                    mask_name(s)
                } else {
                    mask_token(s)
                }
            }
        }
    }

    /// Traits or properties.
    pub fn attributes(&self, map: &mut Attributes) {
        if self.is_clear() {
            return;
        }
        for (k, v) in map.iter_mut() {
            self.keyed(k, v);
        }
    }

    /// Free text (a ticket subject, a message, a summary): emails and phone
    /// numbers in it are masked (or pseudonymised).
    pub fn text(&self, s: &str) -> String {
        if self.is_clear() {
            return s.to_owned();
        }
        scrub_text(s, |kind, found| match self.disclosure {
            Disclosure::Pseudonymised => self.pseudonym(&format!("{kind}:{found}")),
            _ if kind == "email" => mask_email(found),
            _ => mask_phone(found),
        })
    }

    /// A whole touchpoint as replay or a dead letter shows it.
    pub fn touchpoint(&self, t: &mut Touchpoint) {
        if self.is_clear() {
            return;
        }
        t.personal
            .identifiers
            .iter_mut()
            .for_each(|i| self.identifier(i));
        self.attributes(&mut t.personal.traits);
        self.attributes(&mut t.envelope.properties);
        for d in &mut t.personal.dropped {
            d.value = self.identifier_value(d.kind.as_str(), &d.value);
        }
    }

    /// A timeline entry.
    pub fn timeline_entry(&self, e: &mut TimelineEntry) {
        if self.is_clear() {
            return;
        }
        e.summary = self.text(&e.summary);
        self.attributes(&mut e.properties);
    }

    /// A folded profile: its traits and every free text it keeps.
    pub fn profile(&self, p: &mut Profile) {
        if self.is_clear() {
            return;
        }
        for (k, v) in p.traits.iter_mut() {
            self.keyed(k, &mut v.value);
        }
        for t in p.tickets.values_mut() {
            for s in [&mut t.opened, &mut t.resolved, &mut t.last_message]
                .into_iter()
                .flatten()
            {
                s.value = self.text(&s.value);
            }
        }
        if let Some(m) = &mut p.last_message {
            m.value = self.text(&m.value);
        }
        if let Some(f) = &mut p.feedback {
            f.value.1 = self.text(&f.value.1);
        }
    }
}

/// What in an operator's free text that outlives a customer (an erasure's
/// reason and request id) is personal data: an email address, a phone
/// number (9 to 15 digits, separators allowed, starting with `+` or `0`, so
/// `GDPR-2026-000123` is a reference and `0912 345 678` a phone), or one of
/// `known` (the customer's identifier values, compared without case; values
/// under 4 characters are ignored).
pub fn personal_data_in(text: &str, known: &[String]) -> Option<&'static str> {
    let lower = text.to_lowercase();
    for word in lower.split(|c: char| c.is_whitespace() || "<>()[]{},;:\"'".contains(c)) {
        if let Some((local, domain)) = word.split_once('@')
            && !local.is_empty()
            && domain.trim_end_matches('.').contains('.')
        {
            return Some("an email address");
        }
    }
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        // `(028) 3823 4567`: an area code in parentheses.
        let at = |k: usize| chars.get(k).copied().unwrap_or(' ');
        let lead = usize::from(at(i) == '(');
        let starts =
            (at(i + lead) == '+' && at(i + lead + 1).is_ascii_digit()) || at(i + lead) == '0';
        let after_digit = i > 0 && chars[i - 1].is_alphanumeric();
        if starts && !after_digit {
            let (mut digits, mut j) = (0usize, i);
            while j < chars.len() {
                let c = chars[j];
                let leading = (c == '(' && j == i) || (c == '+' && j == i + lead);
                // A separator (or two, as in `) `) between digits.
                let separator = " .-()".contains(c)
                    && (1..=2).any(|k| {
                        at(j + k).is_ascii_digit() && (1..k).all(|m| " .-()".contains(at(j + m)))
                    });
                if c.is_ascii_digit() {
                    digits += 1;
                } else if !leading && !separator {
                    break;
                }
                j += 1;
            }
            let ends_word = chars.get(j).is_none_or(|c| !c.is_alphanumeric());
            if (9..=15).contains(&digits) && ends_word {
                return Some("a phone number");
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    known
        .iter()
        .map(|k| k.trim().to_lowercase())
        .any(|k| k.chars().count() >= 4 && lower.contains(&k))
        .then_some("one of the customer's identifiers")
}

/// `+84912345678` → `0912***678`; other numbers keep their first 4 and
/// last 3 characters.
pub fn mask_phone(value: &str) -> String {
    let national: String = match value.strip_prefix("+84") {
        Some(rest) => format!("0{rest}"),
        None => value.to_owned(),
    };
    let chars: Vec<char> = national.chars().filter(|c| !c.is_whitespace()).collect();
    // At least half of the digits stay hidden.
    let (head, tail) = match chars.len() {
        n if n >= 10 => (4, 3),
        8 | 9 => (2, 2),
        _ => (0, 2),
    };
    let tail = tail.min(chars.len() / 3);
    let start: String = chars[..head].iter().collect();
    let end: String = chars[chars.len() - tail..].iter().collect();
    format!("{start}***{end}")
}

/// `lan.nguyen@shop.vn` → `l***@shop.vn`.
pub fn mask_email(value: &str) -> String {
    match value.rsplit_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => mask_token(value),
    }
}

/// `Nguyễn Thị Lan` → `N*** T*** L***`.
pub fn mask_name(value: &str) -> String {
    value
        .split_whitespace()
        .map(|w| {
            let first: String = w.chars().take(1).collect();
            format!("{first}***")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// An opaque value: its first two and last two characters when long
/// enough, else stars.
pub fn mask_token(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    if chars.len() < 8 {
        return "***".to_owned();
    }
    let head: String = chars[..2].iter().collect();
    let tail: String = chars[chars.len() - 2..].iter().collect();
    format!("{head}***{tail}")
}

/// Replaces the phone-like runs (8 or more digits, with spaces, dots,
/// dashes, slashes or brackets between them, or 4 or more cut short by an
/// ellipsis: summaries are shortened when stored) and then the emails
/// (`x@y`, the domain possibly cut short) of free text. Phones go first so
/// that what replaced an email (a pseudonym's hex) is never read as digits.
pub fn scrub_text(s: &str, mut replace: impl FnMut(&str, &str) -> String) -> String {
    // Most text (a product name, a summary) holds neither: no work then.
    let digits_total = s.bytes().filter(u8::is_ascii_digit).count();
    if !s.contains('@') && digits_total < 8 && !(digits_total >= 4 && s.contains('…')) {
        return s.to_owned();
    }
    // Digit runs.
    let chars: Vec<char> = s.chars().collect();
    let mut phones = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        let starts = chars[i].is_ascii_digit()
            || (matches!(chars[i], '+' | '(')
                && chars.get(i + 1).is_some_and(char::is_ascii_digit));
        if !starts {
            phones.push(chars[i]);
            i += 1;
            continue;
        }
        let mut j = i + 1;
        let mut digits = usize::from(chars[i].is_ascii_digit());
        let mut last_digit = i;
        while j < chars.len() {
            let c = chars[j];
            if c.is_ascii_digit() {
                digits += 1;
                last_digit = j;
            } else if !matches!(c, ' ' | '.' | '-' | '/' | '(' | ')') {
                break;
            }
            j += 1;
        }
        let cut_short = chars.get(last_digit + 1) == Some(&'…');
        let run: String = chars[i..=last_digit].iter().collect();
        if digits >= 8 || (cut_short && digits >= 4) {
            let compact: String = run
                .chars()
                .filter(|c| c.is_ascii_digit() || *c == '+')
                .collect();
            phones.push_str(&replace("phone", &compact));
        } else {
            phones.push_str(&run);
        }
        i = last_digit + 1;
    }
    if !phones.contains('@') {
        return phones;
    }
    // Then emails, word by word (split on whitespace, keeping it).
    let mut out = String::with_capacity(phones.len());
    let mut rest = phones.as_str();
    while !rest.is_empty() {
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let (word, tail) = rest.split_at(end);
        let ws_end = tail
            .find(|c: char| !c.is_whitespace())
            .unwrap_or(tail.len());
        let (ws, next) = tail.split_at(ws_end);
        let trimmed = word.trim_matches(|c: char| !c.is_alphanumeric() && c != '*');
        match trimmed.split_once('@') {
            Some((local, domain)) if !local.is_empty() && !domain.is_empty() => {
                let masked = replace("email", trimmed);
                out.push_str(&word.replacen(trimmed, &masked, 1));
            }
            _ => out.push_str(word),
        }
        out.push_str(ws);
        rest = next;
    }
    out
}

/// Labels of where a customer was seen (from the sources of their events),
/// against the labels a credential is scoped to.
pub fn in_scope<'a>(
    scopes: &BTreeSet<String>,
    customer_labels: impl IntoIterator<Item = &'a str>,
) -> bool {
    scopes.is_empty() || customer_labels.into_iter().any(|l| scopes.contains(l))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn masker(d: Disclosure) -> Masker {
        Masker::new(d, PersonalKeys::default(), b"test-key")
    }

    #[test]
    fn phones_emails_and_names_are_masked_the_way_agents_read_them() {
        assert_eq!(mask_phone("+84912345678"), "0912***678");
        assert_eq!(mask_phone("+6591234567"), "+659***567");
        assert_eq!(mask_email("lan.nguyen@shop.vn"), "l***@shop.vn");
        assert_eq!(mask_name("Nguyễn Thị Lan"), "N*** T*** L***");
        assert_eq!(mask_token("LC-00123456"), "LC***56");
        assert_eq!(mask_token("short"), "***");
    }

    #[test]
    fn every_method_of_the_api_needs_a_permission_and_unknown_ones_are_denied() {
        for m in METHODS {
            assert!(permission_of(m).is_some(), "{m} has no permission");
        }
        assert_eq!(
            permission_of("/cdp.v1.ProfileService/DeleteEverything"),
            None
        );
        assert_eq!(permission_of("garbage"), None);
        assert!(is_public("/grpc.health.v1.Health/Check"));
        assert!(!is_public("/cdp.v1.ProfileService/GetProfile"));
    }

    #[test]
    fn roles_grant_what_the_matrix_says() {
        use Permission as P;
        assert!(Role::Agent.allows(P::ReadProfiles));
        assert!(!Role::Agent.allows(P::Reveal));
        assert!(!Role::Agent.allows(P::ReadAudit));
        assert!(Role::Supervisor.allows(P::Reveal));
        assert!(Role::Supervisor.allows(P::ReadAudit));
        assert!(!Role::Operator.allows(P::ReadProfiles));
        assert!(Role::Operator.allows(P::Operate));
        assert!(Role::Analyst.allows(P::Audiences));
        assert!(!Role::Agent.allows(P::Audiences));
        assert!(!Role::Analyst.allows(P::ReadProfiles));
        assert!(Role::Analyst.allows(P::Replay));
        assert!(!Role::Admin.allows(P::Ingest));
        assert!(Role::Admin.allows(P::ManageCredentials));
        assert!(Role::Ingest.allows(P::Ingest));
        assert!(Role::Ingest.allows(P::Reflect));
        assert!(!Role::Ingest.allows(P::ReadProfiles));
        assert_eq!("supervisor".parse::<Role>(), Ok(Role::Supervisor));
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn a_source_is_taken_from_the_credential_and_never_borrowed() {
        let pos = vec!["pos".to_owned()];
        assert_eq!(source_of("", &pos), Ok("pos".into()));
        assert_eq!(source_of("pos", &pos), Ok("pos".into()));
        assert!(source_of("crm", &pos).unwrap_err().contains("crm"));
        let relay = vec!["*".to_owned()];
        assert_eq!(source_of("crm", &relay), Ok("crm".into()));
        assert!(source_of("", &relay).is_err());
    }

    #[test]
    fn free_text_keeps_its_words_and_loses_its_contacts() {
        let m = masker(Disclosure::Masked);
        assert_eq!(
            m.text("call me on 0912 345 678 or mail lan@shop.vn, thanks"),
            "call me on 0912***678 or mail l***@shop.vn, thanks"
        );
        assert_eq!(m.text("order #1234 of 3 items"), "order #1234 of 3 items");
        assert_eq!(m.text("+84912345678"), "0912***678");
        assert_eq!(m.text("gọi (028) 3823 4567 nhé"), "gọi 0283***567 nhé");
        assert_eq!(m.text("0912/345/678"), "0912***678");
        // Cut short when the summary was stored: what is left is still hidden.
        assert_eq!(
            m.text("Message: \"gọi 0912 345…\""),
            "Message: \"gọi ***45…\""
        );
        assert_eq!(m.text("mail lan.nguyen@sh…"), "mail l***@sh…");
        let p = masker(Disclosure::Pseudonymised);
        let once = p.text("mail lan@shop.vn or 0912345678");
        assert!(
            !once.contains("lan@") && !once.contains("0912345678"),
            "{once}"
        );
        assert_eq!(
            once,
            p.text("mail lan@shop.vn or 0912345678"),
            "pseudonyms are stable"
        );
        assert_eq!(once.matches("ps_").count(), 2, "{once}");
    }

    #[test]
    fn short_numbers_keep_most_of_their_digits_hidden() {
        assert_eq!(mask_phone("12345678"), "12***78");
        assert_eq!(mask_phone("1234567"), "***67");
        assert_eq!(mask_phone("123"), "***3");
        assert_eq!(mask_phone(""), "***");
        assert_eq!(mask_email("@x"), "***@x");
    }

    #[test]
    fn personal_keys_are_masked_in_nested_properties_and_others_are_not() {
        let m = masker(Disclosure::Masked);
        let mut v = json!({
            "name": "Nguyễn Thị Lan",
            "email": "lan@shop.vn",
            "shipping_address": {"street": "12 Lê Lợi", "city": "Huế"},
            "product_name": "Áo dài",
            "note": "ring 0912345678",
            "birthday": "1990-02-03",
        });
        let Value::Object(map) = &mut v else {
            unreachable!()
        };
        m.attributes(map);
        assert_eq!(
            map["name"], "Nguyễn Thị Lan",
            "names stay visible to agents"
        );
        assert_eq!(map["email"], "l***@shop.vn");
        assert_eq!(map["shipping_address"]["street"], "12***ợi");
        assert_eq!(map["shipping_address"]["city"], "***");
        assert_eq!(map["product_name"], "Áo dài");
        assert_eq!(map["note"], "ring 0912***678");
        assert_eq!(map["birthday"], "19***03");
        let p = masker(Disclosure::Pseudonymised);
        let mut w = json!({"name": "Lan", "phone": "+84912345678"});
        let Value::Object(map) = &mut w else {
            unreachable!()
        };
        p.attributes(map);
        assert!(map["name"].as_str().is_some_and(|s| s.starts_with("ps_")));
        assert_ne!(map["phone"], "+84912345678");
    }

    #[test]
    fn pseudonyms_are_stable_per_key_and_differ_across_keys() {
        let a = masker(Disclosure::Pseudonymised);
        let b = Masker::new(Disclosure::Pseudonymised, PersonalKeys::default(), b"other");
        let x = a.identifier_value("phone", "+84912345678");
        assert_eq!(x, a.identifier_value("phone", "+84912345678"));
        assert_ne!(x, a.identifier_value("email", "+84912345678"));
        assert_ne!(x, b.identifier_value("phone", "+84912345678"));
        assert!(x.starts_with("ps_") && x.len() == 19);
    }

    #[test]
    fn scopes_restrict_to_customers_seen_under_a_label() {
        let none = BTreeSet::new();
        assert!(in_scope(&none, ["region:north"]));
        let south: BTreeSet<String> = ["region:south".to_owned()].into();
        assert!(in_scope(&south, ["brand:a", "region:south"]));
        assert!(!in_scope(&south, ["region:north"]));
        assert!(!in_scope(&south, []));
    }

    #[test]
    fn personal_data_in_free_text_is_found_and_references_are_not() {
        let none: [String; 0] = [];
        for (text, found) in [
            ("ticket GDPR-2026-000123, by email", None),
            ("case 4411 (hotline), 2026-12-01", None),
            ("asked by lan.nguyen@shop.vn", Some("an email address")),
            ("<Lan@Shop.VN>", Some("an email address")),
            ("called from 0912 345 678", Some("a phone number")),
            ("called from +84 912-345-678.", Some("a phone number")),
            ("call (028) 3823 4567", Some("a phone number")),
            ("order 0912345678901234567", None),
            ("ref A0912345678", None),
            ("", None),
        ] {
            assert_eq!(personal_data_in(text, &none), found, "{text:?}");
        }
        let known = ["zalo-7788".to_string(), "abc".to_string()];
        assert_eq!(
            personal_data_in("per Zalo-7788 chat", &known),
            Some("one of the customer's identifiers")
        );
        assert_eq!(
            personal_data_in("abc def", &known),
            None,
            "too short to tell"
        );
    }
}
