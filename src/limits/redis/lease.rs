//! What an LLM request admitted by the fleet holds in Redis until its response ends (§12): a
//! concurrency lease and a token reservation, settled by `settle.lua` — the reservation
//! replaced by the usage reported, the lease released — exactly once, when the hold is settled
//! or dropped (dropped unsettled: refunded, as the local hold is).
//!
//! The settlement is a Redis call of its own, made in a task when the response ends; the
//! response's last bytes wait for it (at most the decision timeout), so that the client's next
//! request, on any replica, is decided after it. A lease is renewed while its request runs
//! (`Fleet::renew`, every third of `concurrency_lease`), so a stream may last as long as it
//! likes; a replica that dies stops renewing, and its slots come back when their leases run
//! out. A settlement
//! that fails (Redis down at that moment) leaves the reservation charged — the estimate stands,
//! never less — and the lease to run out.

use std::sync::Arc;

use prometheus::IntGauge;

use super::super::hold::{Held, Settling};
use super::super::tokens::Left;
use super::{leases_key, tokens_key, Fleet};
use crate::config::Tier;

/// The keys and limits a settlement needs.
pub(super) struct Settlement {
    pub(super) tokens_key: String,
    pub(super) leases_key: String,
    pub(super) per_minute: Option<u64>,
    pub(super) daily: Option<u64>,
    /// The tokens reserved (`None`: none, only the lease).
    pub(super) reserved: Option<u64>,
    /// The UTC day number of the reservation.
    pub(super) day: i64,
    pub(super) used: u64,
    pub(super) lease: Option<String>,
}

impl Settlement {
    /// What a request that reserved `reserved` tokens at `now_ms` (its lease `lease`) settles.
    pub(super) fn of(
        base: &str,
        limits: &Tier,
        reserved: Option<u64>,
        now_ms: i64,
        lease: Option<String>,
    ) -> Settlement {
        Settlement {
            tokens_key: tokens_key(base, limits),
            leases_key: leases_key(base),
            per_minute: limits.tokens_per_minute,
            daily: limits.daily_tokens,
            reserved,
            day: now_ms.div_euclid(crate::clock::DAY_MS),
            used: 0,
            lease,
        }
    }
}

pub struct FleetHold {
    fleet: Arc<Fleet>,
    job: Option<Settlement>,
    left: Option<Left>,
    /// `tollgate_concurrent_requests{tier}`: this replica's requests holding a slot.
    gauge: Option<IntGauge>,
}

impl FleetHold {
    pub(super) fn new(
        fleet: Arc<Fleet>,
        job: Settlement,
        left: Option<Left>,
        gauge: Option<IntGauge>,
    ) -> FleetHold {
        if let Some(lease) = &job.lease {
            fleet.leases.insert(lease.clone(), job.leases_key.clone());
            if let Some(g) = &gauge {
                g.inc();
            }
        }
        FleetHold { fleet, job: Some(job), left, gauge }
    }

    /// Hands the settlement to a task of its own (it is made even if nobody waits for it),
    /// and returns its wait, bounded by the decision timeout.
    fn finish(&mut self, used: u64) -> Option<Settling> {
        let mut job = self.job.take()?;
        if let Some(lease) = &job.lease {
            self.fleet.leases.remove(lease);
            if let Some(g) = &self.gauge {
                g.dec();
            }
        }
        job.used = used;
        // Outside a runtime (a process shutting down) nothing can be sent: the lease runs out,
        // the reservation stands.
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let fleet = self.fleet.clone();
        let (done, settled) = tokio::sync::oneshot::channel();
        runtime.spawn(async move {
            fleet.settle(job).await;
            let _ = done.send(());
        });
        let wait = self.fleet.timeout;
        Some(Box::pin(async move {
            let _ = tokio::time::timeout(wait, settled).await;
        }))
    }
}

impl Held for FleetHold {
    fn left(&self) -> Option<Left> {
        self.left
    }

    fn reserved(&self) -> Option<u64> {
        self.job.as_ref().and_then(|j| j.reserved)
    }

    fn settle(mut self: Box<Self>, used: u64) -> Option<Settling> {
        self.finish(used)
    }
}

impl Drop for FleetHold {
    fn drop(&mut self) {
        let _ = self.finish(0);
    }
}
