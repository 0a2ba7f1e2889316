//! The reference shop's payments service: authorize, capture and void against a simulated
//! payment provider ([`provider`]), each idempotent by the payment's id.
//!
//! The order saga sends its commands over the bus ([`contract`]) and gets replies; the
//! back office uses the HTTP API ([`api`]), where the payment's id is the request's
//! `Idempotency-Key`. `domain` holds the rules (no I/O); `store` the SQL; [`build`] puts
//! them together on the SDK's bootstrap.

pub mod api;
pub mod contract;
pub mod domain;
mod handlers;
pub mod provider;
mod store;

use std::time::Duration;

use keel_runtime::Shutdown;
use keel_sdk::data::unix_seconds;
use keel_sdk::events::{Bus, BusError};
use keel_sdk::service::{RunningService, Service, ServiceConfig, ServiceError};
use keel_sdk::{Database, Migrations, Tx};
use keel_shop_kernel::Money;
use tokio_util::task::TaskTracker;

use crate::contract::Payment;
use crate::domain::{Action, Command, PaymentId, PaymentMethod, Refusal, Status};
use crate::provider::{Decision, Provider, ProviderConfig, ProviderFailure};
pub use crate::store::StoreError;
use crate::store::{Claim, Stored};

/// How long an HTTP request's claim on a payment id stands before another request with
/// the same key may take it over (its owner presumably gone): well beyond the provider's
/// longest call (its latency is at most 2 s).
const CLAIM_STANDS: i64 = 10;

/// Where the payments service listens unless configured otherwise.
pub const DEFAULT_LISTEN: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8103);

pub static MIGRATIONS: Migrations = Migrations {
    postgres: sqlx::migrate!("migrations/postgres"),
    sqlite: sqlx::migrate!("migrations/sqlite"),
};

