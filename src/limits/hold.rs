//! What an admitted LLM request holds until its response ends (§12): a concurrency slot and a
//! token reservation — this replica's, or the fleet's in Redis (`redis::FleetHold`). Dropping a
//! hold gives both back (the request failed before any byte, or was refused by a later limit);
//! `settle` replaces the reservation by the usage reported.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::concurrency::Slot;
use super::tokens::{Left, Tokens};
use super::Wall;
use crate::clock::DAY_MS;

#[derive(Default)]
pub struct Hold {
    pub(super) slot: Option<Slot>,
    pub(super) tokens: Option<TokenHold>,
    pub(super) fleet: Option<Box<dyn Held>>,
}

/// A settlement under way in a shared backend, done once the backend has applied it (or its
/// wait, the backend's decision timeout, is over). A response's last bytes wait for it: a
/// client that sends its next request, to any replica, once it has the whole response is
/// decided after its previous one was settled — its slot free, its unused tokens back.
pub type Settling = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a shared backend holds for a request (the fleet's, in Redis: `redis::FleetHold`),
/// behind a trait so that this file does not depend on the backend that depends on it.
pub trait Held: Send + Sync {
    /// What remained after the reservation, for the headers.
    fn left(&self) -> Option<Left>;
    /// The tokens reserved, if any.
    fn reserved(&self) -> Option<u64>;
    /// Charges `used` tokens in place of the reservation, and gives the slot back; dropping
    /// it unsettled refunds the reservation (without a `Settling` to wait for).
    fn settle(self: Box<Self>, used: u64) -> Option<Settling>;
}

impl Hold {
    /// What remained after the reservation, for the headers.
    pub(super) fn left(&self) -> Option<Left> {
        match (&self.tokens, &self.fleet) {
            (Some(t), _) => Some(t.left),
            (None, Some(f)) => f.left(),
            (None, None) => None,
        }
    }

    /// The tokens reserved (0 without token limits).
    pub fn reserved(&self) -> u64 {
        match (&self.tokens, &self.fleet) {
            (Some(t), _) => t.reserved,
            (None, Some(f)) => f.reserved().unwrap_or(0),
            (None, None) => 0,
        }
    }

    /// Whether tokens were reserved: the response's usage is wanted.
    pub fn counts_tokens(&self) -> bool {
        self.tokens.is_some() || self.fleet.as_ref().is_some_and(|f| f.reserved().is_some())
    }

    /// Charges `used` tokens in place of the reservation, and releases the slot; what a
    /// shared backend still has to apply is the `Settling`.
    pub fn settle(mut self, used: u64) -> Option<Settling> {
        if let Some(t) = self.tokens.take() {
            t.settle(used);
        }
        self.fleet.take().and_then(|f| f.settle(used))
    }

    /// Gives everything back, the reservation refunded (as dropping it does), with what a
    /// shared backend still has to apply.
    pub fn release(mut self) -> Option<Settling> {
        self.tokens.take();
        self.fleet.take().and_then(|f| f.settle(0))
    }

    /// Whether a shared backend settles it, later than its `settle` returns.
    pub fn settles_later(&self) -> bool {
        self.fleet.is_some()
    }

    /// What a shared backend holds for a request it admitted.
    pub(super) fn shared(hold: Box<dyn Held>) -> Hold {
        Hold { fleet: Some(hold), ..Hold::default() }
    }
}

/// One reservation; refunded when dropped unsettled.
pub struct TokenHold {
    tokens: Arc<Tokens>,
    entity: Arc<str>,
    reserved: u64,
    day: i64,
    left: Left,
    wall: Wall,
    settled: bool,
}

impl TokenHold {
    pub(super) fn new(
        tokens: Arc<Tokens>,
        entity: Arc<str>,
        reserved: u64,
        now_ms: i64,
        left: Left,
        wall: Wall,
    ) -> TokenHold {
        TokenHold { tokens, entity, reserved, day: now_ms.div_euclid(DAY_MS), left, wall, settled: false }
    }

    fn settle(mut self, used: u64) {
        self.settled = true;
        self.tokens.settle(&self.entity, self.reserved, self.day, used, (self.wall)());
    }
}

impl Drop for TokenHold {
    fn drop(&mut self) {
        if !self.settled {
            self.tokens.settle(&self.entity, self.reserved, self.day, 0, (self.wall)());
        }
    }
}
