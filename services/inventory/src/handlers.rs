//! The inventory's command handlers: each does its command inside the consumer's
//! transaction and stages the reply in it, so the answer leaves if and only if the work
//! commits.

use keel_sdk::events::{Bus, Consumer, Reply};
use keel_sdk::service::ServiceError;
use keel_sdk::{Database, Handler, HandlerError, Received, Tx};
use serde_json::json;

use crate::contract::{Commit, Release, Reserve};
use crate::domain::{Command, ReservationId};
use crate::{Inventory, Refused};

/// The consumer of the inventory's commands (group `inventory`).
pub async fn consumer(
    inventory: &Inventory,
    bus: &Bus,
    db: &Database,
) -> Result<Consumer, ServiceError> {
    let commands = Commands {
        inventory: inventory.clone(),
        bus: bus.clone(),
    };
    bus.consumer("inventory", db)
        .on::<Reserve, _>(commands.clone())
        .on::<Release, _>(commands.clone())
        .on::<Commit, _>(commands)
        .start()
        .await
        // Commands are idempotent by their business key and a saga has one in flight at a
        // time: they need no order, and are handled in batches, one transaction each. One
        // batch at a time in a process: a batch holds the stock rows it locked until it
        // commits, and two at once could lock them in different orders (a command locks
        // its own lines in one statement, in the database's order; a batch cannot). The
        // expiry sweep, or another replica's batch, still can: PostgreSQL breaks that
        // deadlock after a second, and the batch is handled one by one (or the sweep tries
        // again next time).
        .map(|consumer| consumer.batch(16))
        .map_err(|error| ServiceError::bus("inventory", error))
}

#[derive(Clone)]
struct Commands {
    inventory: Inventory,
    bus: Bus,
}

impl Commands {
    async fn answer<E>(
        &self,
        tx: &mut Tx,
        received: &Received<E>,
        id: &ReservationId,
        outcome: Result<(), Refused>,
    ) -> Result<(), HandlerError> {
        let reply = match outcome {
            Ok(()) => Reply::done(json!({ "reservation": id })),
            Err(refused) => Reply::refused(refused),
        };
        self.bus
            .reply(tx, received, &reply)
            .await
            .map_err(HandlerError::bus)
    }

    async fn apply<E>(
        &self,
        tx: &mut Tx,
        received: &Received<E>,
        id: &ReservationId,
        command: Command,
    ) -> Result<(), HandlerError> {
        let outcome = self.inventory.apply(tx, id, command).await?;
        self.answer(tx, received, id, outcome.map(drop)).await
    }
}

impl Handler<Reserve> for Commands {
    async fn handle(&self, tx: &mut Tx, received: Received<Reserve>) -> Result<(), HandlerError> {
        let outcome = self.inventory.reserve(tx, &received.event).await?;
        let id = received.event.reservation.clone();
        self.answer(tx, &received, &id, outcome).await
    }
}

impl Handler<Release> for Commands {
    async fn handle(&self, tx: &mut Tx, received: Received<Release>) -> Result<(), HandlerError> {
        let id = received.event.reservation.clone();
        self.apply(tx, &received, &id, Command::Release).await
    }
}

impl Handler<Commit> for Commands {
    async fn handle(&self, tx: &mut Tx, received: Received<Commit>) -> Result<(), HandlerError> {
        let id = received.event.reservation.clone();
        self.apply(tx, &received, &id, Command::Commit).await
    }
}
