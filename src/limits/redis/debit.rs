//! Debited leases (§11, `rate_limits.redis.debit_requests`, off by default): for a request
//! that holds nothing (no tokens, no slot), a replica may take several requests of an entity's
//! request limits in one decision — debited in Redis at once, as if admitted — and admit the
//! rest itself for at most `debit_within`. Redis calls fall by up to that factor on busy
//! entities; what the fleet admits in any window stays within
//! `burst + rate × (window + debit_within)`, and never beyond the daily budget.
//!
//! - A lease's size adapts to the demand it sees on this replica: it starts at 1 (a request
//!   alone takes only itself), doubles (up to `debit_requests`) when a lease was used up before
//!   it ran out, and halves when a request finds the last one over (the entity paused).
//! - A lease down to half of its size is refilled ahead, in the background, by one decision
//!   at a time (twice as big when that half went in less than half of `debit_within`): the requests that come meanwhile spend what is left instead of each asking
//!   Redis. Each batch keeps its own end, so no request is admitted from a batch older than
//!   `debit_within`.
//! - Requests left when a lease runs out are given back (`refund.lua`), by the next decision of
//!   the entity or by the sweep (`tasks::refund_debits`), so that a sparse entity does not lose
//!   its daily budget to leases it could not use.
//! - The script takes of a daily budget at most what is left shared by twice the live replicas:
//!   the budget's last requests go one at a time, so a replica does not sit on requests that
//!   another is refused.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::Notify;

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
    /// Up to two batches of requests taken, older first: (left, until when).
    batches: [(u32, Instant); 2],
    /// A decision of this lease (a refill ahead, or a request that found it empty) is under
    /// way: the requests that find it empty meanwhile wait for it (`ready`).
    refilling: bool,
    ready: Arc<Notify>,
    /// How many the next decision asks for.
    next: u32,
    /// When the last batch was asked for.
    since: Instant,
    day: i64,
    interval_us: f64,
    /// The fleet's state after the last batch was taken, for the headers of what it admits.
    quota: Quota,
    /// Requests of batches that ran out unused, to give back.
    owed: u32,
}

impl Debit {
    /// Batches that ran out: what they left is owed back.
    fn expire(&mut self, now: Instant) {
        for (left, until) in &mut self.batches {
            if *until <= now && *left > 0 {
                self.owed = self.owed.saturating_add(*left);
                *left = 0;
            }
        }
    }

    fn left(&self) -> u32 {
        self.batches.iter().map(|b| b.0).sum()
    }

    fn running(&self, now: Instant) -> bool {
        self.batches.iter().any(|b| b.1 > now)
    }
}

/// What a request does when its replica's lease has nothing left (`Debits::want`).
pub(super) enum Next {
    /// Asks Redis for `take` requests (itself and a batch for later), giving back `refund` on
    /// the way; `decides`: it is the lease's decision under way, that others wait for.
    Ask { take: u32, refund: Option<Refund>, decides: bool },
    /// A decision of the lease is under way: wait for it (at most the decision timeout), then
    /// spend.
    Wait(Arc<Notify>),
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

    /// One request admitted from this replica's lease of `key`, if it has requests left: the
    /// quota its headers report, and — when the lease is down to half of what the next
    /// decision would take and no refill is under way — how many a refill should take now, so
    /// that the lease does not run dry while requests wait for Redis.
    pub(super) fn spend(&self, key: &str, now: Instant) -> Option<(Quota, Option<u32>)> {
        let mut d = self.leases.get_mut(key)?;
        d.expire(now);
        let batch = d.batches.iter_mut().find(|b| b.0 > 0)?;
        batch.0 -= 1;
        let refill = (!d.refilling && d.next > 1 && d.left() <= d.next / 2).then(|| {
            // Half of it spent in less than half of `within`: the demand is more than the lease.
            if now < d.since + self.within / 2 {
                d.next = d.next.saturating_mul(2).min(self.max);
            }
            d.refilling = true;
            d.next
        });
        Some((d.quota.clone(), refill))
    }

    /// What a request does when this replica's lease of `key` has none left.
    pub(super) fn want(&self, key: &str, now: Instant) -> Next {
        let Some(mut d) = self.leases.get_mut(key) else {
            return Next::Ask { take: 1, refund: None, decides: false };
        };
        if d.refilling {
            return Next::Wait(d.ready.clone());
        }
        d.expire(now);
        d.next = if d.running(now) {
            // Used up while it ran: the demand is more than the lease.
            d.next.saturating_mul(2).min(self.max)
        } else {
            // The entity paused here: less next time.
            (d.next / 2).max(1)
        };
        d.refilling = true;
        Next::Ask { take: d.next, refund: self.owed(key, &mut d), decides: true }
    }

