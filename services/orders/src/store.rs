//! Orders in the orders database (PostgreSQL or SQLite, one code path).

use keel_sdk::data::lock_row;
use keel_sdk::sqlx::{self, AnyConnection, Row, any::AnyRow};

use crate::domain::{CustomerId, Money, OrderId, PricedLine, Status};

/// Why stored data could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("a stored order is not valid: {0}")]
    Corrupt(String),
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

/// An order as stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize, schemars::JsonSchema)]
pub struct Order {
    pub id: OrderId,
    pub customer: CustomerId,
    pub status: Status,
    /// Why it was rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub lines: Vec<PricedLine>,
    pub total: Money,
    pub payment_method: String,
    /// Unix ms.
    pub created_at: i64,
    #[serde(skip)]
    pub saga_id: Option<String>,
    /// The cancellation saga, once the order is being cancelled.
    #[serde(skip)]
    pub cancel_saga_id: Option<String>,
    #[serde(skip)]
    pub request_digest: Option<String>,
}

/// Inserts `order` unless its customer already used its idempotency key or has
/// `max_pending` orders pending already (counted in the same statement: no round trip of
/// its own; concurrent requests of one customer may pass it by as many); true when
/// inserted. The insert locks the key, so a concurrent request with the same key waits
/// for this transaction and then finds its order.
pub async fn insert(
    db: &mut AnyConnection,
    order: &Order,
    idempotency_key: Option<&str>,
    max_pending: u32,
) -> Result<bool, StoreError> {
    let lines = serde_json::to_string(&order.lines).map_err(corrupt)?;
    let inserted = sqlx::query(
        "INSERT INTO orders (id, customer, status, reason, lines, total_minor, currency, payment_method, \
         saga_id, idempotency_key, request_digest, created_at, updated_at) \
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12 \
         WHERE (SELECT count(*) FROM orders WHERE customer = $2 AND status = 'pending') < $13 \
         ON CONFLICT (customer, idempotency_key) DO NOTHING",
    )
    .bind(order.id.as_str())
    .bind(order.customer.as_str())
    .bind(order.status.as_str())
    .bind(order.reason.as_deref())
    .bind(lines)
    .bind(order.total.minor())
    .bind(order.total.currency().as_str())
    .bind(&order.payment_method)
    .bind(order.saga_id.as_deref())
    .bind(idempotency_key)
    .bind(order.request_digest.as_deref())
    .bind(order.created_at)
    .bind(i64::from(max_pending))
    .execute(db)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

pub async fn set_cancel_saga(
    db: &mut AnyConnection,
    id: &OrderId,
    saga: &str,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE orders SET cancel_saga_id = $1 WHERE id = $2")
        .bind(saga)
        .bind(id.as_str())
        .execute(db)
        .await?;
    Ok(())
}

/// Moves order `id` from `from` to `to` with `reason`; false when it was not in `from`
/// (moved before).
pub async fn advance(
    db: &mut AnyConnection,
    id: &OrderId,
    from: Status,
    to: Status,
    reason: Option<&str>,
    now: i64,
) -> Result<bool, StoreError> {
    let moved = sqlx::query(
        "UPDATE orders SET status = $1, reason = $2, updated_at = $3 WHERE id = $4 AND status = $5",
    )
    .bind(to.as_str())
    .bind(reason)
    .bind(now)
    .bind(id.as_str())
    .bind(from.as_str())
    .execute(db)
    .await?;
    Ok(moved.rows_affected() == 1)
}

/// Order `id`, locked for the rest of the transaction ([`lock_row`]).
pub async fn get_locked(db: &mut AnyConnection, id: &OrderId) -> Result<Option<Order>, StoreError> {
    match lock_row(db, "orders", "id", id.as_str()).await? {
        Some(lock) => fetch(db, id, lock).await,
        None => Ok(None),
    }
}

const COLUMNS: &str = "id, customer, status, reason, lines, total_minor, currency, payment_method, \
                       saga_id, cancel_saga_id, request_digest, created_at";

pub async fn get(db: &mut AnyConnection, id: &OrderId) -> Result<Option<Order>, StoreError> {
    fetch(db, id, "").await
}

/// Order `id`, read with `lock` (from [`lock_row`]).
async fn fetch(
    db: &mut AnyConnection,
    id: &OrderId,
    lock: &'static str,
) -> Result<Option<Order>, StoreError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM orders WHERE id = $1{lock}"
    )))
    .bind(id.as_str())
    .fetch_optional(db)
    .await?;
    row.as_ref().map(order).transpose()
}

/// The order `customer` placed with `idempotency_key`.
pub async fn by_key(
    db: &mut AnyConnection,
    customer: &CustomerId,
    idempotency_key: &str,
) -> Result<Option<Order>, StoreError> {
    // Planned afresh each time (a rare path: a repeat): a plan cached while the table was
    // young (no statistics yet) may walk the customer's every order through
    // `orders_by_customer` instead of taking the one row from the key's unique index.
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM orders WHERE customer = $1 AND idempotency_key = $2"
    )))
    .persistent(false)
    .bind(customer.as_str())
    .bind(idempotency_key)
    .fetch_optional(db)
    .await?;
    row.as_ref().map(order).transpose()
}

/// `customer`'s latest orders, newest first.
pub async fn of_customer(
    db: &mut AnyConnection,
    customer: &CustomerId,
    limit: i64,
) -> Result<Vec<Order>, StoreError> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM orders WHERE customer = $1 ORDER BY created_at DESC, id DESC LIMIT $2"
    )))
    .bind(customer.as_str())
    .bind(limit)
    .fetch_all(db)
    .await?;
    rows.iter().map(order).collect()
}

fn order(row: &AnyRow) -> Result<Order, StoreError> {
    let status: String = row.try_get("status")?;
    let currency: String = row.try_get("currency")?;
    let lines: String = row.try_get("lines")?;
    Ok(Order {
        id: row.try_get::<String, _>("id")?.parse().map_err(corrupt)?,
        customer: CustomerId::new(&row.try_get::<String, _>("customer")?).map_err(corrupt)?,
        status: Status::parse(&status).ok_or_else(|| corrupt(format!("status {status:?}")))?,
        reason: row.try_get("reason")?,
        lines: serde_json::from_str(&lines).map_err(corrupt)?,
        total: Money::new(
            row.try_get("total_minor")?,
            currency.parse().map_err(corrupt)?,
        )
        .map_err(corrupt)?,
        payment_method: row.try_get("payment_method")?,
        created_at: row.try_get("created_at")?,
        saga_id: row.try_get("saga_id")?,
        cancel_saga_id: row.try_get("cancel_saga_id")?,
        request_digest: row.try_get("request_digest")?,
    })
}
