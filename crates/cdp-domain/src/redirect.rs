//! Merge redirects. A customer merged into another leaves a redirect to the
//! survivor, in the identity graph and in the profiles, so a lookup by an
//! old id lands on the customer that stands for it now. Every walk along
//! redirects (identity, profiles, explanations; embedded or ScyllaDB) goes
//! through [`Walk`], so all of them stop at the same length and fail loudly
//! on a chain that is too long or loops, instead of answering a customer in
//! the middle of the chain.

use thiserror::Error;

use crate::event::CustomerId;

/// The longest chain of redirects followed. Chains stay short in practice
/// (a merge rewrites the loser's claims to the survivor); a longer one is
/// corrupt data.
pub const MAX_REDIRECTS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RedirectError {
    #[error("the merge redirects from customer {from} go on for more than {MAX_REDIRECTS} hops")]
    TooLong { from: CustomerId },
    #[error("the merge redirects from customer {from} loop back to customer {at}")]
    Loop { from: CustomerId, at: CustomerId },
}

/// A walk along redirects, one hop at a time. It works the same for
/// synchronous and asynchronous reads:
///
/// ```
/// # use cdp_domain::redirect::{Walk, RedirectError};
/// # use cdp_domain::CustomerId;
/// # fn read(_: CustomerId) -> Option<CustomerId> { None }
/// # fn f(c: CustomerId) -> Result<CustomerId, RedirectError> {
/// let mut walk = Walk::new(c);
/// while let Some(next) = read(walk.at()) {
///     walk.hop(next)?;
/// }
/// Ok(walk.at())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Walk {
    /// Every customer visited, the start first.
    path: Vec<CustomerId>,
}

impl Walk {
    pub fn new(from: CustomerId) -> Self {
        Walk { path: vec![from] }
    }

    /// Where the walk is now.
    pub fn at(&self) -> CustomerId {
        self.path[self.path.len() - 1]
    }

    /// Where the walk started.
    pub fn from(&self) -> CustomerId {
        self.path[0]
    }

    /// Every customer visited, the start first and [`at`](Self::at) last.
    pub fn path(&self) -> &[CustomerId] {
        &self.path
    }

    /// Follows one redirect to `next`.
    pub fn hop(&mut self, next: CustomerId) -> Result<(), RedirectError> {
        if self.path.contains(&next) {
            return Err(RedirectError::Loop {
                from: self.from(),
                at: next,
            });
        }
        if self.path.len() > MAX_REDIRECTS {
            return Err(RedirectError::TooLong { from: self.from() });
        }
        self.path.push(next);
        Ok(())
    }
}

/// Follows redirects from `from` with a synchronous read of where each
/// customer redirects to (`None`: it does not).
pub fn follow<E: From<RedirectError>>(
    from: CustomerId,
    mut redirect_of: impl FnMut(CustomerId) -> Result<Option<CustomerId>, E>,
) -> Result<CustomerId, E> {
    let mut walk = Walk::new(from);
    while let Some(next) = redirect_of(walk.at())? {
        walk.hop(next)?;
    }
    Ok(walk.at())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use uuid::Uuid;

    use super::*;

    fn c(n: u128) -> CustomerId {
        CustomerId(Uuid::from_u128(n))
    }

    #[test]
    fn a_chain_ends_at_the_customer_without_a_redirect() {
        let redirects = HashMap::from([(c(1), c(2)), (c(2), c(3))]);
        let root = follow(c(1), |x| Ok::<_, RedirectError>(redirects.get(&x).copied()));
        assert_eq!(root, Ok(c(3)));
        assert_eq!(
            follow(c(3), |x| Ok::<_, RedirectError>(redirects.get(&x).copied())),
            Ok(c(3))
        );
    }

    #[test]
    fn a_loop_fails_loudly() {
        let redirects = HashMap::from([(c(1), c(2)), (c(2), c(1))]);
        let err = follow(c(1), |x| Ok::<_, RedirectError>(redirects.get(&x).copied()));
        assert_eq!(
            err,
            Err(RedirectError::Loop {
                from: c(1),
                at: c(1)
            })
        );
        let itself = HashMap::from([(c(5), c(5))]);
        assert!(follow(c(5), |x| Ok::<_, RedirectError>(itself.get(&x).copied())).is_err());
    }

    #[test]
    fn a_chain_too_long_fails_instead_of_answering_a_customer_in_the_middle() {
        let n = MAX_REDIRECTS as u128;
        let ok: HashMap<CustomerId, CustomerId> = (0..n).map(|i| (c(i), c(i + 1))).collect();
        assert_eq!(
            follow(c(0), |x| Ok::<_, RedirectError>(ok.get(&x).copied())),
            Ok(c(n))
        );
        let long: HashMap<CustomerId, CustomerId> = (0..=n).map(|i| (c(i), c(i + 1))).collect();
        let err = follow(c(0), |x| Ok::<_, RedirectError>(long.get(&x).copied()));
        assert_eq!(err, Err(RedirectError::TooLong { from: c(0) }));
    }
}
