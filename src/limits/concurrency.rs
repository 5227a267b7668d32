//! `max_concurrent_requests` (§12): requests in flight at once per organisation (or key),
//! streams included. A `Slot` is taken at admission and released exactly once, when it is
//! dropped: the response body's observer holds it, so that is when the body ends, the client
//! goes or the upstream fails — never when the handler returns.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::Map;
use prometheus::IntGauge;

pub struct Concurrency {
    max: u32,
    in_flight: Map<Arc<AtomicU32>>,
}

/// One request's place; gives it back when dropped.
pub struct Slot {
    count: Arc<AtomicU32>,
    gauge: Option<IntGauge>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        if let Some(g) = &self.gauge {
            g.dec();
        }
    }
}

impl Concurrency {
    pub fn new(max: Option<u32>) -> Option<Concurrency> {
        max.map(|max| Concurrency { max, in_flight: Map::default() })
    }

    /// A slot for `entity`, or `None` when `max` are in flight.
    pub fn acquire(&self, entity: &Arc<str>, gauge: Option<IntGauge>) -> Option<Slot> {
        let count = self.in_flight.entry(entity.clone()).or_default().clone();
        let taken =
            count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1));
        taken.ok().map(|_| {
            if let Some(g) = &gauge {
                g.inc();
            }
            Slot { count, gauge }
        })
    }

    pub fn in_flight(&self, entity: &str) -> u32 {
        self.in_flight.get(entity).map_or(0, |c| c.load(Ordering::Acquire))
    }

    /// Forgets entities with nothing in flight (their counter is not held by any slot).
    pub fn forget_idle(&self) {
        self.in_flight.retain(|_, c| Arc::strong_count(c) > 1 || c.load(Ordering::Acquire) > 0);
        self.in_flight.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_released_exactly_once_on_drop() {
        let c = Concurrency::new(Some(2)).unwrap_or_else(|| unreachable!());
        let e: Arc<str> = "acme".into();
        let gauge = IntGauge::new("g", "g").unwrap_or_else(|_| unreachable!());
        let a = c.acquire(&e, Some(gauge.clone()));
        let b = c.acquire(&e, Some(gauge.clone()));
        assert!(a.is_some() && b.is_some());
        assert!(c.acquire(&e, None).is_none(), "a third is refused");
        assert_eq!((c.in_flight("acme"), gauge.get()), (2, 2));
        drop(a);
        assert_eq!((c.in_flight("acme"), gauge.get()), (1, 1));
        assert!(c.acquire(&"other".into(), None).is_some(), "per entity");
        let d = c.acquire(&e, None);
        assert!(d.is_some(), "a released slot is taken again");
        drop((b, d));
        assert_eq!(c.in_flight("acme"), 0);
        c.forget_idle();
        assert_eq!(c.in_flight.len(), 0);
    }
}
