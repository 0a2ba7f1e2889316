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

use keel_runtime::Shutdown;
use keel_sdk::data::unix_seconds;
use keel_sdk::events::{Bus, BusError};
use keel_sdk::service::{RunningService, Service, ServiceConfig, ServiceError};
use keel_sdk::{Database, Migrations, Tx};
use keel_shop_kernel::Money;

use crate::contract::Payment;
use crate::domain::{Action, Command, PaymentId, PaymentMethod, Refusal, Status};
use crate::provider::{Decision, Provider, ProviderConfig, ProviderFailure};
pub use crate::store::StoreError;

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
}

impl Payments {
    pub fn new(db: Database, bus: Bus, provider: Provider) -> Self {
        Self { db, bus, provider }
    }

    pub fn db(&self) -> &Database {
        &self.db
    }

    /// Payment `id`, as stored.
    pub async fn payment(&self, id: &PaymentId) -> Result<Option<Payment>, PaymentsError> {
        let mut connection = self.db.pool().acquire().await?;
        Ok(store::get(&mut connection, id, false).await?)
    }

    /// Authorizes `amount` on `method` as payment `id` within `tx`. Asked again, the
    /// payment is answered as it is now (authorized, captured, voided or refunded; a
    /// decline again) without asking the provider; asked for another amount or method,
    /// or after a void that came first, refused.
    ///
    /// The provider is called inside `tx` (its row claimed and locked): concurrent
    /// requests for one payment wait for the first and get its answer.
    pub async fn authorize(
        &self,
        tx: &mut Tx,
        id: &PaymentId,
        amount: Money,
        method: &PaymentMethod,
    ) -> Result<Result<Payment, Refusal>, PaymentsError> {
        let now = unix_seconds();
        if !store::claim(tx, id, now).await? {
            let stored = store::get(tx, id, true)
                .await?
                .ok_or_else(|| StoreError::Corrupt(format!("payment {id} vanished")))?;
            let previous = stored.amount.zip(stored.method.as_ref());
            return Ok(domain::authorize_again(
                stored.status,
                previous,
                amount,
                method,
                stored.decline_reason.as_deref(),
            )
            .map(|()| stored));
        }
        // A failure here rolls the claim back with the transaction: nothing happened.
        let decision = self.provider.authorize(id, method).await?;
        let (status, decline_reason) = match decision {
            Decision::Approved => (Status::Authorized, None),
            Decision::Declined(reason) => (Status::Declined, Some(reason)),
        };
        let payment = Payment {
            id: id.clone(),
            status,
            amount: Some(amount),
            method: Some(method.clone()),
            decline_reason,
        };
        self.save(tx, &payment).await?;
        Ok(match payment.status {
            Status::Declined => Err(Refusal::Declined(
                payment.decline_reason.clone().unwrap_or_default(),
            )),
            _ => Ok(payment),
        })
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
        // Twice at most: a tombstone's insert can lose to the authorization's own claim,
        // which is then there to be read.
        for _ in 0..2 {
            let Some(mut payment) = store::get(tx, id, true).await? else {
                if command == Command::Capture {
                    return Ok(Err(Refusal::Unknown(id.clone())));
                }
                if store::claim(tx, id, unix_seconds()).await? {
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

    /// Writes `payment` and stages its event.
    async fn save(&self, tx: &mut Tx, payment: &Payment) -> Result<(), PaymentsError> {
        store::save(tx, payment, unix_seconds()).await?;
        self.bus.stage(tx, payment).await?;
        Ok(())
    }
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
