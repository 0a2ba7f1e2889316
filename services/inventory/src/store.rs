//! Stock and reservations in the inventory's database (PostgreSQL or SQLite, one code
//! path). Rows are locked ([`lock_row`], [`lock_rows`]) before they are read in a
//! transaction that will write them, so the domain logic runs on counts nobody else can
//! change.

use std::collections::BTreeMap;

use keel_sdk::data::{lock_row, lock_rows, value_rows};
use keel_sdk::sqlx::{self, AnyConnection, Row, any::AnyRow};

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

/// Rows per statement up to which it is prepared and kept in the connection's cache (a
/// command has one or two lines, mostly; up to 50, each count a statement of its own).
const PREPARED_ROWS: usize = 4;

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn count(value: i64) -> Result<u32, StoreError> {
    u32::try_from(value).map_err(|_| corrupt(format!("count {value}")))
}

/// The stock of `sku`, unlocked; none when it was never counted.
pub async fn stock(db: &mut AnyConnection, sku: &Sku) -> Result<Option<Stock>, StoreError> {
    let row = sqlx::query("SELECT sku, on_hand, reserved FROM stock WHERE sku = $1")
        .bind(sku.as_str())
        .fetch_optional(db)
        .await?;
    row.as_ref().map(stock_of).transpose()
}

fn stock_of(row: &AnyRow) -> Result<Stock, StoreError> {
    let sku: String = row.try_get("sku")?;
    Ok(Stock::from_counts(
        sku.parse().map_err(corrupt)?,
        count(row.try_get("on_hand")?)?,
        count(row.try_get("reserved")?)?,
    )?)
}

/// The stock of each of `skus`, in their order, locked for the rest of the transaction
/// (empty for a SKU never counted), read in one statement. Every lock of stock rows goes
/// through here, in the database's order of `sku` ([`lock_rows`]), so that reservations
/// never wait for each other in a cycle.
pub async fn locked_stocks(
    db: &mut AnyConnection,
    skus: &[&Sku],
) -> Result<Vec<Stock>, StoreError> {
    let keys: Vec<&str> = skus.iter().map(|sku| sku.as_str()).collect();
    let mut found = BTreeMap::new();
    // No SKUs: nothing to read, as `lock_rows` says (`IN ()` is no SQL on PostgreSQL).
    if let Some(lock) = lock_rows(db, "stock", "sku", &keys).await? {
        // Placeholders only: the SKUs are bound.
        let sql = format!(
            "SELECT sku, on_hand, reserved FROM stock WHERE sku IN {} ORDER BY sku{lock}",
            value_rows(1, keys.len(), 1)
        );
        let mut query =
            sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(keys.len() <= PREPARED_ROWS);
        for key in &keys {
            query = query.bind(*key);
        }
        for row in query.fetch_all(&mut *db).await? {
            let stock = stock_of(&row)?;
            found.insert(stock.sku().clone(), stock);
        }
    }
    Ok(skus
        .iter()
        .map(|sku| {
            found
                .remove(*sku)
                .unwrap_or_else(|| Stock::empty((*sku).clone()))
        })
        .collect())
}

/// The stock of `sku`, locked for the rest of the transaction ([`locked_stocks`]).
pub async fn locked_stock(db: &mut AnyConnection, sku: &Sku) -> Result<Stock, StoreError> {
    let mut stocks = locked_stocks(db, &[sku]).await?;
    Ok(stocks.pop().unwrap_or_else(|| Stock::empty(sku.clone())))
}

/// Writes `stocks` (each SKU once), in one statement.
pub async fn save_stocks(
    db: &mut AnyConnection,
    stocks: &[Stock],
    now: i64,
) -> Result<(), StoreError> {
    if stocks.is_empty() {
        return Ok(());
    }
    let sql = upsert_stocks(stocks.len(), 1);
    let save = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(stocks.len() <= PREPARED_ROWS);
    bind_stocks(save, stocks, now).execute(db).await?;
    Ok(())
}

