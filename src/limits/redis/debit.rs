//! Debited leases (§11, `rate_limits.redis.debit_requests`, off by default): for a request
//! that holds nothing (no tokens, no slot), a replica may take several requests of an entity's
//! request limits in one decision — debited in Redis at once, as if admitted — and admit the
//! rest itself for at most `debit_within`. Redis calls fall by up to that factor on busy
//! entities; what the fleet admits in any window stays within
//! `burst + rate × (window + debit_within)`, and never beyond the daily budget.
//!
//! - A lease's size adapts to the demand it sees on this replica: it starts at 1 (a request
//!   alone takes only itself), doubles (up to `debit_requests`) when a lease was used up before
//!   it ran out, and halves when one ran out with requests left.
//! - Requests left when a lease runs out are given back (`refund.lua`), by the next decision of
//!   the entity or by the sweep (`tasks::refund_debits`), so that a sparse entity does not lose
//!   its daily budget to leases it could not use.
//! - The script takes of a daily budget at most what is left shared by twice the live replicas:
//!   the budget's last requests go one at a time, so a replica does not sit on requests that
//!   another is refused.

use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::super::quota::Quota;

/// A lease that ran out with requests left, to give back.
#[derive(Debug, PartialEq)]
pub(super) struct Refund {
    /// The request limits' key (`requests_key`).
    pub(super) key: String,
    pub(super) requests: u32,
    /// The UTC day they were taken on.
    pub(super) day: i64,
    /// The GCRA's emission interval in microseconds.
    pub(super) interval_us: f64,
}

struct Debit {
    left: u32,
    until: Instant,
    /// How many the next decision asks for.
    next: u32,
    day: i64,
    interval_us: f64,
    /// The fleet's state after the lease was taken, for the headers of what it admits.
    quota: Quota,
}

/// Entities idle this long are forgotten (only their lease size is lost).
const FORGET_AFTER: Duration = Duration::from_secs(60);

pub(super) struct Debits {
    leases: DashMap<String, Debit, foldhash::fast::RandomState>,
    max: u32,
    within: Duration,
}

impl Debits {
    pub(super) fn new(max: u32, within: Duration) -> Debits {
        Debits { leases: DashMap::default(), max: max.max(1), within }
    }

    /// One request admitted from this replica's lease of `key`, if it has one running with
    /// requests left: the quota its headers report.
    pub(super) fn spend(&self, key: &str, now: Instant) -> Option<Quota> {
        let mut d = self.leases.get_mut(key)?;
        if d.left == 0 || d.until <= now {
            return None;
        }
        d.left -= 1;
        Some(d.quota.clone())
    }

    /// How many requests the next decision of `key` asks for, and what a lease that ran out
    /// gives back.
    pub(super) fn want(&self, key: &str, now: Instant) -> (u32, Option<Refund>) {
        let Some(mut d) = self.leases.get_mut(key) else {
            return (1, None);
        };
        let mut refund = None;
        if d.until > now {
            // Used up while it ran: the demand is more than the lease.
            d.next = d.next.saturating_mul(2).min(self.max);
        } else {
            d.next = (d.next / 2).max(1);
            if d.left > 0 {
                refund = Some(Refund {
                    key: key.to_string(),
                    requests: d.left,
                    day: d.day,
                    interval_us: d.interval_us,
                });
                d.left = 0;
            }
        }
        (d.next, refund)
    }

    /// A decision took `taken` requests of `key` (one of them the request deciding): the others
    /// are this replica's to admit until `debit_within` from now. A lease still running (two
    /// decisions at once) keeps its end, and the two are one.
    pub(super) fn store(
        &self,
        key: &str,
        taken: u32,
        now: Instant,
        day: i64,
        interval_us: f64,
        quota: Quota,
    ) {
        let more = taken.saturating_sub(1);
        let until = now + self.within;
        let mut d = self.leases.entry(key.to_string()).or_insert_with(|| Debit {
            left: 0,
            until,
            next: 1,
            day,
            interval_us,
            quota: Quota::default(),
        });
        if d.left > 0 && d.until > now && d.day == day {
            d.left = d.left.saturating_add(more);
        } else {
            d.left = more;
            d.until = until;
            d.day = day;
        }
        d.interval_us = interval_us;
        d.quota = quota;
    }