/// Why a payment operation failed (not a refusal: something is broken or away).
#[derive(Debug, thiserror::Error)]
pub enum PaymentsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the change cannot be published: {0}")]
    Bus(#[from] BusError),
    /// Nothing was done: worth asking again later.
    #[error(transparent)]
    Provider(#[from] ProviderFailure),
    /// The work was stopped before it finished (the runtime shutting down).
    #[error("stopped before it finished: {0}")]
    Interrupted(String),
}

impl From<keel_sdk::sqlx::Error> for PaymentsError {
    fn from(error: keel_sdk::sqlx::Error) -> Self {
        Self::Store(StoreError::Database(error))
    }
}

/// The payments use cases.
#[derive(Clone)]
pub struct Payments {
    db: Database,
    bus: Bus,
    provider: Provider,
    /// The provider calls (and their saves) of HTTP requests, which go on when their
    /// request is dropped: waited for at shutdown.
    in_flight: TaskTracker,
}

impl Payments {
    pub fn new(db: Database, bus: Bus, provider: Provider) -> Self {
        Self {
            db,
            bus,
            provider,
            in_flight: TaskTracker::new(),
        }
    }

    /// Completes once every authorization in flight has been decided and saved (or has
    /// failed), so that stopping the process leaves no claim behind that a request, still
    /// waiting on its provider when its client went away, would have finished.
    /// Authorizations started meanwhile are waited for too.
    pub async fn settled(&self) {
        self.in_flight.close();
        self.in_flight.wait().await;
    }

    pub fn db(&self) -> &Database {
        &self.db
    }

    /// Payment `id`, as stored (none while its authorization is still being asked).
    pub async fn payment(&self, id: &PaymentId) -> Result<Option<Payment>, PaymentsError> {
        let mut connection = self.db.pool().acquire().await?;
        Ok(match store::get(&mut connection, id, false).await? {
            Some(Stored::Payment(payment)) => Some(payment),
            Some(Stored::Claimed(_)) | None => None,
        })
    }

    /// Authorizes `amount` on `method` as payment `id` within `tx` (a command's). Asked
    /// again, the payment is answered as it is now (authorized, captured, voided or
    /// refunded; a decline again) without asking the provider; asked for another amount or
    /// method, or after a void that came first, refused.
    ///
    /// The provider is called inside `tx` (its row claimed and locked): concurrent
    /// commands for one payment wait for the first and get its answer. An HTTP request's
    /// claim on the id (see [`Payments::authorize_now`]) is waited out (in progress), or
    /// taken over once it stands too long.
    pub async fn authorize(
        &self,
        tx: &mut Tx,
        id: &PaymentId,
        amount: Money,
        method: &PaymentMethod,
    ) -> Result<Result<Payment, Refusal>, PaymentsError> {
        let now = unix_seconds();
        if !store::claim(tx, id, None, now).await? {
            match store::get(tx, id, true).await? {
                Some(Stored::Payment(stored)) => return Ok(again(stored, amount, method)),
                Some(Stored::Claimed(claim)) => {
                    if let Some(refused) = take_over(tx, id, claim, amount, method, now).await? {
                        return Ok(Err(refused));
                    }
                }
                // A request's claim given up between the insert and the read: try again.
                None => return Ok(Err(Refusal::InProgress)),
            }
        }
        // A failure here rolls the claim back with the transaction: nothing happened.
        let decision = self.provider.authorize(id, method).await?;
        self.record(tx, id, amount, method, decision).await
    }

    /// Authorizes `amount` on `method` as payment `id` for an HTTP request, answering as
    /// [`Payments::authorize`] does, but holding no transaction of its own while the
    /// provider is asked: the claim (with the amount and method) is committed first, so
    /// that a concurrent request with the same id is told at once (in progress, or another
    /// body) instead of waiting for the provider. (A command holding the id's row still
    /// makes the request wait for its transaction.) A claim left by a request that died
    /// mid-call is taken over by the same request again once it is `CLAIM_STANDS` old; a
    /// provider failure gives the claim up (nothing was done).
    pub async fn authorize_now(
        &self,
        id: &PaymentId,
        amount: Money,
        method: &PaymentMethod,
    ) -> Result<Result<Payment, Refusal>, PaymentsError> {
        let now = unix_seconds();
        if let Some(answer) = self.claim_now(id, amount, method, now).await? {
            return Ok(answer);
        }
        // Claimed: the call and its decision's save go on even if the request is dropped
        // (its client gone), and shutdown waits for them (`settled`). A claim left anyway
        // (a crash, a save that failed) is finished by whatever meets it once it is old:
        // this request again, a command, a capture or a void.
        let payments = self.clone();
        let (id, method) = (id.clone(), method.clone());
        let decided = self
            .in_flight
            .spawn(async move { payments.decide(&id, amount, &method, now).await });
        match decided.await {
            Ok(answer) => answer,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(error) => Err(PaymentsError::Interrupted(error.to_string())),
        }
    }

    /// Claims `id` for `amount` on `method` and commits the claim: `None` when claimed (or
    /// taken over), else the answer for the request.
    async fn claim_now(
        &self,
        id: &PaymentId,
        amount: Money,
        method: &PaymentMethod,
        now: i64,
    ) -> Result<Option<Result<Payment, Refusal>>, PaymentsError> {
        // Twice at most: a claim given up between the insert and the read frees the id.
        for _ in 0..2 {
            let mut tx = self.db.begin().await?;
            if !store::claim(&mut tx, id, Some((amount, method)), now).await? {
                let refused = match store::get(&mut tx, id, false).await? {
                    Some(Stored::Payment(stored)) => {
                        return Ok(Some(again(stored, amount, method)));
                    }
                    Some(Stored::Claimed(claim)) => {
                        take_over(&mut tx, id, claim, amount, method, now).await?
                    }
                    None => continue,
                };
                if let Some(refused) = refused {
                    return Ok(Some(Err(refused)));
                }
            }
            tx.commit().await?;
            return Ok(None);
        }
        Ok(Some(Err(Refusal::InProgress)))
    }

    /// Asks the provider for `id`, claimed at `since`, and keeps its decision.
    async fn decide(
        &self,
        id: &PaymentId,
        amount: Money,
        method: &PaymentMethod,
        since: i64,
    ) -> Result<Result<Payment, Refusal>, PaymentsError> {
        let decision = match self.provider.authorize(id, method).await {
            Ok(decision) => decision,
            Err(failure) => {
                if let Err(error) = self.release(id, since).await {
                    tracing::warn!(%id, %error, "a failed authorization's claim stays until it is taken over");
                }
                return Err(failure.into());
            }
        };
        // Twice at most: a claim given up between the insert and the read frees the id.
        for _ in 0..2 {
            let mut tx = self.db.begin().await?;
            // The id freed meanwhile (the claim taken over by a request whose provider
            // call failed): claimed again, now with the decision.
            let answer =
                if store::claim(&mut tx, id, Some((amount, method)), unix_seconds()).await? {
                    self.record(&mut tx, id, amount, method, decision).await?
                } else {
                    match store::get(&mut tx, id, true).await? {
                        // Ours, or another request's for the same payment that has not answered
                        // yet: the provider, asked twice with one id, decides once.
                        Some(Stored::Claimed(claim)) if claim.is_for(amount, method) => {
                            self.record(&mut tx, id, amount, method, decision).await?
                        }
                        Some(Stored::Claimed(_)) => Err(Refusal::KeyReused),
                        Some(Stored::Payment(stored)) => again(stored, amount, method),
                        None => continue,
                    }
                };
            tx.commit().await?;
            return Ok(answer);
        }
        Err(vanished(id))
    }

    /// Writes the payment the provider's `decision` makes, with its event: the answer.
    async fn record(
        &self,
        tx: &mut Tx,
        id: &PaymentId,
        amount: Money,
        method: &PaymentMethod,
        decision: Decision,
    ) -> Result<Result<Payment, Refusal>, PaymentsError> {
        let payment = decided(id, amount, method, decision);
        self.save(tx, &payment).await?;
        Ok(outcome(payment))
    }

    /// Captures or voids payment `id` within `tx`. A void of a payment not authorized yet
    /// leaves a tombstone that refuses the authorization when it comes.
    pub async fn apply(
        &self,
        tx: &mut Tx,
        id: &PaymentId,
        command: Command,
        expected: Option<Money>,
    ) -> Result<Result<Payment, Refusal>, PaymentsError> {
        // Three times at most: an old claim is finished first, and a tombstone's insert can
        // lose to the authorization's own claim, which is then there to be read.
        for _ in 0..3 {
            let row = store::get(tx, id, true).await?;
            if let Some(Stored::Claimed(claim)) = row {
                if let Some(refused) = self.finish(tx, id, claim).await? {
                    return Ok(Err(refused));
                }
                continue;
            }
            let Some(Stored::Payment(mut payment)) = row else {
                if command == Command::Capture {
                    return Ok(Err(Refusal::Unknown(id.clone())));
                }
                if store::claim(tx, id, None, unix_seconds()).await? {
                    let tombstone = Payment {
                        id: id.clone(),
                        status: Status::Voided,
                        amount: None,
                        method: None,
                        decline_reason: None,
                    };
                    self.save(tx, &tombstone).await?;
                    return Ok(Ok(tombstone));
                }
                continue;
            };
            // A command naming a payment made for another amount is not this payment's.
            if expected
                .is_some_and(|expected| payment.amount.is_some_and(|amount| amount != expected))
            {
                return Ok(Err(Refusal::OtherAmount));
            }
            let (next, action) = match domain::transition(payment.status, command) {
                Ok(moved) => moved,
                Err(refused) => return Ok(Err(refused.into())),
            };
            let what = match action {
                Action::Nothing => None,
                Action::Capture => Some("capture"),
                Action::Void => Some("void"),
                Action::Refund => Some("refund"),
            };
            if let (Some(what), Some(method)) = (what, &payment.method) {
                self.provider.settle(id, method, what).await?;
            }
            if next != payment.status {
                payment.status = next;
                self.save(tx, &payment).await?;
            }
            return Ok(Ok(payment));
        }
        Err(StoreError::Corrupt(format!("payment {id} cannot be read back")).into())
    }

    /// Finishes a request's claim on `id` that stands too long (its request presumably
    /// gone): asks the provider what the request asked (it answers a payment id as it did
    /// before) and keeps the decision; an answer in progress while the claim is young.
    async fn finish(
        &self,
        tx: &mut Tx,
        id: &PaymentId,
        claim: Claim,
    ) -> Result<Option<Refusal>, PaymentsError> {
        let (Some(amount), Some(method)) = (claim.amount, claim.method.clone()) else {
            return Ok(Some(Refusal::InProgress));
        };
        if let Some(refused) = take_over(tx, id, claim, amount, &method, unix_seconds()).await? {
            return Ok(Some(refused));
        }
        let decision = self.provider.authorize(id, &method).await?;
        // A decline is kept too: the command then meets a declined payment.
        let _ = self.record(tx, id, amount, &method, decision).await?;
        Ok(None)
    }

    /// Gives up the claim on `id` made at `since`.
    async fn release(&self, id: &PaymentId, since: i64) -> Result<(), PaymentsError> {
        let mut connection = self.db.pool().acquire().await?;
        Ok(store::release(&mut connection, id, since).await?)
    }

    /// Writes `payment` and stages its event.
    async fn save(&self, tx: &mut Tx, payment: &Payment) -> Result<(), PaymentsError> {
        store::save(tx, payment, unix_seconds()).await?;
        self.bus.stage(tx, payment).await?;
        Ok(())
    }
}

/// The payment the provider's `decision` makes.
fn decided(id: &PaymentId, amount: Money, method: &PaymentMethod, decision: Decision) -> Payment {
    let (status, decline_reason) = match decision {
        Decision::Approved => (Status::Authorized, None),
        Decision::Declined(reason) => (Status::Declined, Some(reason)),
    };
    Payment {
        id: id.clone(),
        status,
        amount: Some(amount),
        method: Some(method.clone()),
        decline_reason,
    }
}

/// A new payment as an answer: declined is a refusal.
fn outcome(payment: Payment) -> Result<Payment, Refusal> {
    match payment.status {
        Status::Declined => Err(Refusal::Declined(
            payment.decline_reason.clone().unwrap_or_default(),
        )),
        _ => Ok(payment),
    }
}

/// An authorization asked again of the payment `stored` under its id.
fn again(stored: Payment, amount: Money, method: &PaymentMethod) -> Result<Payment, Refusal> {
    let previous = stored.amount.zip(stored.method.as_ref());
    domain::authorize_again(
        stored.status,
        previous,
        amount,
        method,
        stored.decline_reason.as_deref(),
    )
    .map(|()| stored)
}

/// What a request for `amount` on `method` makes of another's claim on `id` (its amount,
/// method and time): `None` when it took the claim over (its owner presumably gone), else
/// the refusal (another body; or in progress).
async fn take_over(
    tx: &mut Tx,
    id: &PaymentId,
    claim: Claim,
    amount: Money,
    method: &PaymentMethod,
    now: i64,
) -> Result<Option<Refusal>, PaymentsError> {
    if !claim.is_for(amount, method) {
        return Ok(Some(Refusal::KeyReused));
    }
    if now - claim.since < CLAIM_STANDS || !store::take_over(tx, id, claim.since, now).await? {
        return Ok(Some(Refusal::InProgress));
    }
    Ok(None)
}

fn vanished(id: &PaymentId) -> PaymentsError {
    StoreError::Corrupt(format!("payment {id} vanished")).into()
}

/// Builds the payments service from its configuration and its provider's (in process, on
/// `bus` when given, so that the services of one process share it).
pub async fn build(
    config: &ServiceConfig,
    provider: &ProviderConfig,
    bus: Option<&Bus>,
    shutdown: &Shutdown,
) -> Result<RunningService, ServiceError> {
    provider.check().map_err(|what| ServiceError::Config {
        service: "payments".to_owned(),
        what,
    })?;
    let mut config = config.clone();
    config.listen.get_or_insert(DEFAULT_LISTEN);
    let service = Service::connect("payments", &config, &MIGRATIONS, bus, shutdown).await?;
    let payments = Payments::new(
        service.db().clone(),
        service.bus().clone(),
        Provider::new(provider.clone()),
    );
    // Bounded on its own (the provider answers within 2 s): the hooks after it share
    // what is left of the deadline.
    shutdown.on_shutdown("payments: authorizations in flight", {
        let payments = payments.clone();
        async move {
            let settled = tokio::time::timeout(Duration::from_secs(3), payments.settled());
            if settled.await.is_err() {
                tracing::warn!(
                    "authorizations still in flight at shutdown stay claimed until taken over"
                );
            }
        }
    });
    let consumer = handlers::consumer(&payments, service.bus(), service.db()).await?;
    let router = api::router(payments);
    service
        .http(router)
        .openapi(api::openapi())
        .document("/asyncapi.json", api::asyncapi())
        .consumer(consumer)
        .bind()
        .await
}