/// Writes new reservation `id`'s lines and the `stocks` they moved: on PostgreSQL in one
/// statement (the lines' insert in its `WITH`: one round trip for both, of the two that a
/// reservation's writes took), on SQLite (no writes in `WITH`) in one each.
pub async fn save_reservation(
    db: &mut AnyConnection,
    id: &ReservationId,
    lines: &[Line],
    stocks: &[Stock],
    now: i64,
) -> Result<(), StoreError> {
    if lines.is_empty()
        || stocks.is_empty()
        || db.backend_name() != <sqlx::Postgres as sqlx::Database>::NAME
    {
        add_lines(db, id, lines).await?;
        return save_stocks(db, stocks, now).await;
    }
    let sql = format!(
        "WITH lines AS ({}) {}",
        insert_lines(lines.len()),
        upsert_stocks(stocks.len(), 1 + 3 * lines.len())
    );
    let prepared = lines.len() <= PREPARED_ROWS && stocks.len() <= PREPARED_ROWS;
    let save = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(prepared);
    let save = bind_lines(save, id, lines);
    bind_stocks(save, stocks, now).execute(db).await?;
    Ok(())
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

/// The upsert of `rows` stock rows, its placeholders numbered from `first` ([`bind_stocks`]).
fn upsert_stocks(rows: usize, first: usize) -> String {
    format!(
        "INSERT INTO stock (sku, on_hand, reserved, updated_at) VALUES {} \
         ON CONFLICT (sku) DO UPDATE SET on_hand = excluded.on_hand, \
         reserved = excluded.reserved, updated_at = excluded.updated_at",
        value_rows(rows, 4, first)
    )
}

fn bind_stocks<'q>(mut query: Query<'q>, stocks: &'q [Stock], now: i64) -> Query<'q> {
    for stock in stocks {
        query = query
            .bind(stock.sku().as_str())
            .bind(i64::from(stock.on_hand()))
            .bind(i64::from(stock.reserved()))
            .bind(now);
    }
    query
}

/// The insert of `rows` reservation lines, from placeholder `$1` ([`bind_lines`]).
fn insert_lines(rows: usize) -> String {
    format!(
        "INSERT INTO reservation_lines (reservation_id, sku, quantity) VALUES {}",
        value_rows(rows, 3, 1)
    )
}

fn bind_lines<'q>(mut query: Query<'q>, id: &'q ReservationId, lines: &'q [Line]) -> Query<'q> {
    for line in lines {
        query = query
            .bind(id.as_str())
            .bind(line.sku.as_str())
            .bind(i64::from(line.quantity.get()));
    }
    query
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

/// Writes reservation `id`'s lines, in one statement.
pub async fn add_lines(
    db: &mut AnyConnection,
    id: &ReservationId,
    lines: &[Line],
) -> Result<(), StoreError> {
    if lines.is_empty() {
        return Ok(());
    }
    let sql = insert_lines(lines.len());
    let insert = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(lines.len() <= PREPARED_ROWS);
    bind_lines(insert, id, lines).execute(db).await?;
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
    // The row and its lines in one statement (one round trip); on PostgreSQL the lock is
    // the reservation's alone (`OF r`: lines sit on the nullable side of the join).
    let of = if lock.is_empty() { "" } else { " OF r" };
    let sql = format!(
        "SELECT r.status, r.expires_at, l.sku, l.quantity FROM reservations r \
         LEFT JOIN reservation_lines l ON l.reservation_id = r.id WHERE r.id = $1{lock}{of}"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.as_str())
        .fetch_all(&mut *db)
        .await?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let status: String = row.try_get("status")?;
    let status = status_of(&status)?;
    let expires_at = row.try_get("expires_at")?;
    let mut lines = Vec::with_capacity(rows.len());
    for row in &rows {
        // A reservation without lines is one row whose line columns are null.
        if row.try_get::<Option<String>, _>("sku")?.is_some() {
            lines.push(line_of(row)?);
        }
    }
    // Sorted here, not by the database's collation, which may not order SKUs as Rust does:
    // in the order of a reservation's lines, to compare with a repeated command's.
    lines.sort_by(|a, b| a.sku.cmp(&b.sku));
    Ok(Some(Reservation {
        id: id.clone(),
        status,
        expires_at,
        lines,
    }))
}

