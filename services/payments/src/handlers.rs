//! The payments command handlers: each does its command inside the consumer's
//! transaction and stages the reply in it. A provider failure is retried by the bus (with
//! growing delays); a refusal is answered.

use keel_sdk::events::{Bus, Consumer, Reply};
use keel_sdk::service::ServiceError;
use keel_sdk::{Database, Handler, HandlerError, Received, Tx};

use crate::contract::{Authorize, Capture, Payment, Void};
use crate::domain::{Command, Refusal};
use crate::{Payments, PaymentsError};

/// The consumer of the payments commands (group `payments`).
pub async fn consumer(
    payments: &Payments,
    bus: &Bus,
    db: &Database,
) -> Result<Consumer, ServiceError> {
    let commands = Commands {
        payments: payments.clone(),
        bus: bus.clone(),
    };
    bus.consumer("payments", db)
        .on::<Authorize, _>(commands.clone())
        .on::<Capture, _>(commands.clone())
        .on::<Void, _>(commands)
        .start()
        .await
        // Commands are idempotent by their business key and a saga has one in flight at a
        // time: they need no order, and are handled several at once, in small batches of
        // one transaction each (small: a batch calls the provider once per command, one
        // after the other).
        .map(|consumer| consumer.concurrency(8).batch(4))
        .map_err(|error| ServiceError::bus("payments", error))
}

#[derive(Clone)]
struct Commands {
    payments: Payments,
    bus: Bus,
}

impl Commands {
    async fn answer<E>(
        &self,
        tx: &mut Tx,
        received: &Received<E>,
        outcome: Result<Result<Payment, Refusal>, PaymentsError>,
    ) -> Result<(), HandlerError> {
        let reply = match outcome? {
            Ok(payment) => Reply::done(&payment),
            // An HTTP request is asking the provider under this id: its answer will do.
            Err(Refusal::InProgress) => {
                return Err(HandlerError::Retry(Refusal::InProgress.to_string()));
            }
            Err(refused) => Reply::refused(refused),
        };
        self.bus
            .reply(tx, received, &reply)
            .await
            .map_err(HandlerError::bus)
    }
}

impl Handler<Authorize> for Commands {
    async fn handle(&self, tx: &mut Tx, received: Received<Authorize>) -> Result<(), HandlerError> {
        let Authorize {
            payment,
            amount,
            method,
        } = &received.event;
        let outcome = self.payments.authorize(tx, payment, *amount, method).await;
        self.answer(tx, &received, outcome).await
    }
}

impl Handler<Capture> for Commands {
    async fn handle(&self, tx: &mut Tx, received: Received<Capture>) -> Result<(), HandlerError> {
        let outcome = self
            .payments
            .apply(
                tx,
                &received.event.payment,
                Command::Capture,
                received.event.amount,
            )
            .await;
        self.answer(tx, &received, outcome).await
    }
}

impl Handler<Void> for Commands {
    async fn handle(&self, tx: &mut Tx, received: Received<Void>) -> Result<(), HandlerError> {
        let outcome = self
            .payments
            .apply(
                tx,
                &received.event.payment,
                Command::Void,
                received.event.amount,
            )
            .await;
        self.answer(tx, &received, outcome).await
    }
}
