//! Token limits (§12): a bucket of `tokens_per_minute` refilled continuously, and a daily
//! budget of `daily_tokens` that resets at 00:00 UTC, per organisation (or key).
//!
//! A request reserves an estimate at admission, all or nothing across both; when its response
//! ends the reservation is replaced by the usage the upstream reported (`settle`), which may
//! exceed what is left: the bucket then goes into debt and refuses until it has refilled. A
//! request that fails before any byte is refunded (`refund`, also what dropping an unsettled
//! reservation does). Time is the limiter's injected wall clock, so the arithmetic is exact in
//! tests.

use std::sync::{Arc, Mutex};

use super::Map;

use crate::clock::DAY_MS;

/// The bucket counts in 1/60,000ths of a token (a token per minute is one unit per
/// millisecond), so that refill, debt and waits are exact integers.
const UNIT: i128 = 60_000;

fn clamp_i64(x: i128) -> i64 {
    i64::try_from(x).unwrap_or(if x < 0 { i64::MIN } else { i64::MAX })
}

/// The most one request may reserve under these limits (see `Tokens::clamp`).
pub fn clamp(per_minute: Option<u64>, daily: Option<u64>, estimate: u64) -> u64 {
    estimate.min(per_minute.unwrap_or(u64::MAX)).min(daily.unwrap_or(u64::MAX))
}

/// One entity's token state.
#[derive(Debug, Clone, Copy)]
struct State {
    /// Units (`UNIT` per token) in the bucket at `at_ms` (negative: debt).
    balance: i128,
    at_ms: i64,
    day: i64,
    used_today: u64,
}

/// The token limits of one tier or override, with every entity's state.
pub struct Tokens {
    per_minute: Option<u64>,
    daily: Option<u64>,
    states: Map<Mutex<State>>,
}

/// Why a reservation was refused, and for how long (milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    PerMinute { wait_ms: i64 },
    Daily { wait_ms: i64 },
}

/// What remains after a decision, for the headers: (limit, remaining, ms until full/reset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Left {
    pub per_minute: Option<(u64, u64, i64)>,
    pub daily: Option<(u64, u64, i64)>,
    /// Tokens counted today: reservations of requests still running and the usage of finished
    /// ones (may exceed the daily budget: usage is charged in full).
    pub used_today: u64,
}

impl Tokens {
    pub fn new(per_minute: Option<u64>, daily: Option<u64>) -> Option<Tokens> {
        (per_minute.is_some() || daily.is_some()).then(|| Tokens {
            per_minute,
            daily,
            states: Map::default(),
        })
    }

    /// The most one request may reserve: a request larger than a limit could never pass, so
    /// its reservation is clamped to it (and its true usage settles the difference).
    pub fn clamp(&self, estimate: u64) -> u64 {
        clamp(self.per_minute, self.daily, estimate)
    }

    fn refill(&self, s: &mut State, now_ms: i64) {
        let day = now_ms.div_euclid(DAY_MS);
        if s.day != day {
            s.day = day;
            s.used_today = 0;
        }
        if let Some(m) = self.per_minute {
            let elapsed = i128::from((now_ms - s.at_ms).max(0));
            s.balance = (s.balance + elapsed * i128::from(m)).min(i128::from(m) * UNIT);
        }
        s.at_ms = now_ms;
    }

    fn left(&self, s: &State, now_ms: i64) -> Left {
        let until_midnight = (now_ms.div_euclid(DAY_MS) + 1) * DAY_MS - now_ms;
        Left {
            per_minute: self.per_minute.map(|m| {
                let remaining = u64::try_from(s.balance.max(0) / UNIT).unwrap_or(0);
                let missing = i128::from(m) * UNIT - s.balance;
                let to_full = clamp_i64((missing + i128::from(m) - 1) / i128::from(m.max(1)));
                (m, remaining.min(m), to_full.max(0))
            }),
            daily: self.daily.map(|d| (d, d.saturating_sub(s.used_today), until_midnight)),
            used_today: s.used_today,
        }
    }

