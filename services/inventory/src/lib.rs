//! The reference shop's inventory service: stock per SKU, and reservations that set units
//! aside for an order until they are committed (sold), released, or expire.
//!
//! Reservations are asked for with commands on the bus ([`contract`]), answered with
//! replies, so that the order saga can reserve, commit and release; administrators count
//! stock over HTTP ([`api`]). `domain` holds the rules (no I/O); `store` the SQL;
//! [`build`] puts them together on the SDK's bootstrap.

pub mod api;
pub mod contract;
pub mod domain;
mod handlers;
mod store;

use std::time::Duration;

use keel_runtime::Shutdown;
use keel_sdk::data::unix_millis;
use keel_sdk::events::{Bus, BusError};
use keel_sdk::service::{RunningService, Service, ServiceConfig, ServiceError};
use keel_sdk::{Database, Migrations, Tx};

use crate::contract::{Reserve, StockLevel};
use crate::domain::{Command, ReservationId, Sku, Status, Stock, StockError};
pub use crate::store::{Reservation, StoreError};

/// Where the inventory listens unless configured otherwise.
pub const DEFAULT_LISTEN: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8102);

/// How long a reservation holds its units unless the command says otherwise.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(15 * 60);
/// The longest hold a command may ask for.
pub const MAX_HOLD: Duration = Duration::from_secs(24 * 60 * 60);

/// Held by stocktakes, one at a time: the only writes that create stock rows, which a
/// row lock cannot guard before they exist.
const STOCK_WRITES: keel_sdk::data::LockKey = keel_sdk::data::LockKey(0x6b65_656c_1e01);

pub static MIGRATIONS: Migrations = Migrations {
    postgres: sqlx::migrate!("migrations/postgres"),
    sqlite: sqlx::migrate!("migrations/sqlite"),
};

/// Why an inventory operation failed (not a refusal: something is broken or away).
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the change cannot be published: {0}")]
    Bus(#[from] BusError),
}

impl From<keel_sdk::sqlx::Error> for InventoryError {
    fn from(error: keel_sdk::sqlx::Error) -> Self {
        Self::Store(StoreError::Database(error))
    }
}

/// Why a command was not done, in words for whoever asked (out of stock, released).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// What a command did to a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// The reservation's status after it.
    pub status: Status,
    /// False when the command had been done already.
    pub changed: bool,
}

/// The inventory's use cases.
#[derive(Clone)]
pub struct Inventory {
    db: Database,
    bus: Bus,
}

impl Inventory {
    pub fn new(db: Database, bus: Bus) -> Self {
        Self { db, bus }
    }

    /// The stock of `sku`; none when it was never counted.
    pub async fn stock(&self, sku: &Sku) -> Result<Option<Stock>, InventoryError> {
        let mut connection = self.db.pool().acquire().await?;
        Ok(store::stock(&mut connection, sku).await?)
    }

    /// Reservation `id`, as stored.
    pub async fn reservation(
        &self,
        id: &ReservationId,
    ) -> Result<Option<Reservation>, InventoryError> {
        let mut connection = self.db.pool().acquire().await?;
        Ok(store::reservation(&mut connection, id, false).await?)
    }

    /// Sets the count of `sku` on hand (a stocktake or a delivery). `Ok(Err(_))` when the
    /// count is refused (below what is reserved, or too large).
    pub async fn set_on_hand(
        &self,
        sku: &Sku,
        on_hand: u32,
    ) -> Result<Result<Stock, StockError>, InventoryError> {
        let mut tx = self.db.begin().await?;
        self.db.lock(&mut tx, STOCK_WRITES).await?;
        let mut stock = store::locked_stock(&mut tx, sku).await?;
        if let Err(refused) = stock.set_on_hand(on_hand) {
            return Ok(Err(refused));
        }
        self.save(&mut tx, std::slice::from_ref(&stock)).await?;
        tx.commit().await?;
        Ok(Ok(stock))
    }

    /// Reserves `command`'s lines within `tx`, all or none. Asking again for a
    /// reservation that is held or committed is done already; one that was refused,
    /// released (even before it was made) or expired is refused.
    pub async fn reserve(
        &self,
        tx: &mut Tx,
        command: &Reserve,
    ) -> Result<Result<(), Refused>, InventoryError> {
        let id = &command.reservation;
        let now = unix_millis();
        let hold = command
            .hold_seconds
            .map_or(DEFAULT_HOLD, |seconds| Duration::from_secs(seconds.into()))
            .clamp(Duration::from_secs(1), MAX_HOLD);
        let expires_at = now.saturating_add(i64::try_from(hold.as_millis()).unwrap_or(i64::MAX));
        if !store::create_reservation(tx, id, Status::Held, expires_at, now).await? {
            let existing = store::reservation(tx, id, true)
                .await?
                .ok_or_else(|| StoreError::Corrupt(format!("reservation {id} vanished")))?;
            let same = existing.lines.iter().eq(command.lines.iter());
            return Ok(match existing.status {
                Status::Held | Status::Committed if same => Ok(()),
                Status::Held | Status::Committed => Err(Refused(format!(
                    "reservation {id} was made for other lines"
                ))),
                status => Err(Refused(format!(
                    "reservation {id} is {} already",
                    status.as_str()
                ))),
            });
        }
        let skus: Vec<&Sku> = command.lines.iter().map(|line| &line.sku).collect();
        let mut stocks = store::locked_stocks(tx, &skus).await?;
        if let Err(short) = domain::reserve(&mut stocks, &command.lines) {
            // Closed for good: the same reservation asked again gets the same answer.
            store::set_status(tx, id, Status::Refused, now).await?;
            return Ok(Err(Refused(short.to_string())));
        }
        store::save_reservation(tx, id, command.lines.as_slice(), &stocks, now).await?;
        self.stage_levels(tx, &stocks).await?;
        Ok(Ok(()))
    }

