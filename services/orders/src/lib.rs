//! The reference shop's orders service: a customer places an order (priced from the
//! catalog over gRPC), and the order saga reserves the stock, authorizes the payment,
//! commits the reservation and captures the payment, or undoes what it did and rejects
//! the order with the reason.
//!
//! `domain` holds the rules (no I/O); `placing` the saga; `prices` the catalog client;
//! `store` the SQL; `api` the HTTP surface; [`build`] puts them together on the SDK's
//! bootstrap.

pub mod api;
pub mod contract;
pub mod domain;
pub mod placing;
mod prices;
mod store;
mod waiting;

use std::time::Duration;

use keel_inventory::domain::Lines;
use keel_payments::domain::PaymentMethod;
use keel_runtime::Shutdown;
use keel_sdk::client::{ClientOptions, Instances, ServiceClient};
use keel_sdk::data::unix_millis;
use keel_sdk::events::{Bus, BusError};
use keel_sdk::saga::{Orchestrator, SagaError, StepRecord};
use keel_sdk::service::{RunningService, Service, ServiceConfig, ServiceError};
use keel_sdk::{Database, Migrations, Tx};
use serde::{Deserialize, Serialize};

use crate::contract::OrderChanged;
use crate::domain::{CustomerId, OrderId, PricingError, Status};
use crate::placing::{Cancelling, Placing};
pub use crate::prices::CatalogError;
pub use crate::store::{Order, StoreError};
pub use crate::waiting::Changes;
use crate::waiting::Moved;

/// The longest `GET /orders/{id}?wait=` may wait (under the gateway's default route
/// timeout of 30 s).
pub const MAX_WAIT: Duration = Duration::from_secs(20);
/// How often a waiting request looks at its order again, for changes committed by
/// another instance (this instance's own wake it at once).
const LOOK_AGAIN: Duration = Duration::from_millis(250);

/// Where the orders service listens unless configured otherwise.
pub const DEFAULT_LISTEN: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8104);

pub static MIGRATIONS: Migrations = Migrations {
    postgres: sqlx::migrate!("migrations/postgres"),
    sqlite: sqlx::migrate!("migrations/sqlite"),
};

/// `[orders_settings]`: what the orders service needs beyond a service's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrdersOptions {
    /// The catalog's base URLs; none: its instances from the registry.
    pub catalog: Option<Vec<String>>,
    /// How long each step of the order saga waits for its reply before the order is
    /// rejected and what was done is undone.
    #[serde(with = "humantime_serde")]
    pub step_timeout: Duration,
    /// Orders one customer may have being placed at once; beyond, 429. Each holds its
    /// stock until its saga ends (up to a step timeout per step, with a card that keeps
    /// failing), so without a bound one customer could keep every unit reserved.
    pub max_pending_per_customer: u32,
}

impl Default for OrdersOptions {
    fn default() -> Self {
        Self {
            catalog: None,
            step_timeout: Duration::from_secs(10),
            max_pending_per_customer: 20,
        }
    }
}

/// What a customer sends to place an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrder {
    pub lines: Lines,
    pub payment_method: PaymentMethod,
}