/// Reservation `id` and the stock of each of its lines (in the lines' order), all locked
/// for the rest of the transaction; none when there is no reservation `id`. On PostgreSQL
/// one statement reads and locks them all (the reservation first, then the stock rows in
/// `sku` order, as [`locked_stocks`] does, so no cycle with a reservation being made); on
/// SQLite, or for a reservation without lines, [`reservation`] then [`locked_stocks`].
pub async fn locked_reservation(
    db: &mut AnyConnection,
    id: &ReservationId,
) -> Result<Option<(Reservation, Vec<Stock>)>, StoreError> {
    if db.backend_name() == <sqlx::Postgres as sqlx::Database>::NAME {
        // Inner joins, so that `FOR UPDATE` may lock the stock rows (not on the nullable
        // side of an outer join); `lines` counts them all, so that a line whose stock row
        // were missing is noticed and read the general way instead of dropped.
        let rows = sqlx::query(
            "SELECT r.status, r.expires_at, l.sku, l.quantity, s.on_hand, s.reserved, \
             (SELECT count(*) FROM reservation_lines c WHERE c.reservation_id = r.id) AS lines \
             FROM reservations r JOIN reservation_lines l ON l.reservation_id = r.id \
             JOIN stock s ON s.sku = l.sku WHERE r.id = $1 ORDER BY l.sku FOR UPDATE OF r, s",
        )
        .bind(id.as_str())
        .fetch_all(&mut *db)
        .await?;
        if let Some(first) = rows.first()
            && usize::try_from(first.try_get::<i64, _>("lines")?) == Ok(rows.len())
        {
            let status: String = first.try_get("status")?;
            let mut pairs = Vec::with_capacity(rows.len());
            for row in &rows {
                let line = line_of(row)?;
                let stock = Stock::from_counts(
                    line.sku.clone(),
                    count(row.try_get("on_hand")?)?,
                    count(row.try_get("reserved")?)?,
                )?;
                pairs.push((line, stock));
            }
            // In Rust's order of SKUs, as [`reservation`] gives the lines.
            pairs.sort_by(|(a, _), (b, _)| a.sku.cmp(&b.sku));
            let (lines, stocks) = pairs.into_iter().unzip();
            let reservation = Reservation {
                id: id.clone(),
                status: status_of(&status)?,
                expires_at: first.try_get("expires_at")?,
                lines,
            };
            return Ok(Some((reservation, stocks)));
        }
    }
    let Some(reservation) = reservation(db, id, true).await? else {
        return Ok(None);
    };
    let skus: Vec<&Sku> = reservation.lines.iter().map(|line| &line.sku).collect();
    let stocks = locked_stocks(db, &skus).await?;
    Ok(Some((reservation, stocks)))
}

fn line_of(row: &AnyRow) -> Result<Line, StoreError> {
    let sku: String = row.try_get("sku")?;
    Ok(Line {
        sku: sku.parse().map_err(corrupt)?,
        quantity: Quantity::new(row.try_get("quantity")?).map_err(corrupt)?,
    })
}

fn status_of(status: &str) -> Result<Status, StoreError> {
    Status::parse(status).ok_or_else(|| corrupt(format!("status {status:?}")))
}

pub async fn set_status(
    db: &mut AnyConnection,
    id: &ReservationId,
    status: Status,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(SET_STATUS)
        .bind(status.as_str())
        .bind(now)
        .bind(id.as_str())
        .execute(db)
        .await?;
    Ok(())
}

/// Placeholders `$1` to `$3`: status, time, id.
const SET_STATUS: &str = "UPDATE reservations SET status = $1, updated_at = $2 WHERE id = $3";

/// Writes reservation `id`'s new `status` (when it has one) and the `stocks` it moved: on
/// PostgreSQL in one statement (the status update in the `WITH` of the stock rows' upsert),
/// on SQLite in one each.
pub async fn save_moved(
    db: &mut AnyConnection,
    id: &ReservationId,
    status: Option<Status>,
    stocks: &[Stock],
    now: i64,
) -> Result<(), StoreError> {
    let Some(status) = status else {
        return save_stocks(db, stocks, now).await;
    };
    if stocks.is_empty() || db.backend_name() != <sqlx::Postgres as sqlx::Database>::NAME {
        set_status(db, id, status, now).await?;
        return save_stocks(db, stocks, now).await;
    }
    let sql = format!(
        "WITH moved AS ({SET_STATUS}) {}",
        upsert_stocks(stocks.len(), 4)
    );
    let save = sqlx::query(sqlx::AssertSqlSafe(sql))
        .persistent(stocks.len() <= PREPARED_ROWS)
        .bind(status.as_str())
        .bind(now)
        .bind(id.as_str());
    bind_stocks(save, stocks, now).execute(db).await?;
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
