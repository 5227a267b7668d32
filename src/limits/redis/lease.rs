//! What an LLM request admitted by the fleet holds in Redis until its response ends (§12): a
//! concurrency lease and a token reservation, settled by `settle.lua` — the reservation
//! replaced by the usage reported, the lease released — exactly once, when the hold is settled
//! or dropped (dropped unsettled: refunded, as the local hold is).
//!
//! The settlement is a Redis call of its own, made in a task after the response has ended, so
//! that no response waits for it. A lease is renewed while its request runs (`Fleet::renew`,
//! every third of `concurrency_lease`), so a stream may last as long as it likes; a replica
//! that dies stops renewing, and its slots come back when their leases run out. A settlement
//! that fails (Redis down at that moment) leaves the reservation charged — the estimate stands,
//! never less — and the lease to run out.

use std::sync::Arc;

use prometheus::IntGauge;

use super::super::hold::Held;
use super::super::tokens::Left;
use super::Fleet;

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

    fn finish(&mut self, used: u64) {
        let Some(mut job) = self.job.take() else { return };
        if let Some(lease) = &job.lease {
            self.fleet.leases.remove(lease);
            if let Some(g) = &self.gauge {
                g.dec();
            }
        }
        job.used = used;
        // Outside a runtime (a process shutting down) nothing can be sent: the lease runs out,
        // the reservation stands.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let fleet = self.fleet.clone();
            runtime.spawn(async move { fleet.settle(job).await });
        }
    }
}

impl Held for FleetHold {
    fn left(&self) -> Option<Left> {
        self.left
    }

    fn reserved(&self) -> Option<u64> {
        self.job.as_ref().and_then(|j| j.reserved)
    }

    fn settle(mut self: Box<Self>, used: u64) {
        self.finish(used);
    }
}

impl Drop for FleetHold {
    fn drop(&mut self) {
        self.finish(0);
    }
}
