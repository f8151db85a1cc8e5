//! When to sync, as kube-proxy's bounded-frequency runner: a change is applied at once unless the last
//! sync was less than `--min-sync-period` ago (changes arriving meanwhile are applied together);
//! without changes the maps are fully reconciled every `--sync-period`; a failed sync is retried with
//! exponential backoff (capped at the sync period) as a full sync.

use std::time::{Duration, Instant};

/// The first retry delay after a failed sync.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct Schedule {
    min_period: Duration,
    period: Duration,
    last: Option<Instant>,
    /// A change has arrived since the last sync.
    pending: bool,
    /// After a failure: when to retry, and the delay after that.
    retry_at: Option<Instant>,
    backoff: Duration,
}

/// A sync that is due: when, and whether it must re-read the maps (full).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub at: Instant,
    pub full: bool,
}

impl Schedule {
    pub fn new(min_period: Duration, period: Duration) -> Self {
        Self { min_period, period, last: None, pending: false, retry_at: None, backoff: FIRST_RETRY }
    }

    /// A change arrived (the first one is the initial list: nothing syncs before it).
    pub fn changed(&mut self) {
        self.pending = true;
    }

    /// The next sync, if one can be due (none before the initial list has arrived).
    pub fn next(&self) -> Option<Due> {
        if let Some(at) = self.retry_at {
            return Some(Due { at, full: true });
        }
        match self.last {
            None if self.pending => Some(Due { at: Instant::now(), full: false }),
            None => None,
            Some(last) if self.pending => Some(Due { at: last + self.min_period, full: false }),
            Some(last) => Some(Due { at: last + self.period, full: true }),
        }
    }

    /// Records a sync that ran at `at`.
    pub fn ran(&mut self, at: Instant, ok: bool) {
        self.last = Some(at);
        self.pending = false;
        if ok {
            self.retry_at = None;
            self.backoff = FIRST_RETRY;
        } else {
            self.retry_at = Some(at + self.backoff);
            self.backoff = (self.backoff * 2).min(self.period);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_wait_for_the_initial_list_and_the_minimum_period() {
        let (min, period) = (Duration::from_secs(1), Duration::from_secs(30));
        let mut s = Schedule::new(min, period);
        assert_eq!(s.next(), None, "nothing syncs before the initial list");
        s.changed();
        assert!(!s.next().unwrap().full);
        let t0 = Instant::now();
        s.ran(t0, true);
        assert_eq!(s.next(), Some(Due { at: t0 + period, full: true }), "idle: periodic full resync");
        s.changed();
        s.changed();
        assert_eq!(s.next(), Some(Due { at: t0 + min, full: false }), "coalesced, not before the minimum period");
    }

    #[test]
    fn failures_retry_as_full_syncs_with_capped_backoff() {
        let (min, period) = (Duration::from_secs(1), Duration::from_secs(5));
        let mut s = Schedule::new(min, period);
        s.changed();
        let t = Instant::now();
        let mut delays = Vec::new();
        for _ in 0..5 {
            s.ran(t, false);
            let due = s.next().unwrap();
            assert!(due.full);
            delays.push((due.at - t).as_secs());
        }
        assert_eq!(delays, [1, 2, 4, 5, 5]);
        s.changed();
        assert!(s.next().unwrap().full, "a change during backoff waits for the full retry");
        s.ran(t, true);
        assert_eq!(s.next(), Some(Due { at: t + period, full: true }));
    }
}
