//! The reference model: identity resolution and the profile fold applied
//! sequentially, in memory. The pipeline (any partitions, workers,
//! restarts) must end with the same customers as this model.

use std::collections::{BTreeMap, BTreeSet};

use crate::event::{CustomerId, Identifier, Touchpoint};
use crate::identity::{self, GraphRead, MemoryGraph, Resolution, ResolvedTouchpoint};
use crate::profile::{FoldOptions, Profile, ProfileSlot, ProfileView, fold_resolved};
use crate::redirect::RedirectError;
use crate::rules::IdentityRules;

/// One customer as the model sees it: the linked identifiers and the view.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomerSnapshot {
    pub identifiers: BTreeSet<Identifier>,
    pub view: ProfileView,
}

pub struct ReferenceModel {
    rules: IdentityRules,
    options: FoldOptions,
    graph: MemoryGraph,
    profiles: BTreeMap<CustomerId, ProfileSlot>,
    unresolvable: usize,
}

impl ReferenceModel {
    pub fn new(rules: IdentityRules, options: FoldOptions) -> Self {
        ReferenceModel {
            rules,
            options,
            graph: MemoryGraph::new(),
            profiles: BTreeMap::new(),
            unresolvable: 0,
        }
    }

    /// Resolves and folds one event. Fails only on a broken redirect
    /// chain, which the model itself never writes.
    pub fn apply(&mut self, t: &Touchpoint) -> Result<Resolution, RedirectError> {
        let resolution = identity::resolve(&mut self.graph, &self.rules, t)?;
        match &resolution {
            Resolution::Resolved(d) => {
                let resolved = ResolvedTouchpoint {
                    customer_id: d.customer_id,
                    merges: d.merges.clone(),
                    touchpoint: t.clone(),
                };
                fold_resolved(&mut self.profiles, &resolved, &self.options)?;
            }
            Resolution::Unresolvable { .. } => self.unresolvable += 1,
        }
        Ok(resolution)
    }

    pub fn graph(&self) -> &MemoryGraph {
        &self.graph
    }

    pub fn unresolvable(&self) -> usize {
        self.unresolvable
    }

    /// The profile of the customer who owns `id`.
    pub fn profile_of(&self, id: &Identifier) -> Option<&Profile> {
        let owner = self.graph.owner(id).ok()??;
        match self.profiles.get(&owner) {
            Some(ProfileSlot::Live(p)) => Some(p.as_ref()),
            _ => None,
        }
    }

    /// Every live customer, ordered by their identifiers.
    pub fn customers(&self) -> Vec<CustomerSnapshot> {
        let mut out: Vec<CustomerSnapshot> = self
            .graph
            .roots()
            .filter_map(|node| match self.profiles.get(&node.id) {
                Some(ProfileSlot::Live(p)) => Some(CustomerSnapshot {
                    identifiers: node.identifiers.clone(),
                    view: p.view(),
                }),
                _ => None,
            })
            .collect();
        out.sort_by(|a, b| a.identifiers.cmp(&b.identifiers));
        out
    }
}
