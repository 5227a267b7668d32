//! From a key id to its cached outcome, so that a change of one key (revoked, restored,
//! purged) evicts it without scanning the whole cache.
//!
//! The cache is keyed by the token's digest, and only one token per id can be valid or
//! revoked (the one whose secret matches); outcomes of wrong secrets stay wrong whatever
//! changes, and need no eviction. So one digest per id. Ids are kept as a 64-bit hash (about
//! 47 bytes an entry in all, against a budget of 450 bytes per cached key): two ids with the
//! same hash are marked, and a change of either falls back to scanning.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;

#[derive(Default)]
pub(super) struct ById {
    hasher: std::collections::hash_map::RandomState,
    digests: HashMap<u64, [u8; 32]>,
    collided: HashSet<u64>,
}

/// What a change of one id must evict.
pub(super) enum Evict {
    Nothing,
    One([u8; 32]),
    /// The id shares its hash with another: every entry of the id, found by scanning.
    Scan,
}

impl ById {
    pub(super) fn note(&mut self, id: &str, digest: [u8; 32]) {
        let h = self.hasher.hash_one(id);
        if let Some(old) = self.digests.insert(h, digest) {
            // The same token cached again is the common case; another digest under the same
            // hash is another id (or a stale slot, which a scan handles too).
            if old != digest {
                self.collided.insert(h);
            }
        }
    }

    pub(super) fn take(&mut self, id: &str) -> Evict {
        let h = self.hasher.hash_one(id);
        if self.collided.contains(&h) {
            return Evict::Scan;
        }
        self.digests.remove(&h).map_or(Evict::Nothing, Evict::One)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.digests.len()
    }

    /// Forgets ids whose outcome is no longer cached (evicted for room, or expired and
    /// replaced): the caller says which digests are.
    pub(super) fn retain(&mut self, cached: impl Fn(&[u8; 32]) -> bool) {
        self.digests.retain(|_, d| cached(d));
        self.collided.retain(|h| self.digests.contains_key(h));
        self.digests.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_digest_per_id_and_a_scan_when_two_share_a_hash() {
        let mut by_id = ById::default();
        by_id.note("a", [1; 32]);
        by_id.note("a", [1; 32]);
        by_id.note("b", [2; 32]);
        assert!(matches!(by_id.take("a"), Evict::One(d) if d == [1; 32]));
        assert!(matches!(by_id.take("a"), Evict::Nothing), "taken once");
        // Another digest under the same hash (as two ids colliding would): scan from then on.
        by_id.note("b", [3; 32]);
        assert!(matches!(by_id.take("b"), Evict::Scan));
        by_id.retain(|_| false);
        assert!(matches!(by_id.take("b"), Evict::Nothing), "forgotten with its digests");
    }
}
