//! The transactional outbox and its relay.
//!
//! [`Bus::stage`](super::Bus::stage) inserts the envelope into `keel_outbox` in the
//! caller's transaction. The relay publishes rows in id order and deletes each batch once
//! the broker has confirmed it, with its next look at the table (the next commit's, at the
//! latest a poll interval later; at once when stopping): a crash before that publishes the
//! batch again, which consumers' inboxes absorb (at least once, never lost).
//!
//! Only one relay per database publishes at a time, so one aggregate's events keep their
//! commit order: on PostgreSQL the leader holds a session advisory lock on a connection of
//! its own (released by the server if the process dies); on SQLite, a lock file beside
//! the database (released by the kernel). The others wait and take over.

use std::time::Duration;

use keel_runtime::Shutdown;
use sqlx::{AnyConnection, Row};

use super::{Bus, BusError, Envelope, Outgoing, reconnect_delay};
use crate::data::{Backend, Database, FileLock, value_rows};

/// The relay's advisory lock (PostgreSQL): "keel" and "outbox" in ASCII, shortened.
const RELAY_LOCK: i64 = 0x6b65_656c_6f62;

/// An envelope staged in a transaction: written into `keel_outbox` when the transaction
/// commits, all of them in one statement ([`write`]).
pub(crate) struct Staged {
    event_id: String,
    event_type: String,
    subject: Option<String>,
    envelope: String,
}

impl Staged {
    /// `envelope`, serialized as `payload` (JSON, so UTF-8: taken as it is).
    pub(crate) fn new(envelope: &Envelope, payload: Vec<u8>) -> Self {
        Self {
            event_id: envelope.id.clone(),
            event_type: envelope.event_type.clone(),
            subject: envelope.subject.clone(),
            envelope: String::from_utf8(payload)
                .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned()),
        }
    }
}

/// Rows per `INSERT`: one statement for what a transaction usually stages, and few
/// statement shapes for the connection's cache (past [`PREPARED_ROWS`], not prepared).
const ROWS_PER_INSERT: usize = 32;
const PREPARED_ROWS: usize = 4;

/// Writes `staged` into the outbox within the transaction on `connection`, in staging
/// order (ids are drawn here, while the transaction still holds its locks).
pub(crate) async fn write(
    connection: &mut AnyConnection,
    staged: &[Staged],
) -> Result<(), sqlx::Error> {
    let created_at = crate::data::unix_millis();
    for chunk in staged.chunks(ROWS_PER_INSERT) {
        let rows = value_rows(chunk.len(), 5, 1);
        let sql = format!(
            "INSERT INTO keel_outbox (event_id, event_type, subject, envelope, created_at) VALUES {rows}"
        );
        // Placeholders only: the values are bound.
        let mut insert =
            sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(chunk.len() <= PREPARED_ROWS);
        for row in chunk {
            insert = insert
                .bind(&row.event_id)
                .bind(&row.event_type)
                .bind(row.subject.as_deref())
                .bind(&row.envelope)
                .bind(created_at);
        }
        insert.execute(&mut *connection).await?;
    }
    Ok(())
}

/// The statement deleting the `published` rows; none when there are none. Exactly the
/// published ids: a row with a lower id may commit after their select (ids are drawn before
/// commit), and must stay for a later batch. Integers only, read from the table: no input.
fn delete_published(published: &[i64]) -> Option<String> {
    if published.is_empty() {
        return None;
    }
    let list = published
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    Some(format!("DELETE FROM keel_outbox WHERE id IN ({list})"))
}

/// How the relay paces itself.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// How often to look for events committed by other instances (this instance's own
    /// commits wake the relay at once), and how often a waiting relay tries to lead.
    pub poll_interval: Duration,
    /// Rows published per confirm round.
    pub batch_size: u32,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(500),
            batch_size: 100,
        }
    }
}

/// Publishes the outbox of one database. Run it beside the service ([`Relay::run`]).
pub struct Relay {
    bus: Bus,
    db: Database,
    options: RelayOptions,
}

/// Proof of being the one relay that publishes: dropping it gives the lead up.
enum Lead {
    /// A connection of its own holding the advisory lock; the relay reads through it, so
    /// losing the connection (and with it the lock) stops the relay at once.
    Postgres(AnyConnection),
    /// The lock file, held (for its lock) until dropped; none for in-memory SQLite.
    Sqlite { _lock: Option<std::fs::File> },
}

impl Relay {
    pub(crate) fn new(bus: Bus, db: Database) -> Self {
        Self {
            bus,
            db,
            options: RelayOptions::default(),
        }
    }

    pub fn options(mut self, options: RelayOptions) -> Self {
        self.options = options;
        self
    }

