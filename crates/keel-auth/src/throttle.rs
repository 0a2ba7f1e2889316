//! Failed sign-ins per network address, in this process: after `limit` failures within
//! `window` an address is refused until the window has passed. Accounts are locked in
//! the database (shared by every server); this only slows one source spraying many
//! accounts, so each server counting on its own is enough.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};

/// Addresses remembered at most; beyond it the stale ones are dropped, then all.
const MAX_ADDRESSES: usize = 100_000;

pub struct AddressFailures {
    limit: u32,
    window: i64,
    /// Address → (start of its window, failures in it).
    seen: Mutex<HashMap<IpAddr, (i64, u32)>>,
}

impl AddressFailures {
    pub fn new(limit: u32, window: i64) -> Self {
        Self {
            limit: limit.max(1),
            window: window.max(1),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `address` has used up its failures.
    pub fn blocked(&self, address: IpAddr, now: i64) -> bool {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.get(&address)
            .is_some_and(|(start, count)| now - start < self.window && *count >= self.limit)
    }

    pub fn record(&self, address: IpAddr, now: i64) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.len() >= MAX_ADDRESSES {
            seen.retain(|_, (start, _)| now - *start < self.window);
            if seen.len() >= MAX_ADDRESSES {
                seen.clear();
            }
        }
        let entry = seen.entry(address).or_insert((now, 0));
        if now - entry.0 >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_refused_after_its_failures_until_the_window_passes() {
        let failures = AddressFailures::new(3, 600);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(!failures.blocked(a, 100));
            failures.record(a, 100);
        }
        assert!(failures.blocked(a, 100));
        assert!(!failures.blocked(b, 100), "per address");
        assert!(!failures.blocked(a, 700), "the window passed");
        failures.record(a, 700);
        assert!(!failures.blocked(a, 700), "a new window starts");
    }
}