    fn owed(&self, key: &str, d: &mut Debit) -> Option<Refund> {
        (d.owed > 0).then(|| {
            let requests = std::mem::take(&mut d.owed);
            Refund { key: key.to_string(), requests, day: d.day, interval_us: d.interval_us }
        })
    }

    /// A decision of `key` (asked for at `now`) took `more` requests for later (beyond the
    /// request deciding, if one did): this replica's to admit until `debit_within` from then.
    /// `(day, interval_us)`: the UTC day it was taken on and the GCRA's emission interval (for
    /// a refund). `decides`: the lease's decision under way (`want`, `spend`), whose waiters go on now.
    /// Two batches left at once (decisions that crossed) become one, with the earlier end.
    pub(super) fn store(
        &self,
        key: &str,
        more: u32,
        decides: bool,
        now: Instant,
        (day, interval_us): (i64, f64),
        quota: Quota,
    ) {
        let until = now + self.within;
        let mut d = self.leases.entry(key.to_string()).or_insert_with(|| Debit {
            batches: [(0, now); 2],
            refilling: false,
            ready: Arc::new(Notify::new()),
            next: 1,
            since: now,
            day,
            interval_us,
            quota: Quota::default(),
            owed: 0,
        });
        d.since = now;
        d.expire(now);
        if d.day != day {
            // Another day's requests count for nothing today.
            d.batches = [(0, now); 2];
            d.owed = 0;
            d.day = day;
        }
        match d.batches {
            [(0, _), _] => d.batches = [d.batches[1], (more, until)],
            [_, (0, _)] => d.batches[1] = (more, until),
            [_, (left, _)] => d.batches[1].0 = left.saturating_add(more),
        }
        d.interval_us = interval_us;
        d.quota = quota;
        if decides {
            d.refilling = false;
            d.ready.notify_waiters();
        }
    }

    /// The lease's decision under way failed or was refused: its waiters go on (to Redis), and
    /// the next one may be tried.
    pub(super) fn decided_nothing(&self, key: &str) {
        if let Some(mut d) = self.leases.get_mut(key) {
            d.refilling = false;
            d.ready.notify_waiters();
        }
    }