    /// Commits, releases or expires reservation `id` within `tx`; returns its status
    /// after. A release of a reservation not made yet leaves a tombstone that refuses it.
    pub async fn apply(
        &self,
        tx: &mut Tx,
        id: &ReservationId,
        command: Command,
    ) -> Result<Result<Applied, Refused>, InventoryError> {
        let now = unix_millis();
        // Twice at most: a tombstone's insert can lose to the reservation's own, which
        // is then there to be read.
        for _ in 0..2 {
            let Some((reservation, mut stocks)) = store::locked_reservation(tx, id).await? else {
                if command != Command::Release {
                    return Ok(Err(Refused(format!("no reservation {id}"))));
                }
                if store::create_reservation(tx, id, Status::Released, now, now).await? {
                    return Ok(Ok(Applied {
                        status: Status::Released,
                        changed: true,
                    }));
                }
                continue;
            };
            // Past its time, a held reservation is expired whether or not the sweep came
            // by: it cannot be committed any more.
            let overdue = reservation.status == Status::Held && reservation.expires_at <= now;
            let step = match command {
                Command::Commit if overdue => Command::Expire,
                command => command,
            };
            let (next, effect) = match domain::transition(reservation.status, step) {
                Ok(moved) => moved,
                Err(refused) => return Ok(Err(Refused(format!("{id}: {refused}")))),
            };
            match effect {
                Some(effect) => {
                    for (stock, line) in stocks.iter_mut().zip(&reservation.lines) {
                        stock
                            .apply(effect, line.quantity)
                            .map_err(StoreError::from)?;
                    }
                }
                // Read (and locked) with the reservation, but not moved: not written.
                None => stocks.clear(),
            }
            let changed = next != reservation.status;
            store::save_moved(tx, id, changed.then_some(next), &stocks, now).await?;
            self.stage_levels(tx, &stocks).await?;
            if step != command {
                return Ok(Err(Refused(format!("{id}: the reservation expired"))));
            }
            return Ok(Ok(Applied {
                status: next,
                changed,
            }));
        }
        Err(StoreError::Corrupt(format!("reservation {id} cannot be read back")).into())
    }

    /// Expires the held reservations whose time ran out (up to 100); returns how many.
    pub async fn expire_overdue(&self) -> Result<usize, InventoryError> {
        let due = {
            let mut connection = self.db.pool().acquire().await?;
            store::overdue(&mut connection, unix_millis(), 100).await?
        };
        let mut expired = 0;
        for id in &due {
            // One reservation that cannot be expired must not keep the others held.
            match self.expire(id).await {
                Ok(true) => expired += 1,
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, reservation = %id, "cannot expire"),
            }
        }
        Ok(expired)
    }

    /// Expires reservation `id`; false when another instance or the saga got there first.
    async fn expire(&self, id: &ReservationId) -> Result<bool, InventoryError> {
        let mut tx = self.db.begin().await?;
        let applied = self.apply(&mut tx, id, Command::Expire).await?;
        tx.commit().await?;
        Ok(applied.is_ok_and(|applied| applied.changed))
    }

    /// Expires overdue reservations every `interval` until shutdown.
    pub async fn expire_every(self, interval: Duration, shutdown: Shutdown) {
        loop {
            tokio::select! {
                () = shutdown.wait() => return,
                () = tokio::time::sleep(interval) => {}
            }
            match self.expire_overdue().await {
                Ok(0) => {}
                Ok(expired) => tracing::info!(expired, "reservations expired"),
                Err(error) => tracing::warn!(%error, "expiring reservations failed"),
            }
        }
    }

    /// Writes `stocks` and stages their `StockLevel` events.
    async fn save(&self, tx: &mut Tx, stocks: &[Stock]) -> Result<(), InventoryError> {
        store::save_stocks(tx, stocks, unix_millis()).await?;
        self.stage_levels(tx, stocks).await
    }

    /// Stages the `StockLevel` events of `stocks`, as written.
    async fn stage_levels(&self, tx: &mut Tx, stocks: &[Stock]) -> Result<(), InventoryError> {
        for stock in stocks {
            self.bus.stage(tx, &StockLevel::from(stock)).await?;
        }
        Ok(())
    }
}

/// Builds the inventory service from its configuration (in process, on `bus` when given,
/// so that the services of one process share it).
pub async fn build(
    config: &ServiceConfig,
    bus: Option<&Bus>,
    shutdown: &Shutdown,
) -> Result<RunningService, ServiceError> {
    let mut config = config.clone();
    config.listen.get_or_insert(DEFAULT_LISTEN);
    let service = Service::connect("inventory", &config, &MIGRATIONS, bus, shutdown).await?;
    let inventory = Inventory::new(service.db().clone(), service.bus().clone());
    let consumer = handlers::consumer(&inventory, service.bus(), service.db()).await?;
    let sweeper = inventory.clone();
    let router = api::router(inventory);
    service
        .http(router)
        .openapi(api::openapi())
        .document("/asyncapi.json", api::asyncapi())
        .consumer(consumer)
        .worker("reservation-expiry", move |shutdown| {
            sweeper.expire_every(Duration::from_secs(1), shutdown)
        })
        .bind()
        .await
}
