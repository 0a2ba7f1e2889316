//! The reference shop's catalog service: products with their prices. Anyone may read
//! what is for sale (cached in process); administrators
//! create and change products, and each change is published as `ProductChanged` through
//! the outbox.
//!
//! `domain` holds the rules (no I/O); `store` the SQL; `api` the HTTP surface; [`build`]
//! puts them together on the SDK's bootstrap.

pub mod api;
pub mod domain;
pub mod events;
pub mod grpc;
mod store;

use keel_runtime::Shutdown;
use keel_sdk::cache::{Cache, CacheOptions};
use keel_sdk::events::Bus;
use keel_sdk::service::{RunningService, Service, ServiceConfig, ServiceError};
use keel_sdk::{Database, Migrations};

use crate::domain::{Product, ProductChange, ProductError, Sku};
use crate::events::ProductChanged;
pub use crate::store::StoreError;

/// Where the catalog listens unless configured otherwise.
pub const DEFAULT_LISTEN: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8101);

/// Held while a product is written.
const PRODUCT_WRITES: keel_sdk::data::LockKey = keel_sdk::data::LockKey(0x6b65_656c_c001);

pub static MIGRATIONS: Migrations = Migrations {
    postgres: sqlx::migrate!("migrations/postgres"),
    sqlite: sqlx::migrate!("migrations/sqlite"),
};

/// Why a catalog operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Invalid(#[from] ProductError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the change cannot be published: {0}")]
    Bus(#[from] keel_sdk::events::BusError),
}

impl From<keel_sdk::sqlx::Error> for CatalogError {
    fn from(error: keel_sdk::sqlx::Error) -> Self {
        Self::Store(StoreError::Database(error))
    }
}

/// The catalog's use cases.
#[derive(Clone)]
pub struct Catalog {
    db: Database,
    bus: Bus,
    products: Cache<Product>,
}

impl Catalog {
    pub fn new(db: Database, bus: Bus, products: Cache<Product>) -> Self {
        Self { db, bus, products }
    }

    /// The product `sku`, for sale or not; read through the cache.
    pub async fn product(&self, sku: &Sku) -> Result<Option<Product>, CatalogError> {
        let db = self.db.clone();
        let key = sku.to_string();
        let found = self
            .products
            .get_or_load(sku.as_str(), || async move {
                let mut connection = db.pool().acquire().await?;
                store::get(&mut connection, &key).await
            })
            .await
            .map_err(|error| match std::sync::Arc::try_unwrap(error) {
                Ok(error) => CatalogError::Store(error),
                Err(shared) => CatalogError::Store(StoreError::Corrupt(shared.to_string())),
            })?;
        Ok(found.map(|product| (*product).clone()))
    }

    /// Up to `limit` products for sale after SKU `after`, by SKU.
    pub async fn for_sale(
        &self,
        after: Option<&Sku>,
        limit: u32,
    ) -> Result<Vec<Product>, CatalogError> {
        let mut connection = self.db.pool().acquire().await?;
        let after = after.map(Sku::as_str);
        Ok(store::list_for_sale(&mut connection, self.db.backend(), after, limit).await?)
    }

    /// Creates or replaces product `sku`; returns it and whether it is new. The change
    /// and its `ProductChanged` event commit together; the cached copy goes after.
    pub async fn put(
        &self,
        sku: Sku,
        change: ProductChange,
    ) -> Result<(Product, bool), CatalogError> {
        let product = Product::from_change(sku, change)?;
        let mut tx = self.db.begin().await?;
        // Writers one at a time, the lock taken before the first read: SQLite would
        // otherwise fail a transaction that read before another committed (SQLITE_BUSY).
        self.db.lock(&mut tx, PRODUCT_WRITES).await?;
        let version = store::put(&mut tx, &product, keel_sdk::data::unix_seconds()).await?;
        self.bus
            .stage(&mut tx, &ProductChanged::new(&product, version))
            .await?;
        tx.commit().await?;
        // Once committed, and before answering: the writer's next read sees its write.
        self.products.invalidate(product.sku.as_str()).await;
        Ok((product, version == 1))
    }
}

/// Builds the catalog service from its configuration (in process, on `bus` when given,
/// so that the services of one process share it).
pub async fn build(
    config: &ServiceConfig,
    bus: Option<&Bus>,
    shutdown: &Shutdown,
) -> Result<RunningService, ServiceError> {
    let mut config = config.clone();
    config.listen.get_or_insert(DEFAULT_LISTEN);
    let service = Service::connect("catalog", &config, &MIGRATIONS, bus, shutdown).await?;
    // In process, and in Redis too when configured: shared by the instances, and a write
    // on one drops the copies of all.
    let products = Cache::new(
        "products",
        1,
        CacheOptions::default(),
        service.cache_redis(),
    );
    let catalog = Catalog::new(service.db().clone(), service.bus().clone(), products);
    let grpc =
        tonic::service::Routes::new(grpc::CatalogGrpc::server(catalog.clone())).into_axum_router();
    let router = api::router(catalog).merge(grpc);
    service
        .http(router)
        .openapi(api::openapi())
        .document("/asyncapi.json", api::asyncapi())
        .bind()
        .await
}
