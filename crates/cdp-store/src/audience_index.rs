//! What the stores index about a profile row's audience, beside the row:
//! the instant its state is due (`Audience::due`, for the timers) and the
//! segments it is a member of (for `ProfileStore::members`). Both stores
//! compare a row's index before and after a write and move the entries
//! that changed ([`IndexMoves`]).

use std::collections::BTreeMap;

use cdp_domain::UnixMillis;
use cdp_domain::profile::ProfileSlot;

/// The index entries of one row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AudienceIndex {
    pub due: Option<UnixMillis>,
    /// Segment name to when the membership began.
    pub members: BTreeMap<String, UnixMillis>,
}

impl AudienceIndex {
    /// A live profile's entries (none for a redirect or no row).
    pub fn of(slot: Option<&ProfileSlot>) -> Self {
        match slot {
            Some(ProfileSlot::Live(p)) => AudienceIndex {
                due: p.audience.due,
                members: p
                    .audience
                    .members
                    .iter()
                    .map(|(name, m)| (name.clone(), m.since))
                    .collect(),
            },
            _ => AudienceIndex::default(),
        }
    }
}

/// The entries a write adds and removes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexMoves {
    pub due_removed: Option<UnixMillis>,
    pub due_added: Option<UnixMillis>,
    /// Memberships ended (segment names).
    pub members_removed: Vec<String>,
    /// Memberships begun, or begun again at another instant.
    pub members_added: Vec<(String, UnixMillis)>,
}

impl IndexMoves {
    pub fn between(before: &AudienceIndex, after: &AudienceIndex) -> Self {
        let (due_removed, due_added) = if before.due == after.due {
            (None, None)
        } else {
            (before.due, after.due)
        };
        IndexMoves {
            due_removed,
            due_added,
            members_removed: before
                .members
                .keys()
                .filter(|name| !after.members.contains_key(*name))
                .cloned()
                .collect(),
            members_added: after
                .members
                .iter()
                .filter(|(name, since)| before.members.get(*name) != Some(since))
                .map(|(name, since)| (name.clone(), *since))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.due_removed.is_none()
            && self.due_added.is_none()
            && self.members_removed.is_empty()
            && self.members_added.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_name_what_changed_only() {
        let before = AudienceIndex {
            due: Some(10),
            members: BTreeMap::from([("a".into(), 1), ("b".into(), 2)]),
        };
        let after = AudienceIndex {
            due: Some(20),
            members: BTreeMap::from([("b".into(), 2), ("c".into(), 3)]),
        };
        let moves = IndexMoves::between(&before, &after);
        assert_eq!(moves.due_removed, Some(10));
        assert_eq!(moves.due_added, Some(20));
        assert_eq!(moves.members_removed, ["a"]);
        assert_eq!(moves.members_added, [("c".to_owned(), 3)]);
        assert!(IndexMoves::between(&after, &after).is_empty());
    }
}
