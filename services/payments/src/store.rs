//! Payments in the payments database (PostgreSQL or SQLite, one code path). A payment's
//! row is locked ([`lock_row`]) before it is read in a transaction that changes it.
//!
//! A row `pending` is a claim: inside a command's transaction while it asks the provider
//! (never committed so), or committed by an HTTP request before it asks ([`claim`] with a body),
//! which then holds no transaction during the call (the first migration's comment, "never
//! committed", predates that; migrations are not edited once applied).

use keel_sdk::data::lock_row;
use keel_sdk::sqlx::{self, AnyConnection, Row};
use keel_shop_kernel::Money;

use crate::contract::Payment;
use crate::domain::{PaymentId, PaymentMethod, Status};

/// A payment's row: a claim whose authorization is still being asked of the provider (an
/// HTTP request's, committed before the call), or a payment.
#[derive(Debug)]
pub enum Stored {
    Claimed(Claim),
    Payment(Payment),
}

/// A claim on a payment id, as committed by the request that made it.
#[derive(Debug)]
pub struct Claim {
    pub amount: Option<Money>,
    pub method: Option<PaymentMethod>,
    /// When it was claimed (or taken over), Unix seconds: its owner's mark.
    pub since: i64,
}

impl Claim {
    /// Whether it was made for `amount` on `method`.
    pub fn is_for(&self, amount: Money, method: &PaymentMethod) -> bool {
        self.amount == Some(amount) && self.method.as_ref() == Some(method)
    }
}

/// Why stored data could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("a stored payment is not valid: {0}")]
    Corrupt(String),
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

/// Inserts payment `id` as pending unless it exists; true when inserted. A command's
/// claim has no `body` and is never committed: a concurrent insert of the same id waits for
/// its transaction, so commands make one provider call per payment. An HTTP request's claim
/// carries the amount and method it was made for and is committed before the provider is
/// asked (a request taking over a claim it believes abandoned may make a second call, which
/// the provider, idempotent by id, answers alike).
pub async fn claim(
    db: &mut AnyConnection,
    id: &PaymentId,
    body: Option<(Money, &PaymentMethod)>,
    now: i64,
) -> Result<bool, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO payments (id, status, amount_minor, currency, method, created_at, updated_at) \
         VALUES ($1, 'pending', $2, $3, $4, $5, $5) ON CONFLICT (id) DO NOTHING",
    )
    .bind(id.as_str())
    .bind(body.map(|(amount, _)| amount.minor()))
    .bind(body.map(|(amount, _)| amount.currency().as_str().to_owned()))
    .bind(body.map(|(_, method)| method.as_str().to_owned()))
    .bind(now)
    .execute(db)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Takes over the claim of payment `id` made at `since` (its owner gone); true when taken.
pub async fn take_over(
    db: &mut AnyConnection,
    id: &PaymentId,
    since: i64,
    now: i64,
) -> Result<bool, StoreError> {
    let taken = sqlx::query(
        "UPDATE payments SET updated_at = $3 WHERE id = $1 AND status = 'pending' AND updated_at = $2",
    )
    .bind(id.as_str())
    .bind(since)
    .bind(now)
    .execute(db)
    .await?;
    Ok(taken.rows_affected() == 1)
}

/// Gives up the claim of payment `id` made at `since`, unless another took it over.
pub async fn release(db: &mut AnyConnection, id: &PaymentId, since: i64) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM payments WHERE id = $1 AND status = 'pending' AND updated_at = $2")
        .bind(id.as_str())
        .bind(since)
        .execute(db)
        .await?;
    Ok(())
}

/// Payment `id`'s row, locked for the rest of the transaction when `lock`.
pub async fn get(
    db: &mut AnyConnection,
    id: &PaymentId,
    lock: bool,
) -> Result<Option<Stored>, StoreError> {
    let lock = if lock {
        match lock_row(db, "payments", "id", id.as_str()).await? {
            Some(lock) => lock,
            None => return Ok(None),
        }
    } else {
        ""
    };
    let sql = format!(
        "SELECT status, amount_minor, currency, method, decline_reason, updated_at FROM payments WHERE id = $1{lock}"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.as_str())
        .fetch_optional(db)
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let status: String = row.try_get("status")?;
    let minor: Option<i64> = row.try_get("amount_minor")?;
    let currency: Option<String> = row.try_get("currency")?;
    let amount = match (minor, currency) {
        (Some(minor), Some(currency)) => {
            Some(Money::new(minor, currency.parse().map_err(corrupt)?).map_err(corrupt)?)
        }
        _ => None,
    };
    let method: Option<String> = row.try_get("method")?;
    let method = method.map(|m| m.parse()).transpose().map_err(corrupt)?;
    if status == "pending" {
        return Ok(Some(Stored::Claimed(Claim {
            amount,
            method,
            since: row.try_get("updated_at")?,
        })));
    }
    Ok(Some(Stored::Payment(Payment {
        id: id.clone(),
        status: Status::parse(&status).ok_or_else(|| corrupt(format!("status {status:?}")))?,
        amount,
        method,
        decline_reason: row.try_get("decline_reason")?,
    })))
}

/// Writes `payment` over its row (claimed or locked by this transaction).
pub async fn save(db: &mut AnyConnection, payment: &Payment, now: i64) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO payments (id, status, amount_minor, currency, method, decline_reason, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7) \
         ON CONFLICT (id) DO UPDATE SET status = excluded.status, amount_minor = excluded.amount_minor, \
         currency = excluded.currency, method = excluded.method, \
         decline_reason = excluded.decline_reason, updated_at = excluded.updated_at",
    )
    .bind(payment.id.as_str())
    .bind(payment.status.as_str())
    .bind(payment.amount.map(|a| a.minor()))
    .bind(payment.amount.map(|a| a.currency().as_str().to_owned()))
    .bind(payment.method.as_ref().map(|m| m.as_str().to_owned()))
    .bind(payment.decline_reason.as_deref())
    .bind(now)
    .execute(db)
    .await?;
    Ok(())
}