    /// What batches that ran out did not use (taken out of them, to give back), and entities
    /// idle for long forgotten.
    pub(super) fn expired(&self, now: Instant) -> Vec<Refund> {
        let mut out = Vec::new();
        self.leases.retain(|key, d| {
            d.expire(now);
            out.extend(self.owed(key, d));
            d.batches.iter().any(|b| b.1 + FORGET_AFTER > now) || d.refilling
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
    const Q: fn() -> Quota = Quota::default;

    fn spent(d: &Debits, at: Instant, n: usize) -> usize {
        (0..n).filter(|_| d.spend("k", at).is_some()).count()
    }

    /// `want` where it asks Redis: (take, refund, decides).
    fn ask(d: &Debits, at: Instant) -> (u32, Option<Refund>, bool) {
        match d.want("k", at) {
            Next::Ask { take, refund, decides } => (take, refund, decides),
            Next::Wait(_) => panic!("waits"),
        }
    }

    fn refund(requests: u32) -> Option<Refund> {
        Some(Refund { key: "k".into(), requests, day: 20, interval_us: 1000.0 })
    }

    #[test]
    fn a_lease_grows_with_the_demand_it_sees_and_gives_back_what_it_did_not_use() {
        let d = Debits::new(8, 5 * MS);
        let t = Instant::now();
        // A first request asks for itself only.
        assert_eq!(ask(&d, t), (1, None, false));
        d.store("k", 0, false, t, (20, 1000.0), Q());
        assert!(d.spend("k", t).is_none(), "nothing left");
        // The next comes while that lease runs: twice as many, one decision at a time.
        assert_eq!(ask(&d, t + MS), (2, None, true));
        assert!(matches!(d.want("k", t + MS), Next::Wait(_)), "the others wait for it");
        d.store("k", 1, true, t + MS, (20, 1000.0), Q());
        assert_eq!(spent(&d, t + 2 * MS, 2), 1, "one taken for the deciding request, one spent");
        // That spend asked for a refill, twice as big (the batch went in 1 ms): 4; none runs here.
        d.decided_nothing("k");
        for expect in [8, 8, 8] {
            assert_eq!(ask(&d, t + 3 * MS).0, expect, "at most debit_requests");
            d.decided_nothing("k");
        }
        // Ran out with requests left: given back, once; the entity paused, so the next lease is
        // half as big.
        d.store("k", 7, true, t + 10 * MS, (20, 1000.0), Q());
        assert!(d.spend("k", t + 15 * MS).is_none(), "a lease lasts `within`");
        assert_eq!(ask(&d, t + 15 * MS), (4, refund(7), true));
        d.decided_nothing("k");
        assert_eq!(ask(&d, t + 16 * MS), (2, None, true), "given back once; still paused: half again");
        d.decided_nothing("k");
        // The sweep gives back what nobody asked for again, and forgets idle entities.
        d.store("k", 2, false, t + 20 * MS, (20, 1000.0), Q());
        d.store("j", 0, false, t + 20 * MS, (20, 1000.0), Q());
        assert_eq!(d.expired(t + 21 * MS), vec![]);
        assert_eq!(d.expired(t + 25 * MS), vec![refund(2).unwrap()]);
        assert_eq!(d.expired(t + 25 * MS), vec![]);
        d.expired(t + 25 * MS + FORGET_AFTER);
        assert!(d.leases.is_empty());
    }

    #[test]
    fn a_lease_half_spent_is_refilled_ahead_once_and_each_batch_keeps_its_end() {
        let d = Debits::new(8, 5 * MS);
        let t = Instant::now();
        d.store("k", 0, false, t, (20, 1000.0), Q());
        for _ in 0..3 {
            ask(&d, t);
            d.decided_nothing("k");
        }
        d.store("k", 7, true, t, (20, 1000.0), Q());
        // 7 left; down to 4 (half of 8): one refill of 8 asked for, and not again while it runs.
        let refills: Vec<Option<u32>> = (0..7).map(|_| d.spend("k", t + MS).unwrap().1).collect();
        assert_eq!(refills, [None, None, Some(8), None, None, None, None]);
        assert!(d.spend("k", t + MS).is_none(), "all 8 spent");
        assert!(matches!(d.want("k", t + MS), Next::Wait(_)), "the refill under way is waited for");
        // The refill's batch: all of it for later requests.
        d.store("k", 8, true, t + 2 * MS, (20, 1000.0), Q());
        assert_eq!(spent(&d, t + 3 * MS, 3), 3);
        // A batch taken while the other still has requests: each keeps its end (7 ms, 9 ms);
        // a third at once joins the newer one.
        d.store("k", 3, false, t + 4 * MS, (20, 1000.0), Q());
        d.store("k", 1, false, t + 4 * MS, (20, 1000.0), Q());
        assert_eq!(spent(&d, t + 6 * MS, 3), 3);
        // At 8 ms the first has ended with 2 left (owed back), the second runs.
        assert_eq!(spent(&d, t + 8 * MS, 20), 4);
        assert_eq!(d.expired(t + 8 * MS), vec![refund(2).unwrap()]);
        // A refill that brought nothing: the next spend may ask again.
        assert!(d.leases.get("k").unwrap().refilling, "the spends above asked for one");
        d.decided_nothing("k");
        d.store("k", 7, false, t + 10 * MS, (20, 1000.0), Q());
        assert!((0..7).any(|_| d.spend("k", t + 10 * MS).and_then(|s| s.1).is_some()), "asked again");
    }

    #[tokio::test]
    async fn requests_that_find_the_lease_empty_go_on_when_the_decision_under_way_ends() {
        let d = Debits::new(8, 5 * MS);
        let t = Instant::now();
        d.store("k", 0, false, t, (20, 1000.0), Q());
        assert!(ask(&d, t).2, "decides");
        for brings in [3, 0] {
            let Next::Wait(ready) = d.want("k", t) else { panic!("asks") };
            let woken = ready.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if brings > 0 {
                d.store("k", brings, true, t, (20, 1000.0), Q());
            } else {
                d.decided_nothing("k");
            }
            assert!(tokio::time::timeout(Duration::from_secs(5), woken).await.is_ok(), "woken");
            assert_eq!(spent(&d, t + MS, 5), brings as usize);
            d.decided_nothing("k"); // a refill the spends asked for (none runs here)
            assert!(ask(&d, t + MS).2, "the next decision");
        }
    }

    #[test]
    fn a_lease_of_another_day_is_not_merged() {
        let d = Debits::new(8, 5 * MS);
        let t = Instant::now();
        d.store("k", 3, false, t, (20, 1000.0), Q());
        d.store("k", 1, false, t + MS, (21, 1000.0), Q());
        assert_eq!(spent(&d, t + 2 * MS, 9), 1);
    }
}