    /// The leases that ran out with requests left (taken out of them, to give back), and
    /// entities idle for long forgotten.
    pub(super) fn expired(&self, now: Instant) -> Vec<Refund> {
        let mut out = Vec::new();
        self.leases.retain(|key, d| {
            if d.until <= now && d.left > 0 {
                out.push(Refund {
                    key: key.clone(),
                    requests: d.left,
                    day: d.day,
                    interval_us: d.interval_us,
                });
                d.left = 0;
            }
            d.until + FORGET_AFTER > now
        });
        out
    }

    /// How often the sweep gives back what leases did not use.
    pub(super) fn sweep_every(&self) -> Duration {
        self.within.max(Duration::from_millis(50))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_lease_grows_with_the_demand_it_sees_and_gives_back_what_it_did_not_use() {
        let d = Debits::new(8, 5 * MS);
        let t = Instant::now();
        // A first request asks for itself only.
        assert_eq!(d.want("k", t), (1, None));
        d.store("k", 1, t, 20, 1000.0, Quota::default());
        assert!(d.spend("k", t).is_none(), "nothing left");
        // The next comes while that lease runs: twice as many, then again, up to the maximum.
        assert_eq!(d.want("k", t + MS), (2, None));
        d.store("k", 2, t + MS, 20, 1000.0, Quota::default());
        assert!(d.spend("k", t + 2 * MS).is_some());
        assert!(d.spend("k", t + 2 * MS).is_none(), "one taken for the deciding request, one spent");
        assert_eq!(d.want("k", t + 3 * MS).0, 4);
        d.store("k", 4, t + 3 * MS, 20, 1000.0, Quota::default());
        assert_eq!(d.want("k", t + 3 * MS).0, 8);
        assert_eq!(d.want("k", t + 3 * MS).0, 8, "at most debit_requests");
        // Two decisions at once: one lease, with the first one's end.
        d.store("k", 8, t + 4 * MS, 20, 1000.0, Quota::default());
        let spent = (0..20).filter(|_| d.spend("k", t + 7 * MS).is_some()).count();
        assert_eq!(spent, 3 + 7);
        // Ran out with requests left: given back, once, and the next lease is half as big.
        d.store("k", 8, t + 10 * MS, 20, 1000.0, Quota::default());
        assert!(d.spend("k", t + 15 * MS).is_none(), "a lease lasts `within`");
        assert_eq!(
            d.want("k", t + 15 * MS),
            (4, Some(Refund { key: "k".into(), requests: 7, day: 20, interval_us: 1000.0 }))
        );
        assert_eq!(d.want("k", t + 15 * MS), (2, None), "given back once");
        // The sweep gives back what nobody asked for again, and forgets idle entities.
        d.store("k", 3, t + 20 * MS, 20, 1000.0, Quota::default());
        d.store("j", 1, t + 20 * MS, 20, 1000.0, Quota::default());
        assert_eq!(d.expired(t + 21 * MS), vec![]);
        let back = d.expired(t + 25 * MS);
        assert_eq!(back, vec![Refund { key: "k".into(), requests: 2, day: 20, interval_us: 1000.0 }]);
        assert_eq!(d.expired(t + 25 * MS), vec![]);
        d.expired(t + 25 * MS + FORGET_AFTER);
        assert!(d.leases.is_empty());
    }

    #[test]
    fn a_lease_of_another_day_is_not_merged() {
        let d = Debits::new(8, 5 * MS);
        let t = Instant::now();
        d.store("k", 4, t, 20, 1000.0, Quota::default());
        d.store("k", 2, t + MS, 21, 1000.0, Quota::default());
        assert_eq!((0..9).filter(|_| d.spend("k", t + 2 * MS).is_some()).count(), 1);
    }
}