    /// Reserves `amount` (already clamped) for `entity`, or says which limit refuses and for
    /// how long. Nothing is taken on a refusal.
    pub fn reserve(&self, entity: &Arc<str>, amount: u64, now_ms: i64) -> Result<Left, (Refused, Left)> {
        let slot = self.states.entry(entity.clone()).or_insert_with(|| {
            Mutex::new(State {
                balance: i128::from(self.per_minute.unwrap_or(0)) * UNIT,
                at_ms: now_ms,
                day: now_ms.div_euclid(DAY_MS),
                used_today: 0,
            })
        });
        let mut s = slot.lock().unwrap_or_else(|e| e.into_inner());
        self.refill(&mut s, now_ms);
        if let Some(d) = self.daily {
            if s.used_today.saturating_add(amount) > d {
                let wait_ms = (now_ms.div_euclid(DAY_MS) + 1) * DAY_MS - now_ms;
                return Err((Refused::Daily { wait_ms }, self.left(&s, now_ms)));
            }
        }
        if let Some(m) = self.per_minute {
            let missing = i128::from(amount) * UNIT - s.balance;
            if missing > 0 {
                let m = i128::from(m.max(1));
                let wait_ms = clamp_i64((missing + m - 1) / m);
                return Err((Refused::PerMinute { wait_ms: wait_ms.max(1) }, self.left(&s, now_ms)));
            }
            s.balance -= i128::from(amount) * UNIT;
        }
        s.used_today = s.used_today.saturating_add(amount);
        Ok(self.left(&s, now_ms))
    }

    /// Replaces a reservation of `reserved` by the `used` tokens (more or fewer; the bucket may
    /// go into debt). A reservation made on an earlier UTC day only charges today's budget the
    /// usage beyond it.
    pub fn settle(&self, entity: &Arc<str>, reserved: u64, reserved_day: i64, used: u64, now_ms: i64) {
        let Some(slot) = self.states.get(entity) else { return };
        let mut s = slot.lock().unwrap_or_else(|e| e.into_inner());
        self.refill(&mut s, now_ms);
        if let Some(m) = self.per_minute {
            s.balance =
                (s.balance + (i128::from(reserved) - i128::from(used)) * UNIT).min(i128::from(m) * UNIT);
        }
        if s.day == reserved_day {
            s.used_today = (s.used_today + used).saturating_sub(reserved);
        } else {
            s.used_today = s.used_today.saturating_add(used.saturating_sub(reserved));
        }
    }

    /// What remains for `entity` now, without reserving (for `GET /v1/limits`).
    pub fn peek(&self, entity: &Arc<str>, now_ms: i64) -> Left {
        match self.states.get(entity) {
            Some(slot) => {
                let mut s = *slot.lock().unwrap_or_else(|e| e.into_inner());
                self.refill(&mut s, now_ms);
                self.left(&s, now_ms)
            }
            None => self.left(
                &State {
                    balance: i128::from(self.per_minute.unwrap_or(0)) * UNIT,
                    at_ms: now_ms,
                    day: now_ms.div_euclid(DAY_MS),
                    used_today: 0,
                },
                now_ms,
            ),
        }
    }

