//! The touchpoint event model.
//!
//! A [`Touchpoint`] is split in two halves on purpose: the [`Envelope`] (what
//! happened, where, when) and the [`Personal`] part (who: identifiers and
//! traits). Only the personal half holds PII, so it can be encrypted per
//! customer without touching the envelope.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Milliseconds since the Unix epoch (UTC).
pub type UnixMillis = i64;

/// JSON-like structured values (`traits`, `properties`).
pub type Attributes = Map<String, Value>;

/// The idempotency key of a touchpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(pub Uuid);

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The id of one unified customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CustomerId(pub Uuid);

impl CustomerId {
    /// Namespace for customer ids derived from the event that created them, so
    /// a rebuild from the log yields the same ids.
    const NAMESPACE: Uuid = Uuid::from_u128(0x6b1f_0c7e_2d4a_4c51_9a3e_5f0d_8c2b_7e11);

    /// The customer id created by the event `event_id`, received at
    /// `received_at`: a UUIDv7 whose time is when the event was received and
    /// whose other 74 bits come from the event id (a v5 hash), so the same
    /// event always creates the same customer. Ordered by creation time,
    /// customers created together sit together in the stores' key order:
    /// the customers active now are mostly the ones created lately, and
    /// their rows share pages instead of dirtying one page each.
    pub fn derived_from(event_id: EventId, received_at: UnixMillis) -> Self {
        let hash = Uuid::new_v5(&Self::NAMESPACE, event_id.0.as_bytes());
        let mut tail = [0u8; 10];
        tail.copy_from_slice(&hash.as_bytes()[..10]);
        let millis = u64::try_from(received_at).unwrap_or(0).min((1 << 48) - 1);
        CustomerId(uuid::Builder::from_unix_timestamp_millis(millis, &tail).into_uuid())
    }
}

impl fmt::Display for CustomerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for CustomerId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s.trim()).map(CustomerId)
    }
}

/// Where a touchpoint happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Web,
    App,
    Store,
    CallCenter,
    Chat,
    Social,
    Marketplace,
    Email,
    Sms,
    Other,
}

impl Channel {
    pub const ALL: [Channel; 10] = [
        Channel::Web,
        Channel::App,
        Channel::Store,
        Channel::CallCenter,
        Channel::Chat,
        Channel::Social,
        Channel::Marketplace,
        Channel::Email,
        Channel::Sms,
        Channel::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Web => "web",
            Channel::App => "app",
            Channel::Store => "store",
            Channel::CallCenter => "call_center",
            Channel::Chat => "chat",
            Channel::Social => "social",
            Channel::Marketplace => "marketplace",
            Channel::Email => "email",
            Channel::Sms => "sms",
            Channel::Other => "other",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Channel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase();
        Channel::ALL
            .into_iter()
            .find(|c| c.as_str() == wanted)
            .ok_or_else(|| {
                format!(
                    "unknown channel {s:?}; expected one of {}",
                    Channel::ALL.map(Channel::as_str).join(", ")
                )
            })
    }
}

/// The kind of an identifier. Known kinds have their own normalisation;
/// custom kinds must be declared in the identity rules.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum IdKind {
    Email,
    Phone,
    UserId,
    AnonymousId,
    DeviceId,
    LoyaltyId,
    ZaloId,
    FacebookPsid,
    ShopeeBuyerId,
    LazadaBuyerId,
    TikiBuyerId,
    Custom(String),
}

impl IdKind {
    pub const BUILT_IN: [IdKind; 11] = [
        IdKind::Email,
        IdKind::Phone,
        IdKind::UserId,
        IdKind::AnonymousId,
        IdKind::DeviceId,
        IdKind::LoyaltyId,
        IdKind::ZaloId,
        IdKind::FacebookPsid,
        IdKind::ShopeeBuyerId,
        IdKind::LazadaBuyerId,
        IdKind::TikiBuyerId,
    ];

