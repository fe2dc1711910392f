//! Timeline entries: one line per touchpoint, readable by an agent.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::event::{Attributes, Channel, CustomerId, EventId, EventType, Touchpoint, UnixMillis};
use crate::props;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineEntry {
    pub customer_id: CustomerId,
    pub event_id: EventId,
    pub occurred_at: UnixMillis,
    pub event_type: EventType,
    pub channel: Channel,
    pub source_id: String,
    pub summary: String,
    pub properties: Attributes,
}

impl TimelineEntry {
    pub fn of(customer_id: CustomerId, t: &Touchpoint, default_currency: &str) -> Self {
        TimelineEntry {
            customer_id,
            event_id: t.envelope.event_id,
            occurred_at: t.envelope.occurred_at,
            event_type: t.envelope.event_type.clone(),
            channel: t.envelope.channel,
            source_id: t.envelope.source_id.clone(),
            summary: summary(t, default_currency),
            properties: t.envelope.properties.clone(),
        }
    }

    /// The touchpoint as the timeline keeps it: its envelope (received at
    /// the instant it occurred), without personal data. What a backfill of
    /// computed traits folds.
    pub fn touchpoint(&self) -> crate::Touchpoint {
        crate::Touchpoint {
            envelope: crate::Envelope {
                event_id: self.event_id,
                event_type: self.event_type.clone(),
                channel: self.channel,
                source_id: self.source_id.clone(),
                occurred_at: self.occurred_at,
                received_at: self.occurred_at,
                properties: self.properties.clone(),
            },
            personal: crate::Personal::default(),
        }
    }
}

/// Groups the integer digits in thousands: `1250000.5` -> `1,250,000.5`.
pub fn format_amount(amount: Decimal) -> String {
    let text = amount.normalize().to_string();
    let (sign, unsigned) = match text.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", text.as_str()),
    };
    let (int, frac) = match unsigned.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (unsigned, None),
    };
    let mut grouped = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}

fn place(t: &Touchpoint) -> String {
    let p = &t.envelope.properties;
    match t.envelope.channel {
        Channel::Store => {
            let store = props::text(p, "store_name")
                .or_else(|| props::text(p, "store"))
                .unwrap_or_else(|| t.envelope.source_id.clone());
            format!("at store {store}")
        }
        Channel::Marketplace => format!("on {}", t.envelope.source_id),
        other => format!("on {}", other.as_str().replace('_', " ")),
    }
}

