//! Stock and reservations in the inventory's database (PostgreSQL or SQLite, one code
//! path). Rows are locked ([`lock_row`]) before they are read in a transaction that will
//! write them, so the domain logic runs on counts nobody else can change.

use keel_sdk::data::lock_row;
use keel_sdk::sqlx::{self, AnyConnection, Row};

use crate::domain::{Line, Quantity, ReservationId, Sku, Status, Stock, StockError};

/// Why stored data could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("stored inventory data is not valid: {0}")]
    Corrupt(String),
}

impl From<StockError> for StoreError {
    fn from(error: StockError) -> Self {
        Self::Corrupt(error.to_string())
    }
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn count(value: i64) -> Result<u32, StoreError> {
    u32::try_from(value).map_err(|_| corrupt(format!("count {value}")))
}

/// The stock of `sku`, unlocked; none when it was never counted.
pub async fn stock(db: &mut AnyConnection, sku: &Sku) -> Result<Option<Stock>, StoreError> {
    read_stock(db, sku, "").await
}

/// The stock of `sku`, read with `lock` (from [`lock_row`]).
async fn read_stock(
    db: &mut AnyConnection,
    sku: &Sku,
    lock: &'static str,
) -> Result<Option<Stock>, StoreError> {
    let sql = format!("SELECT on_hand, reserved FROM stock WHERE sku = $1{lock}");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(sku.as_str())
        .fetch_optional(db)
        .await?;
    row.map(|row| {
        Ok(Stock::from_counts(
            sku.clone(),
            count(row.try_get("on_hand")?)?,
            count(row.try_get("reserved")?)?,
        )?)
    })
    .transpose()
}

/// The stock of `sku`, locked for the rest of the transaction (empty when never counted).
pub async fn locked_stock(db: &mut AnyConnection, sku: &Sku) -> Result<Stock, StoreError> {
    let found = match lock_row(db, "stock", "sku", sku.as_str()).await? {
        Some(lock) => read_stock(db, sku, lock).await?,
        None => None,
    };
    Ok(found.unwrap_or_else(|| Stock::empty(sku.clone())))
}

pub async fn save_stock(db: &mut AnyConnection, stock: &Stock, now: i64) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO stock (sku, on_hand, reserved, updated_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (sku) DO UPDATE SET on_hand = excluded.on_hand, \
         reserved = excluded.reserved, updated_at = excluded.updated_at",
    )
    .bind(stock.sku().as_str())
    .bind(i64::from(stock.on_hand()))
    .bind(i64::from(stock.reserved()))
    .bind(now)
    .execute(db)
    .await?;
    Ok(())
}

/// Creates reservation `id` in `status` unless it exists; true when created. The insert
/// locks the new row (a concurrent insert of the same id waits for this transaction).
pub async fn create_reservation(
    db: &mut AnyConnection,
    id: &ReservationId,
    status: Status,
    expires_at: i64,
    now: i64,
) -> Result<bool, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO reservations (id, status, expires_at, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $4) ON CONFLICT (id) DO NOTHING",
    )
    .bind(id.as_str())
    .bind(status.as_str())
    .bind(expires_at)
    .bind(now)
    .execute(db)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

pub async fn add_lines(
    db: &mut AnyConnection,
    id: &ReservationId,
    lines: impl Iterator<Item = &Line>,
) -> Result<(), StoreError> {
    for line in lines {
        sqlx::query(
            "INSERT INTO reservation_lines (reservation_id, sku, quantity) VALUES ($1, $2, $3)",
        )
        .bind(id.as_str())
        .bind(line.sku.as_str())
        .bind(i64::from(line.quantity.get()))
        .execute(&mut *db)
        .await?;
    }
    Ok(())
}

/// A stored reservation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct Reservation {
    pub id: ReservationId,
    pub status: Status,
    /// Unix milliseconds.
    pub expires_at: i64,
    /// In SKU order; none for a reservation refused or released before it was made.
    pub lines: Vec<Line>,
}

/// Reservation `id`, locked for the rest of the transaction when `lock`.
pub async fn reservation(
    db: &mut AnyConnection,
    id: &ReservationId,
    lock: bool,
) -> Result<Option<Reservation>, StoreError> {
    let lock = if lock {
        match lock_row(db, "reservations", "id", id.as_str()).await? {
            Some(lock) => lock,
            None => return Ok(None),
        }
    } else {
        ""
    };
    let sql = format!("SELECT status, expires_at FROM reservations WHERE id = $1{lock}");
    let Some(row) = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.as_str())
        .fetch_optional(&mut *db)
        .await?
    else {
        return Ok(None);
    };
    let status: String = row.try_get("status")?;
    let status = Status::parse(&status).ok_or_else(|| corrupt(format!("status {status:?}")))?;
    let rows = sqlx::query("SELECT sku, quantity FROM reservation_lines WHERE reservation_id = $1")
        .bind(id.as_str())
        .fetch_all(&mut *db)
        .await?;
    let lines = rows
        .iter()
        .map(|row| {
            Ok(Line {
                sku: row.try_get::<String, _>("sku")?.parse().map_err(corrupt)?,
                quantity: Quantity::new(row.try_get("quantity")?).map_err(corrupt)?,
            })
        })
        .collect::<Result<Vec<Line>, StoreError>>()?;
    // Sorted here, not by the database's collation, which may not order SKUs as Rust does:
    // rows are locked in this order, the same as a reservation's.
    let mut lines = lines;
    lines.sort_by(|a, b| a.sku.cmp(&b.sku));
    Ok(Some(Reservation {
        id: id.clone(),
        status,
        expires_at: row.try_get("expires_at")?,
        lines,
    }))
}

pub async fn set_status(
    db: &mut AnyConnection,
    id: &ReservationId,
    status: Status,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE reservations SET status = $1, updated_at = $2 WHERE id = $3")
        .bind(status.as_str())
        .bind(now)
        .bind(id.as_str())
        .execute(db)
        .await?;
    Ok(())
}

/// Held reservations whose time ran out by `now` (Unix ms), oldest first.
pub async fn overdue(
    db: &mut AnyConnection,
    now: i64,
    limit: i64,
) -> Result<Vec<ReservationId>, StoreError> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM reservations WHERE status = 'held' AND expires_at <= $1 \
         ORDER BY expires_at LIMIT $2",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(db)
    .await?;
    ids.iter().map(|id| id.parse().map_err(corrupt)).collect()
}