    pub fn as_str(&self) -> &str {
        match self {
            IdKind::Email => "email",
            IdKind::Phone => "phone",
            IdKind::UserId => "user_id",
            IdKind::AnonymousId => "anonymous_id",
            IdKind::DeviceId => "device_id",
            IdKind::LoyaltyId => "loyalty_id",
            IdKind::ZaloId => "zalo_id",
            IdKind::FacebookPsid => "facebook_psid",
            IdKind::ShopeeBuyerId => "shopee_buyer_id",
            IdKind::LazadaBuyerId => "lazada_buyer_id",
            IdKind::TikiBuyerId => "tiki_buyer_id",
            IdKind::Custom(name) => name,
        }
    }

    /// Parses a kind name. Unknown names become [`IdKind::Custom`]; whether a
    /// custom kind is allowed is decided by the identity rules.
    pub fn parse(name: &str) -> Result<IdKind, String> {
        let name = name.trim();
        if let Some(k) = IdKind::BUILT_IN.iter().find(|k| k.as_str() == name) {
            return Ok(k.clone());
        }
        let valid = !name.is_empty()
            && name.len() <= 64
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if valid {
            Ok(IdKind::Custom(name.to_owned()))
        } else {
            Err(format!(
                "invalid identifier kind {name:?}: use a built-in kind or a declared custom kind of lowercase letters, digits and '_'"
            ))
        }
    }
}

impl fmt::Display for IdKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<IdKind> for String {
    fn from(k: IdKind) -> String {
        k.as_str().to_owned()
    }
}

impl TryFrom<String> for IdKind {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        IdKind::parse(&s)
    }
}

/// A normalised identifier: `value` is in canonical form for its kind
/// (lower-case email, E.164 phone, ...).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Identifier {
    pub kind: IdKind,
    pub value: String,
}

impl Identifier {
    pub fn new(kind: IdKind, value: impl Into<String>) -> Self {
        Identifier {
            kind,
            value: value.into(),
        }
    }

    /// A stable byte key, `kind \0 value`, used by stores and log partitioning.
    pub fn key(&self) -> String {
        format!("{}\u{0}{}", self.kind.as_str(), self.value)
    }
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// Event types with a meaning the profile fold knows (Segment spec names and
/// our own omnichannel ones); anything else is kept as a custom type.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum EventType {
    Identify,
    PageViewed,
    ProductViewed,
    ProductAdded,
    ProductRemoved,
    CheckoutStarted,
    OrderCompleted,
    OrderRefunded,
    TicketOpened,
    TicketResolved,
    CallCompleted,
    MessageReceived,
    PointsEarned,
    PointsRedeemed,
    FeedbackSubmitted,
    ConsentUpdated,
    Custom(String),
}

impl EventType {
    pub const KNOWN: [EventType; 16] = [
        EventType::Identify,
        EventType::PageViewed,
        EventType::ProductViewed,
        EventType::ProductAdded,
        EventType::ProductRemoved,
        EventType::CheckoutStarted,
        EventType::OrderCompleted,
        EventType::OrderRefunded,
        EventType::TicketOpened,
        EventType::TicketResolved,
        EventType::CallCompleted,
        EventType::MessageReceived,
        EventType::PointsEarned,
        EventType::PointsRedeemed,
        EventType::FeedbackSubmitted,
        EventType::ConsentUpdated,
    ];

    pub fn as_str(&self) -> &str {
        match self {
            EventType::Identify => "Identify",
            EventType::PageViewed => "Page Viewed",
            EventType::ProductViewed => "Product Viewed",
            EventType::ProductAdded => "Product Added",
            EventType::ProductRemoved => "Product Removed",
            EventType::CheckoutStarted => "Checkout Started",
            EventType::OrderCompleted => "Order Completed",
            EventType::OrderRefunded => "Order Refunded",
            EventType::TicketOpened => "Ticket Opened",
            EventType::TicketResolved => "Ticket Resolved",
            EventType::CallCompleted => "Call Completed",
            EventType::MessageReceived => "Message Received",
            EventType::PointsEarned => "Points Earned",
            EventType::PointsRedeemed => "Points Redeemed",
            EventType::FeedbackSubmitted => "Feedback Submitted",
            EventType::ConsentUpdated => "Consent Updated",
            EventType::Custom(name) => name,
        }
    }
}