/// Why an order was not placed or read.
#[derive(Debug, thiserror::Error)]
pub enum OrdersError {
    #[error(transparent)]
    Pricing(#[from] PricingError),
    #[error("this Idempotency-Key was used for another order")]
    KeyReused,
    #[error("{0} orders of yours are being placed already; try again once one has ended")]
    TooManyPending(u32),
    #[error(transparent)]
    Cancel(#[from] domain::CancelError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the order saga: {0}")]
    Saga(#[from] SagaError),
    #[error("the order cannot be published: {0}")]
    Bus(#[from] BusError),
}

impl From<keel_sdk::sqlx::Error> for OrdersError {
    fn from(error: keel_sdk::sqlx::Error) -> Self {
        Self::Store(StoreError::Database(error))
    }
}

/// An order and how its saga went, step by step.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct OrderView {
    #[serde(flatten)]
    pub order: Order,
    #[schemars(with = "Vec<serde_json::Value>")]
    pub steps: Vec<StepRecord>,
}

/// The orders use cases.
#[derive(Clone)]
pub struct Orders {
    db: Database,
    bus: Bus,
    orchestrator: Orchestrator<Placing>,
    cancellations: Orchestrator<Cancelling>,
    catalog: prices::Catalog,
    changes: Changes,
    /// Ends waits (`GET ?wait=`) early when the service stops, so that it drains quickly.
    shutdown: Shutdown,
    /// `OrdersOptions::max_pending_per_customer`.
    max_pending: u32,
}

impl Orders {
    /// Places an order for `customer`; with `key`, the same key again gets the same
    /// order (and another request under it is refused). Returns the order and whether it
    /// is new.
    pub async fn place(
        &self,
        customer: &CustomerId,
        request: &PlaceOrder,
        key: Option<&str>,
    ) -> Result<(Order, bool), OrdersError> {
        // What the key was used for, compared on a repeat (a canonical form, not a hash:
        // an order is small).
        let digest = serde_json::to_string(request).unwrap_or_default();
        // A key is looked up only when the order cannot be placed under it (the insert
        // below finds it used, or pricing fails): most keys are new, and a repeat is
        // answered with its order even when the catalog would now refuse it (a product
        // withdrawn since) or cannot be reached. A repeat so costs what placing does (the
        // catalog asked, a transaction begun and rolled back): repeats are rare, new keys
        // are every order.
        let (lines, total) = match self.price(request).await {
            Ok(priced) => priced,
            Err(error) => return self.repeat(customer, key, &digest).await?.ok_or(error),
        };
        let id: OrderId = uuid::Uuid::now_v7()
            .to_string()
            .parse()
            .map_err(|_| StoreError::Corrupt("a UUID is not a reference".into()))?;
        let placing = Placing {
            order: id.clone(),
            customer: customer.clone(),
            lines: request.lines.clone(),
            total,
            method: request.payment_method.clone(),
        };
        // The saga first, so that the order row is written once, with it (a repeated key
        // below rolls both back).
        let mut tx = self.db.begin().await?;
        let saga = self.orchestrator.start(&mut tx, &placing).await?;
        let order = Order {
            id,
            customer: customer.clone(),
            status: Status::Pending,
            reason: None,
            lines,
            total,
            payment_method: request.payment_method.to_string(),
            created_at: unix_millis(),
            saga_id: Some(saga),
            cancel_saga_id: None,
            request_digest: Some(digest.clone()),
        };
        if !store::insert(&mut tx, &order, key, self.max_pending).await? {
            // The same key, placed concurrently: that order stands. Otherwise the
            // customer has as many orders being placed as allowed.
            drop(tx);
            return self
                .repeat(customer, key, &digest)
                .await?
                .ok_or(OrdersError::TooManyPending(self.max_pending));
        }
        self.bus
            .stage(
                &mut tx,
                &OrderChanged {
                    order: order.id.clone(),
                    customer: customer.clone(),
                    status: Status::Pending,
                    total,
                    reason: None,
                },
            )
            .await?;
        tx.commit().await?;
        Ok((order, true))
    }

    async fn price(
        &self,
        request: &PlaceOrder,
    ) -> Result<(Vec<domain::PricedLine>, domain::Money), OrdersError> {
        let prices = self
            .catalog
            .prices(request.lines.iter().map(|l| &l.sku))
            .await?;
        Ok(domain::price(&request.lines, &prices)?)
    }

    /// What a repeat under `key` gets, when `customer` used the key: the order it made, or
    /// a refusal when it was made for another request (`digest`).
    async fn repeat(
        &self,
        customer: &CustomerId,
        key: Option<&str>,
        digest: &str,
    ) -> Result<Option<(Order, bool)>, OrdersError> {
        let Some(key) = key else {
            return Ok(None);
        };
        let mut connection = self.db.connection().await?;
        let existing = store::by_key(&mut connection, customer, key).await?;
        connection.release();
        match existing {
            Some(order) if order.request_digest.as_deref() != Some(digest) => {
                Err(OrdersError::KeyReused)
            }
            existing => Ok(existing.map(|order| (order, false))),
        }
    }

    /// `order` with its sagas' steps: placing's, then the cancellation's, if any.
    async fn view(
        &self,
        connection: &mut sqlx::AnyConnection,
        order: Order,
    ) -> Result<OrderView, OrdersError> {
        let mut steps = Vec::new();
        if let Some(saga) = &order.saga_id {
            steps.extend(self.orchestrator.history_on(connection, saga).await?);
        }
        if let Some(saga) = &order.cancel_saga_id {
            steps.extend(self.cancellations.history_on(connection, saga).await?);
        }
        Ok(OrderView { order, steps })
    }

    /// Order `id` with its sagas' steps, if `viewer` may see it (their own, or any for an
    /// admin). While a saga is still at work on it (pending, cancelling) it is answered
    /// only once it has moved on or `wait` (at most [`MAX_WAIT`]; zero: at once) has
    /// passed: a customer waits for the outcome with one request instead of polling. A
    /// service stopping answers its waiters at once, with the order as it is.
    pub async fn order(
        &self,
        id: &OrderId,
        viewer: &CustomerId,
        admin: bool,
        wait: Duration,
    ) -> Result<Option<OrderView>, OrdersError> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        let mut stopping = self.shutdown.is_triggered();
        loop {
            let watch = self.changes.watch(id);
            let mut changed = std::pin::pin!(watch.notify().notified());
            // Before looking: a change committed while the order is read still wakes.
            changed.as_mut().enable();
            let mut connection = self.db.connection().await?;
            let now = tokio::time::Instant::now();
            let order = match store::get(&mut connection, id).await? {
                Some(order) if domain::may_see(&order.customer, viewer, admin) => order,
                _ => {
                    connection.release();
                    return Ok(None);
                }
            };
            // The steps only with the answer: a look that waits on reads the order alone.
            if !order.status.in_progress() || now >= deadline || stopping {
                let view = self.view(&mut connection, order).await?;
                connection.release();
                return Ok(Some(view));
            }
            connection.release();
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep(LOOK_AGAIN.min(deadline - now)) => {}
                () = self.shutdown.wait() => stopping = true,
            }
            // Moved on by this instance, to where it stays: what moved it says what the
            // order would be read as, so only its steps are read for the answer.
            if let Some(moved) = watch
                .moved_from(order.status)
                .filter(|moved| !moved.to.in_progress())
            {
                let order = Order {
                    status: moved.to,
                    reason: moved.reason,
                    ..order
                };
                let mut connection = self.db.connection().await?;
                let view = self.view(&mut connection, order).await?;
                connection.release();
                return Ok(Some(view));
            }
        }
    }

    /// Cancels order `id` for `viewer` (its customer, or an admin): a confirmed order is
    /// refunded and restocked by the cancellation saga, cancelling meanwhile; asking again
    /// changes nothing. `None` when the viewer may not see the order.
    pub async fn cancel(
        &self,
        id: &OrderId,
        viewer: &CustomerId,
        admin: bool,
        reason: &str,
    ) -> Result<Option<Order>, OrdersError> {
        let mut tx = self.db.begin().await?;
        let Some(mut order) = store::get_locked(&mut tx, id)
            .await?
            .filter(|order| domain::may_see(&order.customer, viewer, admin))
        else {
            return Ok(None);
        };
        if !domain::cancel(order.status)? {
            return Ok(Some(order));
        }
        let changed = OrderChanged {
            order: id.clone(),
            customer: order.customer.clone(),
            status: Status::Cancelling,
            total: order.total,
            reason: Some(reason.to_owned()),
        };
        move_order(
            &mut tx,
            &self.bus,
            &self.changes,
            Status::Confirmed,
            &changed,
        )
        .await?;
        let cancelling = Cancelling {
            order: id.clone(),
            customer: order.customer.clone(),
            total: order.total,
            reason: reason.to_owned(),
        };
        let saga = self.cancellations.start(&mut tx, &cancelling).await?;
        store::set_cancel_saga(&mut tx, id, &saga).await?;
        tx.commit().await?;
        order.status = Status::Cancelling;
        order.reason = Some(reason.to_owned());
        Ok(Some(order))
    }

    /// `customer`'s latest 100 orders, newest first.
    pub async fn orders_of(&self, customer: &CustomerId) -> Result<Vec<Order>, OrdersError> {
        let mut connection = self.db.pool().acquire().await?;
        Ok(store::of_customer(&mut connection, customer, 100).await?)
    }
}

/// Moves the order `changed` names from `from` to `changed.status` (with its reason) and
/// stages `changed`, within `tx`, waking this instance's requests waiting on the order once
/// it commits; false, and nothing staged, when the order was not in `from` (moved on
/// before).
async fn move_order(
    tx: &mut Tx,
    bus: &Bus,
    changes: &Changes,
    from: Status,
    changed: &OrderChanged,
) -> Result<bool, OrdersError> {
    let (id, to, reason) = (&changed.order, changed.status, changed.reason.as_deref());
    if !store::advance(tx, id, from, to, reason, unix_millis()).await? {
        return Ok(false);
    }
    bus.stage(tx, changed).await?;
    let (changes, id) = (changes.clone(), id.clone());
    let moved = Moved {
        from,
        to,
        reason: reason.map(str::to_owned),
    };
    tx.after_commit(move || changes.changed(&id, moved));
    Ok(true)
}

/// Builds the orders service (in process, on `bus` when given, so that the services of
/// one process share it).
pub async fn build(
    config: &ServiceConfig,
    options: &OrdersOptions,
    bus: Option<&Bus>,
    shutdown: &Shutdown,
) -> Result<RunningService, ServiceError> {
    let mut config = config.clone();
    config.listen.get_or_insert(DEFAULT_LISTEN);
    let service = Service::connect("orders", &config, &MIGRATIONS, bus, shutdown).await?;
    let misconfigured = |what: String| ServiceError::Config {
        service: "orders".to_owned(),
        what,
    };
    let instances = match (&options.catalog, service.discovery()) {
        (Some(urls), _) => Instances::Static(urls.clone()),
        (None, Some(view)) => Instances::Registry(view.clone()),
        (None, None) => {
            return Err(misconfigured(
                "the catalog is found through the registry or orders_settings.catalog; neither is set".into(),
            ));
        }
    };
    let client = ServiceClient::new("catalog", instances, ClientOptions::default())
        .map_err(|error| misconfigured(error.to_string()))?;
    let changes = Changes::default();
    let orchestrator = Orchestrator::new(
        service.bus(),
        service.db(),
        placing::saga(service.bus(), &changes, options.step_timeout),
    )
    .map_err(|error| misconfigured(error.to_string()))?;
    let cancellations = Orchestrator::new(
        service.bus(),
        service.db(),
        placing::cancellation(service.bus(), &changes, options.step_timeout),
    )
    .map_err(|error| misconfigured(error.to_string()))?;
    // Replies are matched to their saga by correlation, late ones ignored: they need no
    // order, and are handled several at once, in batches of one transaction each (each
    // reply locks only its own saga and order). Each saga's replies have a group of their
    // own (a group's consumer handles only the types it binds).
    let bus_error = |error| ServiceError::bus("orders", error);
    let replies = orchestrator
        .consumer("orders")
        .await
        .map(|consumer| consumer.concurrency(8).batch(4))
        .map_err(bus_error)?;
    let cancel_replies = cancellations
        .consumer("orders-cancel")
        .await
        .map_err(bus_error)?;
    let orders = Orders {
        db: service.db().clone(),
        bus: service.bus().clone(),
        orchestrator: orchestrator.clone(),
        cancellations: cancellations.clone(),
        catalog: prices::Catalog::new(&client),
        changes,
        shutdown: shutdown.clone(),
        max_pending: options.max_pending_per_customer,
    };
    let router = api::router(orders);
    service
        .http(router)
        .openapi(api::openapi())
        .document("/asyncapi.json", api::asyncapi())
        .consumer(replies)
        .consumer(cancel_replies)
        .worker("saga-timeouts", move |shutdown| {
            orchestrator.sweep_timeouts(Duration::from_secs(1), shutdown)
        })
        .worker("cancellation-timeouts", move |shutdown| {
            cancellations.sweep_timeouts(Duration::from_secs(1), shutdown)
        })
        .bind()
        .await
}
