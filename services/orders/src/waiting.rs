//! Requests waiting for an order to move on (`GET /orders/{id}?wait=`), as Consul's
//! blocking queries do: a customer asks once instead of polling. A change committed by
//! this instance wakes its waiters at once; one committed by another instance (replicas
//! share the database, not this map) is seen at the waiter's next look.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use crate::domain::OrderId;

/// The orders someone is waiting on in this process, each with what wakes its waiters.
#[derive(Clone, Default)]
pub struct Changes {
    watched: Arc<Mutex<HashMap<OrderId, Arc<Notify>>>>,
}

impl Changes {
    /// Watches order `id` for as long as the returned [`Watch`] lives.
    pub(crate) fn watch(&self, id: &OrderId) -> Watch {
        let notify = self.lock().entry(id.clone()).or_default().clone();
        Watch {
            id: id.clone(),
            notify,
            changes: self.clone(),
        }
    }

    /// Wakes whoever waits on order `id` (it has moved; they look again).
    pub(crate) fn changed(&self, id: &OrderId) {
        if let Some(notify) = self.lock().get(id) {
            notify.notify_waiters();
        }
    }

    /// How many orders are watched (for tests: watches leave nothing behind).
    #[cfg(test)]
    fn watched(&self) -> usize {
        self.lock().len()
    }

    // The map is only ever left consistent: a panic elsewhere cannot poison its meaning.
    fn lock(&self) -> MutexGuard<'_, HashMap<OrderId, Arc<Notify>>> {
        self.watched.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One waiter's hold on an order's wake-ups; the order is forgotten when its last waiter
/// goes.
pub(crate) struct Watch {
    id: OrderId,
    notify: Arc<Notify>,
    changes: Changes,
}

impl Watch {
    /// Notified when the order changes; enable the future before looking at the order,
    /// so that a change committed meanwhile is not missed.
    pub(crate) fn notify(&self) -> &Notify {
        &self.notify
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut watched = self.changes.lock();
        // Held by the map and by this watch only: no one else waits on the order.
        if Arc::strong_count(&self.notify) == 2 {
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

            changes.changed(&a);
            let soon = Duration::from_secs(5);
            tokio::time::timeout(soon, woken_first).await.unwrap();
            tokio::time::timeout(soon, woken_second).await.unwrap();
            let unrelated = tokio::time::timeout(Duration::from_millis(50), woken_other).await;
            assert!(
                unrelated.is_err(),
                "a change to one order wakes no one else"
            );
        }

        // A change to an order no one watches is nothing.
        changes.changed(&order("0190e0e0-0000-7000-8000-000000000003"));
        drop(first);
        assert_eq!(
            changes.watched(),
            2,
            "a remains watched by the second waiter"
        );
        drop((second, other));
        assert_eq!(changes.watched(), 0);
    }
}