impl From<String> for EventType {
    fn from(s: String) -> Self {
        EventType::KNOWN
            .iter()
            .find(|t| t.as_str() == s)
            .cloned()
            .unwrap_or(EventType::Custom(s))
    }
}

impl From<&str> for EventType {
    fn from(s: &str) -> Self {
        EventType::from(s.to_owned())
    }
}

impl From<EventType> for String {
    fn from(t: EventType) -> String {
        t.as_str().to_owned()
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The non-personal half of a touchpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub event_id: EventId,
    pub event_type: EventType,
    pub channel: Channel,
    pub source_id: String,
    pub occurred_at: UnixMillis,
    pub received_at: UnixMillis,
    pub properties: Attributes,
}

/// The personal half of a touchpoint: who it is about.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Personal {
    /// Normalised, de-duplicated, sorted identifiers.
    pub identifiers: Vec<Identifier>,
    pub traits: Attributes,
    /// Identifiers sent with values that are not valid for their kind (a
    /// phone number mistyped at the till): kept out of identity, kept on
    /// the event with the reason, so the event itself is not lost.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<DroppedIdentifier>,
}

/// An identifier value dropped at validation, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroppedIdentifier {
    pub kind: IdKind,
    /// As sent (trimmed, at most 256 characters).
    pub value: String,
    pub reason: String,
}

/// A validated, normalised touchpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Touchpoint {
    pub envelope: Envelope,
    pub personal: Personal,
}

impl Touchpoint {
    pub fn event_id(&self) -> EventId {
        self.envelope.event_id
    }

    /// The identifier used to route the event to a log partition: the one with
    /// the highest priority, so events of one person tend to share a partition.
    pub fn routing_identifier<'a>(
        &'a self,
        rules: &crate::rules::IdentityRules,
    ) -> Option<&'a Identifier> {
        rules
            .strongest_first(&self.personal.identifiers)
            .into_iter()
            .next()
    }
}

/// A touchpoint as an adapter sends it, before validation: every field is
/// optional or a plain string so that validation can name what is wrong.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RawTouchpoint {
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub channel: Option<String>,
    pub source_id: Option<String>,
    pub occurred_at: Option<UnixMillis>,
    pub identifiers: Vec<RawIdentifier>,
    pub traits: Attributes,
    pub properties: Attributes,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RawIdentifier {
    pub kind: String,
    pub value: String,
}

impl RawIdentifier {
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        RawIdentifier {
            kind: kind.into(),
            value: value.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_customer_ids_are_stable_and_ordered_by_when_the_event_arrived() {
        let first = EventId(Uuid::from_u128(0xfeed));
        let second = EventId(Uuid::from_u128(0x0001));
        let a = CustomerId::derived_from(first, 1_700_000_000_000);
        assert_eq!(a, CustomerId::derived_from(first, 1_700_000_000_000));
        assert_ne!(a, CustomerId::derived_from(second, 1_700_000_000_000));
        // Later arrivals sort after earlier ones, whatever their event ids.
        let b = CustomerId::derived_from(second, 1_700_000_000_001);
        assert!(a.0.as_u128() < b.0.as_u128());
        assert_eq!(b.0.get_version_num(), 7);
        // Out-of-range times are clamped, not wrapped.
        assert_eq!(
            CustomerId::derived_from(first, -5).0.get_timestamp(),
            CustomerId::derived_from(first, 0).0.get_timestamp()
        );
    }
}