    /// Forgets entities whose state is that of a fresh one (full bucket, nothing used today).
    pub fn forget_idle(&self, now_ms: i64) {
        self.states.retain(|_, v| {
            let mut s = *v.get_mut().unwrap_or_else(|e| e.into_inner());
            self.refill(&mut s, now_ms);
            let full = self.per_minute.is_none_or(|m| s.balance >= i128::from(m) * UNIT);
            !(full && (self.daily.is_none() || s.used_today == 0))
        });
        self.states.shrink_to_fit();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const NOON: i64 = 1_796_212_800_000; // 2026-12-02T12:00:00Z, ms
    const MIDNIGHT: i64 = NOON + 12 * 3_600_000;

    fn e() -> Arc<str> {
        "acme".into()
    }

    #[test]
    fn the_bucket_refills_continuously_and_refusals_take_nothing() {
        let t = Tokens::new(Some(600), None).unwrap(); // 10 tokens a second
        assert_eq!(t.reserve(&e(), 600, NOON).unwrap().per_minute, Some((600, 0, 60_000)));
        // 1 s later: 10 tokens back; 11 is refused, with the wait for the missing one.
        assert_eq!(t.reserve(&e(), 11, NOON + 1000).unwrap_err().0, Refused::PerMinute { wait_ms: 100 });
        assert_eq!(t.reserve(&e(), 10, NOON + 1000).unwrap().per_minute, Some((600, 0, 60_000)));
        assert!(t.reserve(&e(), 1, NOON + 1000).is_err(), "the refusal took nothing, the bucket is empty");
    }

    #[test]
    fn usage_settles_the_reservation_and_debt_refuses_until_refilled() {
        let t = Tokens::new(Some(600), None).unwrap();
        t.reserve(&e(), 100, NOON).unwrap();
        // Reported usage 700: 600 - 700 = -100 in debt.
        t.settle(&e(), 100, NOON / DAY_MS, 700, NOON);
        assert_eq!(t.peek(&e(), NOON).per_minute, Some((600, 0, 70_000)));
        // Debt of 100 + 1 token needed: 10.1 s of refill.
        assert_eq!(t.reserve(&e(), 1, NOON).unwrap_err().0, Refused::PerMinute { wait_ms: 10_100 });
        assert!(t.reserve(&e(), 1, NOON + 10_099).is_err());
        assert!(t.reserve(&e(), 1, NOON + 10_100).is_ok());
        // Less used than reserved: the rest comes back (never past the capacity).
        let t = Tokens::new(Some(600), None).unwrap();
        t.reserve(&e(), 500, NOON).unwrap();
        t.settle(&e(), 500, NOON / DAY_MS, 20, NOON);
        assert_eq!(t.peek(&e(), NOON).per_minute.unwrap().1, 580);
    }

    #[test]
    fn five_concurrent_reservations_of_175_on_100_a_minute_admit_one() {
        let t = Tokens::new(Some(100), None).unwrap();
        let amount = t.clamp(175);
        assert_eq!(amount, 100, "one request never reserves more than the limit");
        let admitted = (0..5).filter(|_| t.reserve(&e(), amount, NOON).is_ok()).count();
        assert_eq!(admitted, 1);
    }

    #[test]
    fn the_daily_budget_resets_at_midnight_and_refunds_count() {
        let t = Tokens::new(None, Some(1000)).unwrap();
        let day = (MIDNIGHT - 1) / DAY_MS;
        t.reserve(&e(), 900, MIDNIGHT - 1000).unwrap();
        assert_eq!(t.reserve(&e(), 101, MIDNIGHT - 1000).unwrap_err().0, Refused::Daily { wait_ms: 1000 });
        // Refunded (a request that failed before any byte): the 900 are back.
        t.settle(&e(), 900, day, 0, MIDNIGHT - 500);
        assert_eq!(t.peek(&e(), MIDNIGHT - 500).daily, Some((1000, 1000, 500)));
        t.reserve(&e(), 1000, MIDNIGHT - 400).unwrap();
        assert!(t.reserve(&e(), 1, MIDNIGHT - 1).is_err());
        let left = t.reserve(&e(), 1, MIDNIGHT).unwrap();
        assert_eq!(left.daily, Some((1000, 999, DAY_MS)), "reset at 00:00 UTC");
        // A reservation of yesterday settled today charges only what exceeded it.
        t.settle(&e(), 1000, day, 1200, MIDNIGHT + 1);
        assert_eq!(t.peek(&e(), MIDNIGHT + 1).daily.unwrap().1, 799);
        assert_eq!(t.peek(&e(), MIDNIGHT + 1).used_today, 201);
        // Usage is charged in full: what is counted today may pass the budget (nothing remains).
        t.reserve(&e(), 799, MIDNIGHT + 2).unwrap();
        t.settle(&e(), 799, MIDNIGHT / DAY_MS, 2000, MIDNIGHT + 3);
        let left = t.peek(&e(), MIDNIGHT + 3);
        assert_eq!((left.daily.unwrap().1, left.used_today), (0, 2201));
    }

    #[test]
    fn idle_entities_are_forgotten() {
        let t = Tokens::new(Some(600), None).unwrap();
        t.reserve(&e(), 60, NOON).unwrap();
        t.forget_idle(NOON + 1000);
        assert_eq!(t.states.len(), 1, "still refilling");
        t.forget_idle(NOON + 6000);
        assert_eq!(t.states.len(), 0);
    }
}
