//! Deadlines on long-lived timers. A connection's timer is set once and moved on only
//! when it would fire after the deadline it now guards, or when it fires before that
//! deadline: setting it afresh for every request cost a timer-wheel removal and insertion
//! each (ARCHITECTURE.md, "Time").

use std::pin::Pin;
use std::time::Instant;

use tokio::time::Sleep;

/// Completes once `at` has passed, on `timer`; moves it only as described above.
pub(crate) async fn expire(mut timer: Pin<&mut Sleep>, at: Instant) {
    let at_tokio = tokio::time::Instant::from_std(at);
    if timer.deadline() > at_tokio {
        timer.as_mut().reset(at_tokio);
    }
    loop {
        timer.as_mut().await;
        // Fired at its own deadline, on tokio's clock (which tests may pause): the wait is
        // over unless that deadline was an earlier one.
        if timer.deadline() >= at_tokio {
            return;
        }
        timer.as_mut().reset(at_tokio);
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn an_early_timer_waits_for_the_deadline() {
        let started = Instant::now();
        // Set for an earlier request: it fires first, and the deadline still holds.
        let mut timer = pin!(tokio::time::sleep(Duration::from_millis(10)));
        expire(timer.as_mut(), started + Duration::from_millis(120)).await;
        assert!(started.elapsed() >= Duration::from_millis(120));
    }

    #[tokio::test]
    async fn a_late_timer_is_brought_forward() {
        let started = Instant::now();
        let mut timer = pin!(tokio::time::sleep(Duration::from_secs(60)));
        tokio::time::timeout(
            Duration::from_secs(5),
            expire(timer.as_mut(), started + Duration::from_millis(50)),
        )
        .await
        .expect("the deadline, not the timer's first setting, decides");
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn a_fired_timer_is_set_again_for_the_next_deadline() {
        let mut timer = pin!(tokio::time::sleep(Duration::from_millis(1)));
        expire(timer.as_mut(), Instant::now()).await;
        // Elapsed now: polling it alone would complete at once.
        let started = Instant::now();
        expire(timer.as_mut(), started + Duration::from_millis(80)).await;
        assert!(started.elapsed() >= Duration::from_millis(80));
    }
}
