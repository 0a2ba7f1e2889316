//! Requests waiting for an order to move on (`GET /orders/{id}?wait=`), as Consul's
//! blocking queries do: a customer asks once instead of polling. A change committed by
//! this instance wakes its waiters at once, and tells them where the order went, so that
//! a waiter answered with a final order reads only its saga's steps, not the order again;
//! one committed by another instance (replicas share the database, not this map) is seen
//! at the waiter's next look.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use crate::domain::{OrderId, Status};

/// A move of an order this instance committed: from which status, to which, and why.
/// An order never comes back to a status it left, so a waiter that read the order in
/// `from` knows that this move came after its read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Moved {
    pub from: Status,
    pub to: Status,
    pub reason: Option<String>,
}

/// What the waiters of one order share: what wakes them, and the order's last move.
#[derive(Default)]
struct Watched {
    notify: Notify,
    moved: Mutex<Option<Moved>>,
}

/// The orders someone is waiting on in this process, each with what wakes its waiters.
#[derive(Clone, Default)]
pub struct Changes {
    watched: Arc<Mutex<HashMap<OrderId, Arc<Watched>>>>,
}

impl Changes {
    /// Watches order `id` for as long as the returned [`Watch`] lives.
    pub(crate) fn watch(&self, id: &OrderId) -> Watch {
        let watched = self.lock().entry(id.clone()).or_default().clone();
        Watch {
            id: id.clone(),
            watched,
            changes: self.clone(),
        }
    }

    /// Wakes whoever waits on order `id`: it has moved, as `moved` says, committed.
    pub(crate) fn changed(&self, id: &OrderId, moved: Moved) {
        let watched = self.lock().get(id).cloned();
        if let Some(watched) = watched {
            *lock(&watched.moved) = Some(moved);
            watched.notify.notify_waiters();
        }
    }

    /// How many orders are watched (for tests: watches leave nothing behind).
    #[cfg(test)]
    fn watched(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<OrderId, Arc<Watched>>> {
        lock(&self.watched)
    }
}

// What these mutexes guard is only ever left consistent: a panic elsewhere cannot poison
// its meaning.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One waiter's hold on an order's wake-ups; the order is forgotten when its last waiter
/// goes.
pub(crate) struct Watch {
    id: OrderId,
    watched: Arc<Watched>,
    changes: Changes,
}

impl Watch {
    /// Notified when the order changes; enable the future before looking at the order,
    /// so that a change committed meanwhile is not missed.
    pub(crate) fn notify(&self) -> &Notify {
        &self.watched.notify
    }

    /// The move this instance committed out of `from`, if it was the order's last one
    /// while watched.
    pub(crate) fn moved_from(&self, from: Status) -> Option<Moved> {
        lock(&self.watched.moved)
            .as_ref()
            .filter(|moved| moved.from == from)
            .cloned()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut watched = self.changes.lock();
        // Held by the map and by this watch only: no one else waits on the order.
        if Arc::strong_count(&self.watched) == 2 {
            watched.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::time::Duration;

    use super::*;

    fn order(id: &str) -> OrderId {
        id.parse().unwrap()
    }

    fn moved(from: Status, to: Status) -> Moved {
        Moved {
            from,
            to,
            reason: None,
        }
    }

    #[tokio::test]
    async fn a_change_wakes_the_waiters_of_that_order_only_and_watches_leave_nothing_behind() {
        let changes = Changes::default();
        let (a, b) = (
            order("0190e0e0-0000-7000-8000-000000000001"),
            order("0190e0e0-0000-7000-8000-000000000002"),
        );
        let (first, second, other) = (changes.watch(&a), changes.watch(&a), changes.watch(&b));
        assert_eq!(changes.watched(), 2);
        {
            let mut woken_first = pin!(first.notify().notified());
            let mut woken_second = pin!(second.notify().notified());
            let mut woken_other = pin!(other.notify().notified());
            woken_first.as_mut().enable();
            woken_second.as_mut().enable();
            woken_other.as_mut().enable();

            changes.changed(&a, moved(Status::Pending, Status::Confirmed));
            let soon = Duration::from_secs(5);
            tokio::time::timeout(soon, woken_first).await.unwrap();
            tokio::time::timeout(soon, woken_second).await.unwrap();
            let unrelated = tokio::time::timeout(Duration::from_millis(50), woken_other).await;
            assert!(
                unrelated.is_err(),
                "a change to one order wakes no one else"
            );
        }
        assert_eq!(
            first.moved_from(Status::Pending),
            Some(moved(Status::Pending, Status::Confirmed))
        );
        assert_eq!(
            second.moved_from(Status::Pending),
            first.moved_from(Status::Pending)
        );
        assert_eq!(other.moved_from(Status::Pending), None, "b did not move");

        // A change to an order no one watches is nothing.
        changes.changed(
            &order("0190e0e0-0000-7000-8000-000000000003"),
            moved(Status::Pending, Status::Rejected),
        );
        drop(first);
        assert_eq!(
            changes.watched(),
            2,
            "a remains watched by the second waiter"
        );
        drop((second, other));
        assert_eq!(changes.watched(), 0);
    }

    #[test]
    fn a_move_is_told_only_to_a_waiter_that_read_the_order_where_it_moved_from() {
        let changes = Changes::default();
        let a = order("0190e0e0-0000-7000-8000-000000000001");
        let before = changes.watch(&a);
        changes.changed(&a, moved(Status::Pending, Status::Confirmed));
        // Joined while the first still watches: it may have read the order cancelling
        // (cancelled at once after it was confirmed), and the confirmation is older news.
        let later = changes.watch(&a);
        assert_eq!(later.moved_from(Status::Cancelling), None);
        changes.changed(&a, moved(Status::Confirmed, Status::Cancelling));
        assert_eq!(before.moved_from(Status::Pending), None, "moved on since");
        assert_eq!(
            later.moved_from(Status::Confirmed),
            Some(moved(Status::Confirmed, Status::Cancelling))
        );
        drop((before, later));
        // Forgotten with its last waiter: a new one starts with no news.
        assert_eq!(changes.watch(&a).moved_from(Status::Confirmed), None);
    }
}
