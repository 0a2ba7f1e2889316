//! Products in the catalog's database (PostgreSQL or SQLite, one code path).

use keel_sdk::data::Backend;
use keel_sdk::sqlx::{self, AnyConnection, Row, any::AnyRow};

use crate::domain::{Money, Product};

/// Why stored data could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("a stored product is not valid any more: {0}")]
    Corrupt(String),
}

pub async fn get(db: &mut AnyConnection, sku: &str) -> Result<Option<Product>, StoreError> {
    let row = sqlx::query(
        "SELECT sku, name, description, price_minor, currency, active FROM products WHERE sku = $1",
    )
    .bind(sku)
    .fetch_optional(db)
    .await?;
    row.as_ref().map(product).transpose()
}

/// Up to `limit` products for sale with a SKU after `after` (none: from the first), by
/// SKU in byte order on both backends: PostgreSQL compares in the "C" collation, as its
/// default one may order SKUs with dashes otherwise, and a page must end where the next
/// one starts.
pub async fn list_for_sale(
    db: &mut AnyConnection,
    backend: Backend,
    after: Option<&str>,
    limit: u32,
) -> Result<Vec<Product>, StoreError> {
    let query = match backend {
        Backend::Postgres => {
            "SELECT sku, name, description, price_minor, currency, active FROM products \
             WHERE active = $1 AND sku COLLATE \"C\" > $2 ORDER BY sku COLLATE \"C\" LIMIT $3"
        }
        Backend::Sqlite => {
            "SELECT sku, name, description, price_minor, currency, active FROM products \
             WHERE active = $1 AND sku > $2 ORDER BY sku LIMIT $3"
        }
    };
    let rows = sqlx::query(query)
        .bind(1_i64)
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(db)
        .await?;
    rows.iter().map(product).collect()
}

/// Writes `product` (the caller holds the product write lock); returns its new version
/// (1 when it is new).
pub async fn put(db: &mut AnyConnection, product: &Product, now: i64) -> Result<i64, StoreError> {
    let previous: Option<i64> = sqlx::query_scalar("SELECT version FROM products WHERE sku = $1")
        .bind(product.sku.as_str())
        .fetch_optional(&mut *db)
        .await?;
    let version = previous.unwrap_or(0) + 1;
    sqlx::query(
        "INSERT INTO products (sku, name, description, price_minor, currency, active, updated_at, version) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (sku) DO UPDATE SET name = excluded.name, description = excluded.description, \
         price_minor = excluded.price_minor, currency = excluded.currency, \
         active = excluded.active, updated_at = excluded.updated_at, version = excluded.version",
    )
    .bind(product.sku.as_str())
    .bind(product.name.as_str())
    .bind(&product.description)
    .bind(product.price.minor())
    .bind(product.price.currency().as_str())
    .bind(i64::from(product.active))
    .bind(now)
    .bind(version)
    .execute(db)
    .await?;
    Ok(version)
}

fn product(row: &AnyRow) -> Result<Product, StoreError> {
    let corrupt = |what: &dyn std::fmt::Display| StoreError::Corrupt(what.to_string());
    let currency: String = row.try_get("currency")?;
    let price = Money::new(
        row.try_get("price_minor")?,
        currency.parse().map_err(|e| corrupt(&e))?,
    )
    .map_err(|e| corrupt(&e))?;
    Ok(Product {
        sku: row
            .try_get::<String, _>("sku")?
            .parse()
            .map_err(|e| corrupt(&e))?,
        name: row
            .try_get::<String, _>("name")?
            .parse()
            .map_err(|e| corrupt(&e))?,
        description: row.try_get("description")?,
        price,
        active: row.try_get::<i64, _>("active")? != 0,
    })
}
