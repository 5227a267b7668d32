//! Who a verified key is: its `Principal`, and the `Profile` it shares with every key of the
//! same organisation, workspace, tier and scopes.

use std::collections::HashMap;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, OnceLock, Weak};

use http::{HeaderName, HeaderValue};

use crate::keys::KeyRecord;
use crate::metrics::{Metrics, TierMetrics};
use crate::upstream::Identity;

/// What the keys of one organisation, workspace, tier and scope set have in common. Interned:
/// every cached key of a profile points at one copy, so a cached key costs little more than its
/// id (the load benchmark's S4 measures bytes per cached key).
#[derive(Debug)]
pub struct Profile {
    /// Shared, not owned: the rate limiter keys its state by it, once per request.
    pub org: Arc<str>,
    pub workspace: String,
    pub tier: String,
    pub scopes: Vec<String>,
    /// `x-tollgate-org`, `-tier` and `-scopes`, built once per profile rather than per request.
    pub identity: Identity,
    /// The tier's series (`tollgate_tokens_total`, `tollgate_concurrent_requests`), looked up
    /// in the registry's map on first use rather than twice per LLM request.
    tier_metrics: OnceLock<Arc<TierMetrics>>,
}

impl Profile {
    pub fn scopes(&self) -> impl Iterator<Item = &str> + Clone {
        self.scopes.iter().map(String::as_str)
    }

    /// The series of this profile's tier. `metrics` is the process's one registry (profiles
    /// live in the authenticator of the `State` that owns it).
    pub fn tier_metrics(&self, metrics: &Metrics) -> &Arc<TierMetrics> {
        self.tier_metrics.get_or_init(|| metrics.tier(&self.tier))
    }
}

/// An authenticated caller: its key and the profile it shares with similar keys. Derefs to the
/// profile (`principal.org`, `principal.tier`, …).
#[derive(Debug)]
pub struct Principal {
    /// Shared, not owned: the rate limiter keys per-key state by it.
    pub key_id: Arc<str>,
    pub(super) profile: Arc<Profile>,
    pub expires_at: Option<i64>,
    pub(super) last_used: AtomicI64,
    pub(super) flushed: AtomicI64,
}

impl std::ops::Deref for Principal {
    type Target = Profile;
    fn deref(&self) -> &Profile {
        &self.profile
    }
}

/// The interned profiles, by (org, workspace, tier, scopes). Weak: a profile lives as long as a
/// cached key uses it; dead entries are swept with the failure counters.
pub(super) type Profiles = HashMap<(String, String, String, Vec<String>), Weak<Profile>>;

impl Profile {
    pub(super) fn new(r: &KeyRecord) -> Profile {
        let value = |s: &str| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static("invalid"));
        let identity = Identity {
            headers: vec![
                (HeaderName::from_static("x-tollgate-org"), value(&r.org)),
                (HeaderName::from_static("x-tollgate-tier"), value(&r.tier)),
                (HeaderName::from_static("x-tollgate-scopes"), value(&r.scopes.join(" "))),
            ],
        };
        Profile {
            org: r.org.as_str().into(),
            workspace: r.workspace.clone(),
            tier: r.tier.clone(),
            scopes: r.scopes.clone(),
            identity,
            tier_metrics: OnceLock::new(),
        }
    }
}

impl Principal {
    pub(super) fn new(r: &KeyRecord, profile: Arc<Profile>) -> Principal {
        Principal {
            key_id: r.id.as_str().into(),
            profile,
            expires_at: r.expires_at,
            last_used: AtomicI64::new(0),
            flushed: AtomicI64::new(0),
        }
    }
}
