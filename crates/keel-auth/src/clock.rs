//! Time as the server sees it, passed in so that tests can move it (expiry of codes,
//! tokens and keys) instead of sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch: the system's, plus an offset that only tests set.
#[derive(Clone, Default)]
pub struct Clock {
    offset: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock a test moves forward with [`Clock::advance`].
    pub fn adjustable() -> Self {
        Self {
            offset: Some(Arc::new(AtomicI64::new(0))),
        }
    }

    pub fn now(&self) -> i64 {
        let system = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| {
                i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
            });
        system
            + self
                .offset
                .as_ref()
                .map_or(0, |o| o.load(Ordering::Relaxed))
    }

    /// Moves an adjustable clock forward by `seconds`; the system clock ignores it.
    pub fn advance(&self, seconds: i64) {
        if let Some(offset) = &self.offset {
            offset.fetch_add(seconds, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adjustable_clock_moves_and_the_system_clock_does_not() {
        let clock = Clock::adjustable();
        let before = clock.now();
        clock.advance(3600);
        assert!(clock.now() >= before + 3600);
        let system = Clock::system();
        system.advance(3600);
        assert!(system.now() < before + 3600);
    }
}
