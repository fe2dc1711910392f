//! Who is looking: every read of the query side (gRPC and console alike)
//! goes through a [`Viewer`], which refuses customers outside the caller's
//! scope with `NOT_FOUND` (the same answer as a customer who does not
//! exist), masks personal values by the caller's disclosure, and writes the
//! audit record before anything is returned.

use std::sync::Arc;

use cdp_domain::Profile;
use cdp_domain::access::Masker;
use cdp_proto::v1;
use cdp_runtime::ServiceError;
use cdp_runtime::auth::{Access, Caller};

use crate::{Loaded, Lookup};

/// The caller of one read, with what they may see.
#[derive(Clone)]
pub struct Viewer {
    pub caller: Caller,
    pub masker: Masker,
    access: Arc<Access>,
}

/// What an out-of-scope customer looks like: exactly like no customer.
fn not_found() -> ServiceError {
    ServiceError::NotFound("no such customer".into())
}

impl Viewer {
    pub fn new(access: &Arc<Access>, caller: Caller) -> Self {
        Viewer {
            masker: access.masker(&caller.principal),
            caller,
            access: Arc::clone(access),
        }
    }

    pub fn access(&self) -> &Arc<Access> {
        &self.access
    }

    /// Refuses a customer outside the caller's scope.
    pub fn admit(&self, profile: &Profile) -> Result<(), ServiceError> {
        if self.access.in_scope(&self.caller.principal, profile) {
            Ok(())
        } else {
            Err(not_found())
        }
    }

    /// A scoped caller learns nothing from how a lookup failed: every
    /// "not found" reads the same, whether the customer does not exist or
    /// is outside the scope.
    pub fn hide(&self, e: ServiceError) -> ServiceError {
        match e {
            ServiceError::NotFound(_) if self.scoped() => not_found(),
            other => other,
        }
    }

    /// Whether the caller is restricted to some customers.
    pub fn scoped(&self) -> bool {
        !self.caller.principal.scopes.is_empty()
    }

    /// Masks everything a loaded view holds.
    pub fn mask(&self, loaded: &mut Loaded) {
        if self.masker.is_clear() {
            return;
        }
        self.masker.profile(&mut loaded.profile);
        loaded
            .identifiers
            .iter_mut()
            .for_each(|i| self.masker.identifier(i));
        loaded
            .timeline
            .iter_mut()
            .for_each(|e| self.masker.timeline_entry(e));
    }

    pub fn identifier(&self, id: &mut v1::Identifier) {
        id.value = self.masker.identifier_value(&id.kind, &id.value);
    }

    fn identifiers(&self, ids: &mut [v1::Identifier]) {
        ids.iter_mut().for_each(|i| self.identifier(i));
    }

    pub fn merge_step(&self, m: &mut v1::MergeStep) {
        if let Some(id) = &mut m.cause_identifier {
            self.identifier(id);
        }
    }

    pub fn explanation(&self, e: &mut v1::IdentifierExplanation) {
        if let Some(id) = &mut e.identifier {
            self.identifier(id);
        }
        e.reason = self.masker.text(&e.reason);
        e.merges.iter_mut().for_each(|m| self.merge_step(m));
    }

    pub fn decision(&self, d: &mut v1::DecisionExplanation) {
        self.identifiers(&mut d.linked);
        self.identifiers(&mut d.quarantined);
        d.merges.iter_mut().for_each(|m| self.merge_step(m));
        for i in &mut d.ignored {
            if let Some(id) = &mut i.identifier {
                self.identifier(id);
            }
            i.reason = self.masker.text(&i.reason);
        }
        for r in &mut d.recycled {
            if let Some(id) = &mut r.identifier {
                self.identifier(id);
            }
        }
    }

    pub fn quarantined(&self, q: &mut v1::QuarantinedIdentifier) {
        if let Some(id) = &mut q.identifier {
            self.identifier(id);
        }
        q.merges.iter_mut().for_each(|m| self.merge_step(m));
    }

    pub fn candidate(&self, c: &mut v1::CustomerCandidate) {
        if self.masker.is_clear() {
            return;
        }
        let mut name = serde_json::Value::String(std::mem::take(&mut c.name));
        self.masker.keyed("name", &mut name);
        c.name = name.as_str().unwrap_or_default().to_owned();
        for e in &mut c.emails {
            *e = self.masker.identifier_value("email", e);
        }
        for p in &mut c.phones {
            *p = self.masker.identifier_value("phone", p);
        }
    }

    /// How a lookup is written in the audit: never in clear.
    pub fn describe(&self, lookup: Option<&Lookup>) -> String {
        let masked = self.masker.with(cdp_domain::access::Disclosure::Masked);
        match lookup {
            Some(Lookup::CustomerId(c)) => format!("customer_id:{c}"),
            Some(Lookup::Identifier(id)) => format!(
                "{}:{}",
                id.kind,
                masked.identifier_value(&id.kind, id.value.trim())
            ),
            None => String::new(),
        }
    }

    /// Writes the audit record of a read; no record, no data.
    pub async fn read(
        &self,
        customer_id: &str,
        fields: &[&str],
        lookup: &str,
    ) -> Result<(), ServiceError> {
        self.access
            .read(&self.caller, customer_id, fields, lookup)
            .await
    }
}