    /// Relays until `shutdown`: waits to lead, then publishes whatever commits.
    pub async fn run(self, shutdown: Shutdown) {
        let mut failures = 0;
        while !shutdown.is_triggered() {
            let lead = match self.lead().await {
                Ok(Some(lead)) => lead,
                Ok(None) => {
                    tokio::select! {
                        () = tokio::time::sleep(self.options.poll_interval) => continue,
                        () = shutdown.wait() => return,
                    }
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, "outbox relay cannot reach the database");
                    tokio::select! {
                        () = tokio::time::sleep(reconnect_delay(failures)) => continue,
                        () = shutdown.wait() => return,
                    }
                }
            };
            tracing::debug!("outbox relay leads");
            if let Err(error) = self.relay(lead, &shutdown, &mut failures).await {
                failures += 1;
                tracing::warn!(%error, "outbox relay stopped; it will try again");
                tokio::select! {
                    () = tokio::time::sleep(reconnect_delay(failures)) => {}
                    () = shutdown.wait() => return,
                }
            }
        }
    }

    /// Publishes everything in the outbox now, once this relay leads; returns how many
    /// events (for tools and tests; [`Relay::run`] is the service's way).
    pub async fn drain(&self) -> Result<usize, BusError> {
        let mut lead = loop {
            if let Some(lead) = self.lead().await? {
                break lead;
            }
            tokio::time::sleep(self.options.poll_interval).await;
        };
        let (mut relayed, mut published) = (0, Vec::new());
        loop {
            let batch = self.relay_batch(&mut lead, &mut published).await?;
            if batch == 0 {
                return Ok(relayed);
            }
            relayed += batch;
        }
    }

    async fn lead(&self) -> Result<Option<Lead>, BusError> {
        match self.db.backend() {
            Backend::Postgres => {
                let mut connection = self.db.pool().acquire().await?;
                let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(RELAY_LOCK)
                    .fetch_one(&mut *connection)
                    .await?;
                // Out of the pool only when it holds the lock (a failed try holds nothing,
                // so the connection goes back for reuse).
                Ok(locked.then(|| Lead::Postgres(connection.detach())))
            }
            Backend::Sqlite => Ok(match self.db.file_lock("relay")? {
                FileLock::Held(file) => Some(Lead::Sqlite { _lock: Some(file) }),
                FileLock::Busy(_) => None,
                FileLock::Unneeded => Some(Lead::Sqlite { _lock: None }),
            }),
        }
    }

    async fn relay(
        &self,
        mut lead: Lead,
        shutdown: &Shutdown,
        failures: &mut u32,
    ) -> Result<(), BusError> {
        let mut published = Vec::new();
        loop {
            let relayed = self.relay_batch(&mut lead, &mut published).await?;
            *failures = 0;
            // A full batch: more may be waiting. Otherwise the batch's rows are deleted by the
            // next look, which the next commit (or the poll interval) brings: one round trip
            // for both, where deleting now would take one of its own.
            if relayed >= self.options.batch_size as usize {
                continue;
            }
            tokio::select! {
                () = self.db.outbox_ready().notified() => {}
                () = tokio::time::sleep(self.options.poll_interval) => {}
                () = shutdown.wait() => {
                    // Deleted now, or the next relay would publish them again.
                    if let Some(delete) = delete_published(&published) {
                        let delete = sqlx::raw_sql(sqlx::AssertSqlSafe(delete));
                        let _ = match &mut lead {
                            Lead::Postgres(connection) => delete.execute(connection).await,
                            Lead::Sqlite { .. } => delete.execute(self.db.pool()).await,
                        };
                    }
                    if let Lead::Postgres(connection) = lead {
                        let _ = sqlx::Connection::close(connection).await;
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Deletes the rows the last call published (`published`, confirmed by the broker)
    /// and publishes the oldest batch, leaving its ids in `published` for the next call,
    /// which the caller makes at once after a full batch, else at the next commit or poll;
    /// returns the batch's size. The delete and the select go to the database as one round
    /// trip (one implicit transaction).
    async fn relay_batch(
        &self,
        lead: &mut Lead,
        published: &mut Vec<i64>,
    ) -> Result<usize, BusError> {
        let select = format!(
            "SELECT id, event_id, event_type, subject, envelope FROM keel_outbox ORDER BY id LIMIT {}",
            self.options.batch_size
        );
        let sql = match delete_published(published) {
            Some(delete) => format!("{delete}; {select}"),
            None => select,
        };
        // Integers only, read from the table or configured: never input. Not prepared
        // (the list differs every time): the simple protocol, one round trip.
        let query = sqlx::raw_sql(sqlx::AssertSqlSafe(sql));
        let rows = match lead {
            Lead::Postgres(connection) => query.fetch_all(connection).await?,
            Lead::Sqlite { .. } => query.fetch_all(self.db.pool()).await?,
        };
        published.clear();
        if rows.is_empty() {
            return Ok(0);
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut batch = Vec::with_capacity(rows.len());
        for row in &rows {
            ids.push(row.try_get::<i64, _>("id")?);
            batch.push(Outgoing {
                id: row.try_get("event_id")?,
                event_type: row.try_get("event_type")?,
                #[cfg(feature = "kafka")]
                key: row.try_get("subject")?,
                payload: row.try_get::<String, _>("envelope")?.into_bytes(),
            });
        }
        self.bus.publish_batch(&batch, false).await?;
        *published = ids;
        metrics::counter!("keel_outbox_relayed_total").increment(rows.len() as u64);
        Ok(rows.len())
    }
}