fn plural(n: i64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let cut: String = s.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// A one-line human summary, for example "Ordered 2 items, 1,250,000 VND, at store Q1".
pub fn summary(t: &Touchpoint, default_currency: &str) -> String {
    let p = &t.envelope.properties;
    let currency = || {
        props::currency(p, "currency")
            .ok()
            .flatten()
            .unwrap_or_else(|| default_currency.to_owned())
    };
    let amount = || {
        props::order_amount(p)
            .ok()
            .flatten()
            .map(|(_, a)| format!("{} {}", format_amount(a), currency()))
    };
    let product = || {
        props::product(p)
            .ok()
            .flatten()
            .map(|l| l.name.unwrap_or(l.product_id))
            .unwrap_or_else(|| "a product".into())
    };
    match &t.envelope.event_type {
        EventType::OrderCompleted => {
            let items = props::item_count(p);
            let mut parts = vec![if items > 0 {
                format!("Ordered {}", plural(items, "item", "items"))
            } else {
                "Ordered".to_owned()
            }];
            parts.extend(amount());
            format!("{}, {}", parts.join(", "), place(t))
        }
        EventType::OrderRefunded => match amount() {
            Some(a) => format!("Refunded {a} {}", place(t)),
            None => format!("Refund {}", place(t)),
        },
        EventType::ProductViewed => format!("Viewed {} {}", product(), place(t)),
        EventType::ProductAdded => {
            let qty = props::product(p).ok().flatten().map_or(1, |l| l.quantity);
            format!("Added {qty} × {} to the cart {}", product(), place(t))
        }
        EventType::ProductRemoved => format!("Removed {} from the cart {}", product(), place(t)),
        EventType::CheckoutStarted => match amount() {
            Some(a) => format!("Started checkout, {a}, {}", place(t)),
            None => format!("Started checkout {}", place(t)),
        },
        EventType::TicketOpened => {
            let id = props::id(p, "ticket_id").ok().flatten().unwrap_or_default();
            match props::text(p, "subject") {
                Some(s) => format!("Opened ticket {id}: {} {}", shorten(&s, 60), place(t)),
                None => format!("Opened ticket {id} {}", place(t)),
            }
        }
        EventType::TicketResolved => {
            let id = props::id(p, "ticket_id").ok().flatten().unwrap_or_default();
            format!("Ticket {id} resolved {}", place(t))
        }
        EventType::CallCompleted => match props::integer(p, "duration", 0, i64::MAX).ok().flatten()
        {
            Some(secs) => format!("Call of {}m{:02}s {}", secs / 60, secs % 60, place(t)),
            None => format!("Call {}", place(t)),
        },
        EventType::MessageReceived => {
            match props::text(p, "text").or_else(|| props::text(p, "message")) {
                Some(m) => format!("Message {}: \"{}\"", place(t), shorten(&m, 60)),
                None => format!("Message {}", place(t)),
            }
        }
        EventType::PointsEarned | EventType::PointsRedeemed => {
            let pts = props::integer(p, "points", 0, i64::MAX)
                .ok()
                .flatten()
                .unwrap_or(0);
            let verb = if t.envelope.event_type == EventType::PointsEarned {
                "Earned"
            } else {
                "Redeemed"
            };
            format!("{verb} {} {}", plural(pts, "point", "points"), place(t))
        }
        EventType::FeedbackSubmitted => {
            let r = props::integer(p, "rating", 1, 5)
                .ok()
                .flatten()
                .unwrap_or(0);
            match props::text(p, "comment") {
                Some(c) => format!("Rated {r}/5 {}: \"{}\"", place(t), shorten(&c, 60)),
                None => format!("Rated {r}/5 {}", place(t)),
            }
        }
        EventType::ConsentUpdated => {
            let purpose = props::text(p, "purpose").unwrap_or_default();
            let granted = props::boolean(p, "granted").ok().flatten().unwrap_or(false);
            format!(
                "{} {purpose} {}",
                if granted { "Granted" } else { "Withdrew" },
                place(t)
            )
        }
        EventType::Identify => format!("Updated their details {}", place(t)),
        EventType::PageViewed => match props::text(p, "title").or_else(|| props::text(p, "path")) {
            Some(page) => format!("Viewed page {} {}", shorten(&page, 60), place(t)),
            None => format!("Viewed a page {}", place(t)),
        },
        EventType::Custom(name) => format!("{name} {}", place(t)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Envelope, Personal};
    use serde_json::json;
    use uuid::Uuid;

    #[test]
    fn amounts_are_grouped_in_thousands() {
        assert_eq!(format_amount(Decimal::from(1_250_000)), "1,250,000");
        assert_eq!(format_amount(Decimal::new(123_456_789, 2)), "1,234,567.89");
        assert_eq!(format_amount(Decimal::from(999)), "999");
    }

    #[test]
    fn an_order_reads_like_a_sentence() {
        let props = json!({"order_id": "O1", "total": 1_250_000, "currency": "VND", "store_name": "Q1",
            "products": [{"product_id": "a", "quantity": 1}, {"product_id": "b", "quantity": 1}]});
        let t = Touchpoint {
            envelope: Envelope {
                event_id: EventId(Uuid::from_u128(1)),
                event_type: EventType::OrderCompleted,
                channel: Channel::Store,
                source_id: "pos-q1".into(),
                occurred_at: 0,
                received_at: 0,
                properties: props.as_object().cloned().unwrap_or_default(),
            },
            personal: Personal::default(),
        };
        assert_eq!(
            summary(&t, "VND"),
            "Ordered 2 items, 1,250,000 VND, at store Q1"
        );
    }
}
