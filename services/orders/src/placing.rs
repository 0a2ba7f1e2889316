//! The order saga: reserve the stock, authorize the payment, commit the reservation,
//! capture the payment. On a refusal or a step's timeout the done steps are undone
//! (release, void) and the order is rejected with the reason; when the saga ends, the
//! order is settled in the same transaction.

use std::time::Duration;

use keel_inventory::contract::{Commit, Release, Reserve};
use keel_inventory::domain::Lines;
use keel_payments::contract::{Authorize, Capture, Void};
use keel_payments::domain::PaymentMethod;
use keel_sdk::events::Bus;
use keel_sdk::saga::{Ended, OnEnd, Saga, SagaStatus, Step};
use keel_sdk::{HandlerError, Tx};
use serde::{Deserialize, Serialize};

use crate::Changes;
use crate::contract::OrderChanged;
use crate::domain::{self, CustomerId, Money, OrderId, Outcome, Status};

/// What the saga carries: everything its commands need.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Placing {
    pub order: OrderId,
    pub customer: CustomerId,
    pub lines: Lines,
    pub total: Money,
    pub method: PaymentMethod,
}

/// How long a reservation holds while the saga runs: far longer than its steps take.
const HOLD_SECONDS: u32 = 600;

/// The saga, each step allowed `step_timeout` for its reply.
pub fn saga(bus: &Bus, changes: &Changes, step_timeout: Duration) -> Saga<Placing> {
    // Reservation and payment are named after the order: every command is idempotent by it.
    Saga::new("order")
        .step(
            Step::new("reserve", |placing: &Placing, _| Reserve {
                reservation: placing.order.clone(),
                lines: placing.lines.clone(),
                hold_seconds: Some(HOLD_SECONDS),
            })
            // Releases a held reservation, or restocks a committed one.
            .compensate(|placing: &Placing, _| Release {
                reservation: placing.order.clone(),
            })
            .timeout(step_timeout),
        )
        .step(
            Step::new("authorize", |placing: &Placing, _| Authorize {
                payment: placing.order.clone(),
                amount: placing.total,
                method: placing.method.clone(),
            })
            // Voids an authorization, or refunds a capture.
            .compensate(|placing: &Placing, _| Void {
                payment: placing.order.clone(),
                amount: Some(placing.total),
            })
            .timeout(step_timeout),
        )
        .step(
            Step::new("commit", |placing: &Placing, _| Commit {
                reservation: placing.order.clone(),
            })
            .timeout(step_timeout),
        )
        .step(
            Step::new("capture", |placing: &Placing, _| Capture {
                payment: placing.order.clone(),
                amount: Some(placing.total),
            })
            .timeout(step_timeout),
        )
        .on_end(Settle {
            bus: bus.clone(),
            changes: changes.clone(),
        })
}

/// Settles the order when its saga ends.
struct Settle {
    bus: Bus,
    changes: Changes,
}

impl OnEnd<Placing> for Settle {
    async fn ended(&self, tx: &mut Tx, ended: Ended<'_, Placing>) -> Result<(), HandlerError> {
        let outcome = match ended.status {
            SagaStatus::Completed => Outcome::Completed,
            _ => Outcome::Undone(ended.error.unwrap_or("the saga failed").to_owned()),
        };
        if ended.status == SagaStatus::Failed {
            // The saga no longer fits its definition (a deploy changed it): the order is
            // rejected, and someone must look at what was done.
            tracing::error!(order = %ended.data.order, reason = ?ended.error, "order saga failed");
        }
        let (status, reason) = domain::settle(&outcome);
        let placing = ended.data;
        let changed = OrderChanged {
            order: placing.order,
            customer: placing.customer,
            status,
            total: placing.total,
            reason,
        };
        crate::move_order(tx, &self.bus, &self.changes, Status::Pending, &changed).await?;
        Ok(())
    }
}

/// What the cancellation saga carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cancelling {
    pub order: OrderId,
    pub customer: CustomerId,
    pub total: Money,
    pub reason: String,
}

/// The cancellation of a confirmed order: refund the payment (a void of a captured
/// payment refunds it), then return the units to stock (a release of a committed
/// reservation restocks it). Both are idempotent and never refused, so each is sent again
/// until it is done, however long its participant is away; the order stays cancelling
/// meanwhile.
pub fn cancellation(bus: &Bus, changes: &Changes, step_timeout: Duration) -> Saga<Cancelling> {
    Saga::new("order-cancel")
        .step(
            Step::new("refund", |cancelling: &Cancelling, _| Void {
                payment: cancelling.order.clone(),
                amount: Some(cancelling.total),
            })
            .timeout(step_timeout)
            .resend_on_timeout(),
        )
        .step(
            Step::new("restock", |cancelling: &Cancelling, _| Release {
                reservation: cancelling.order.clone(),
            })
            .timeout(step_timeout)
            .resend_on_timeout(),
        )
        .on_end(Cancelled {
            bus: bus.clone(),
            changes: changes.clone(),
        })
}

/// Settles a cancellation when its saga ends.
struct Cancelled {
    bus: Bus,
    changes: Changes,
}

impl OnEnd<Cancelling> for Cancelled {
    async fn ended(&self, tx: &mut Tx, ended: Ended<'_, Cancelling>) -> Result<(), HandlerError> {
        let cancelling = ended.data;
        if ended.status != SagaStatus::Completed {
            // Refused (or broken): the money or the units may be back already, so the
            // order is not confirmed again; it stays cancelling for someone to look at.
            tracing::error!(order = %cancelling.order, reason = ?ended.error, "order cancellation failed");
            return Ok(());
        }
        let changed = OrderChanged {
            order: cancelling.order,
            customer: cancelling.customer,
            status: Status::Cancelled,
            total: cancelling.total,
            reason: Some(cancelling.reason),
        };
        crate::move_order(tx, &self.bus, &self.changes, Status::Cancelling, &changed).await?;
        Ok(())
    }
}
