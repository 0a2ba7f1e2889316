//! Orchestrated sagas: a sequence of steps, each a command sent over the bus and answered
//! by a reply, each with a compensation that undoes it; on a failure or a step's timeout,
//! the steps done so far are compensated in reverse order.
//!
//! Everything is durable and transactional. The saga's state lives in the orchestrator's
//! database (`keel_sagas`, its history in `keel_saga_steps`), and every change to it is
//! committed together with the next command, staged in the outbox. A crash at any point
//! leaves either the old state or the new one and its command. Replies come back as events
//! on the bus and are handled through the inbox. Timeouts are deadlines in the table,
//! swept by whichever orchestrator instance gets there first. A transition locks the row
//! before it reads it, or starts from the state this instance left the saga in (cached
//! as it committed) and writes over the row only at that version, so instances never both
//! advance one saga.
//!
//! Commands can arrive more than once, and a compensation can be sent again after a
//! timeout, so every participant must handle its commands idempotently (by business key:
//! release the reservation of order X).
//!
//! ```ignore
//! let saga = Saga::<Order>::new("order")
//!     .step(Step::new("reserve", |order: &Order, _| Reserve { .. })
//!         .compensate(|order, _| Release { .. })
//!         .timeout(Duration::from_secs(5)))
//!     .step(Step::new("authorize", |order, _| Authorize { .. })
//!         .compensate(|order, results| Void { id: results["authorize"]["id"].clone() }));
//! let orchestrator = Orchestrator::new(&bus, &db, saga);
//! orchestrator.start(&mut tx, &order).await?;   // in the transaction that creates the order
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use keel_runtime::Shutdown;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::{AnyConnection, Row};

use crate::data::{Backend, Database, Tx, unix_millis as now_millis, value_rows};
use crate::events::consumer::Dispatch;
use crate::events::{Bus, BusError, Consumer, Envelope, Event, HandlerError, Reply};

/// What earlier steps replied, by step name (their [`Reply::data`]).
pub type Results = BTreeMap<String, serde_json::Value>;

/// Makes a step's command envelope from the saga's data and the results so far.
type Build<D> = Box<dyn Fn(&D, &Results) -> Result<Envelope, serde_json::Error> + Send + Sync>;

fn build<D, C, F>(make: F) -> Build<D>
where
    C: Event,
    F: Fn(&D, &Results) -> C + Send + Sync + 'static,
{
    // The source is set when the command is sent, from the orchestrator's bus.
    Box::new(move |data, results| Envelope::new("saga", &make(data, results)))
}

/// One step of a saga: the command that does it, and the one that undoes it.
pub struct Step<D> {
    name: &'static str,
    action: Build<D>,
    compensation: Option<Build<D>>,
    timeout: Duration,
    resend: bool,
}

impl<D: 'static> Step<D> {
    /// A step named `name` (unique in its saga) that sends `action(data, results)`.
    pub fn new<C: Event>(
        name: &'static str,
        action: impl Fn(&D, &Results) -> C + Send + Sync + 'static,
    ) -> Self {
        Self {
            name,
            action: build(action),
            compensation: None,
            timeout: Duration::from_secs(30),
            resend: false,
        }
    }

    /// What undoes the step once it is done, should a later step fail.
    pub fn compensate<C: Event>(
        mut self,
        compensation: impl Fn(&D, &Results) -> C + Send + Sync + 'static,
    ) -> Self {
        self.compensation = Some(build(compensation));
        self
    }

    /// How long the step's reply may take (30 s by default); past it the step counts as
    /// failed. A compensation gets as long, and is sent again when it runs out (each wait
    /// twice the one before, up to 64 times the timeout).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Past its timeout, or refused, the command is sent again (as a compensation is)
    /// instead of the step failing: for a command that is idempotent and always done in
    /// the end (a refund, say), whose participant may only be away or failing for a while.
    pub fn resend_on_timeout(mut self) -> Self {
        self.resend = true;
        self
    }
}

/// A saga definition: a name, its steps in order, and what to do when it ends.
pub struct Saga<D> {
    name: &'static str,
    steps: Vec<Step<D>>,
    on_end: Option<Box<dyn EndErased<D>>>,
}

impl<D: Send + 'static> Saga<D> {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            steps: Vec::new(),
            on_end: None,
        }
    }

    pub fn step(mut self, step: Step<D>) -> Self {
        self.steps.push(step);
        self
    }

    /// Runs `on_end` in the transaction that makes a saga completed, compensated or
    /// failed (what the saga was for, an order say, gets its outcome atomically with it).
    pub fn on_end(mut self, on_end: impl OnEnd<D>) -> Self {
        self.on_end = Some(Box::new(on_end));
        self
    }
}

/// How a saga ended, as [`OnEnd`] is told.
#[derive(Debug)]
pub struct Ended<'a, D> {
    pub id: &'a str,
    pub data: D,
    /// Completed, compensated or failed.
    pub status: SagaStatus,
    /// Why it was compensated or failed.
    pub error: Option<&'a str>,
    pub results: &'a Results,
}

/// What a saga's owner does when a saga ends ([`Saga::on_end`]), inside the transition's
/// transaction: an error rolls the transition back, to be tried again.
pub trait OnEnd<D>: Send + Sync + 'static {
    fn ended(
        &self,
        tx: &mut Tx,
        ended: Ended<'_, D>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// [`OnEnd`] with its future boxed, so that a saga can hold it.
trait EndErased<D>: Send + Sync {
    fn ended<'a>(
        &'a self,
        tx: &'a mut Tx,
        ended: Ended<'a, D>,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

impl<D: Send + 'static, T: OnEnd<D>> EndErased<D> for T {
    fn ended<'a>(
        &'a self,
        tx: &'a mut Tx,
        ended: Ended<'a, D>,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(OnEnd::ended(self, tx, ended))
    }
}

/// Where a saga is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    /// Doing its steps.
    Running,
    /// A step failed; undoing the steps done.
    Compensating,
    /// Every step done.
    Completed,
    /// A step failed and everything done before it was undone.
    Compensated,
    /// No longer fits its definition (a step gone, data that cannot be read): marked by
    /// the sweep for someone to look at.
    Failed,
}

impl SagaStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "running" => Self::Running,
            "compensating" => Self::Compensating,
            "completed" => Self::Completed,
            "compensated" => Self::Compensated,
            "failed" => Self::Failed,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Compensated | Self::Failed)
    }
}

/// One line of a saga's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepRecord {
    pub step: String,
    /// `action` or `compensation`.
    pub phase: String,
    /// `sent`, `done`, `failed`, `timed_out`, `skipped` (a step with nothing to undo).
    pub outcome: String,
    pub detail: Option<String>,
    /// Unix milliseconds.
    pub at: i64,
}

/// A saga instance as stored.
#[derive(Debug, Clone, Serialize)]
pub struct SagaInstance {
    pub id: String,
    pub saga: String,
    pub status: SagaStatus,
    /// The step being done or undone (its index).
    pub step: usize,
    pub data: serde_json::Value,
    pub results: Results,
    /// Why it is compensating, compensated or failed.
    pub error: Option<String>,
    pub history: Vec<StepRecord>,
}

/// Why the orchestrator could not do something.
#[derive(Debug, thiserror::Error)]
pub enum SagaError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("saga data: {0}")]
    Data(#[from] serde_json::Error),
    #[error("saga {0} has no steps")]
    Empty(&'static str),
    #[error("saga {0:?}: a saga name is 1 to 100 characters of a-z, 0-9, '-' or '_'")]
    Name(&'static str),
    /// The stored saga no longer fits its definition (or was damaged): it is marked failed.
    #[error("{0}")]
    Definition(String),
    /// The saga's [`OnEnd`] failed: the transition is rolled back, to be tried again.
    #[error("the saga's end could not be recorded: {0}")]
    End(String),
}

/// Replies to a saga's commands are events of type `keel.saga.<name>.reply.v1`.
pub(crate) const REPLY_PREFIX: &str = "keel.saga.";
pub(crate) const REPLY_SUFFIX: &str = ".reply.v1";

/// A command sent again waits twice as long as the time before, up to this many times its
/// step's timeout.
const MAX_BACKOFF: i64 = 64;

/// How long an overdue saga (or followed-up compensation) that could not be handled waits
/// before the sweep tries it again.
const RETRY_LATER: Duration = Duration::from_secs(5);

/// Runs one saga definition: starts instances, handles their replies, sweeps timeouts.
pub struct Orchestrator<D> {
    inner: Arc<Inner<D>>,
}

impl<D> Clone for Orchestrator<D> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<D> {
    bus: Bus,
    db: Database,
    saga: Saga<D>,
    reply_type: String,
    cache: Arc<Cache>,
}

/// Sagas per generation of the [`Cache`].
const CACHED: usize = 4096;

/// The committed state of the sagas this instance last moved, so that the transition a
/// reply makes need not read its saga's row first: it starts from here and writes over
/// the row only where it is still at the cached version ([`Orchestrator::advance`]). Two
/// generations of at most [`CACHED`] sagas: when the newer fills, the older is dropped.
#[derive(Default)]
struct Cache {
    generations: Mutex<[HashMap<String, State>; 2]>,
}

impl Cache {
    /// Takes saga `id`'s state out: put back once the transition that uses it commits.
    fn take(&self, id: &str) -> Option<State> {
        let mut generations = self
            .generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let [newer, older] = &mut *generations;
        newer.remove(id).or_else(|| older.remove(id))
    }

    fn put(&self, id: String, state: State) {
        let mut generations = self
            .generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let [newer, older] = &mut *generations;
        // Two transitions of one saga may report their commits out of order.
        let later = |cached: &State| cached.version >= state.version;
        if newer.get(&id).is_some_and(later) || older.get(&id).is_some_and(later) {
            return;
        }
        older.remove(&id);
        if newer.len() >= CACHED {
            *older = std::mem::take(newer);
        }
        newer.insert(id, state);
    }
}

/// The row of one saga, as a transition reads and writes it.
struct State {
    status: SagaStatus,
    step: usize,
    data: serde_json::Value,
    results: Results,
    error: Option<String>,
    /// Sends of the current command (compensations are sent again on timeout).
    sends: i64,
    /// When the awaited reply is overdue (Unix ms); none once final.
    deadline_at: Option<i64>,
    version: i64,
    /// History lines of the transition under way, written with the row ([`Orchestrator::write`]).
    lines: Vec<Line>,
}

/// A line of a saga's history, about to be written.
struct Line {
    step: &'static str,
    phase: &'static str,
    outcome: &'static str,
    detail: Option<String>,
    at: i64,
}

impl Line {
    fn new(
        step: &'static str,
        phase: &'static str,
        outcome: &'static str,
        detail: Option<String>,
    ) -> Self {
        Self {
            step,
            phase,
            outcome,
            detail,
            at: now_millis(),
        }
    }
}

/// How [`Orchestrator::write`] writes a saga's row.
#[derive(Clone, Copy)]
enum Write {
    /// Over the row at this version.
    Update(i64),
    /// A new saga.
    Insert,
}

/// What applying an answer did.
#[derive(Debug, PartialEq, Eq)]
enum Advanced {
    Moved,
    /// Nothing to do: a late or repeated reply, a saga already finished or moved on.
    Nothing,
}

/// Where a transition's saga state was read.
#[derive(Clone, Copy)]
enum Source {
    /// The row, locked.
    Row,
    /// The [`Cache`]: perhaps stale, so only a move is made from it (written only over
    /// the row at its version); anything else is decided again from the row.
    Cache,
}

/// What came back for the awaited command.
enum Answer {
    Reply(Reply),
    TimedOut,
}

impl<D> Orchestrator<D>
where
    D: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// An orchestrator of `saga`; its name must be short lowercase ASCII (it names the
    /// reply event type, `keel.saga.<name>.reply.v1`).
    pub fn new(bus: &Bus, db: &Database, saga: Saga<D>) -> Result<Self, SagaError> {
        let name = saga.name;
        let valid = !name.is_empty()
            && name.len() <= 100
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !valid {
            return Err(SagaError::Name(name));
        }
        if saga.steps.is_empty() {
            return Err(SagaError::Empty(name));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                reply_type: format!("{REPLY_PREFIX}{name}{REPLY_SUFFIX}"),
                bus: bus.clone(),
                db: db.clone(),
                saga,
                cache: Arc::default(),
            }),
        })
    }

    /// Starts a saga for `data` within `tx` (the transaction that records what the saga is
    /// for); its first command leaves when `tx` commits. Returns the saga's id.
    pub async fn start(&self, tx: &mut Tx, data: &D) -> Result<String, SagaError> {
        let id = uuid::Uuid::now_v7().to_string();
        let data = serde_json::to_value(data)?;
        let mut state = State {
            status: SagaStatus::Running,
            step: 0,
            data,
            results: Results::new(),
            error: None,
            sends: 0,
            deadline_at: None,
            version: 0,
            lines: Vec::new(),
        };
        self.send_current(tx, &id, &mut state).await?;
        // Written once, as it stands after its first send (not inserted, then updated).
        if !self.write(tx, &id, &mut state, Write::Insert).await? {
            return Err(SagaError::Definition(format!("saga {id} not written")));
        }
        self.remember(tx, &id, state);
        Ok(id)
    }

    /// Declares the consumer of this saga's replies in `group` (the orchestrating
    /// service's name, usually); run it with [`Consumer::run`] beside
    /// [`Orchestrator::sweep_timeouts`].
    pub async fn consumer(&self, group: &str) -> Result<Consumer, BusError> {
        let inner = &self.inner;
        inner
            .bus
            .consumer(group, &inner.db)
            .dispatch(&inner.reply_type, Box::new(self.clone()))
            .start()
            .await
    }

    /// Fails the steps whose reply is overdue, every `interval` until `shutdown`.
    pub async fn sweep_timeouts(self, interval: Duration, shutdown: Shutdown) {
        loop {
            if let Err(error) = self.sweep_once().await {
                tracing::warn!(%error, saga = self.inner.saga.name, "saga timeout sweep failed");
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = shutdown.wait() => return,
            }
        }
    }

    /// One sweep: each overdue saga is moved on in a transaction of its own, and each
    /// followed-up compensation whose time ran out is sent again; returns how many sagas
    /// were moved on.
    pub async fn sweep_once(&self) -> Result<usize, SagaError> {
        if let Err(error) = self.sweep_followups().await {
            tracing::warn!(%error, saga = self.inner.saga.name, "followed-up compensations not swept");
        }
        // Through the index of unfinished sagas (migration 0005; the condition is its
        // predicate, word for word, for the planners to use it): an index on the deadline
        // would cost every step's write its index entries.
        let overdue: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM keel_sagas WHERE saga = $1 \
             AND status NOT IN ('completed', 'compensated', 'failed') AND deadline_at <= $2 \
             ORDER BY deadline_at LIMIT 100",
        )
        .bind(self.inner.saga.name)
        .bind(now_millis())
        .fetch_all(self.inner.db.pool())
        .await?;
        let mut moved = 0;
        for id in overdue {
            let mut tx = self.inner.db.begin().await?;
            match self.advance(&mut tx, &id, None, Answer::TimedOut).await {
                Ok(Advanced::Moved) => {
                    tx.commit().await?;
                    moved += 1;
                }
                Ok(Advanced::Nothing) => {}
                // One saga that no longer fits its definition must not hold up the rest.
                Err(error @ (SagaError::Definition(_) | SagaError::Data(_))) => {
                    drop(tx);
                    tracing::error!(saga = %id, %error, "saga cannot go on; marked failed");
                    if let Err(error) = self.mark_failed(&id, &error.to_string()).await {
                        tracing::warn!(saga = %id, %error, "cannot mark the saga failed");
                    }
                }
                // Nor must one that fails now hold up the others: it is tried again later,
                // behind them (each sweep takes the longest overdue first, so sagas failing
                // for good would otherwise fill every sweep).
                Err(error) => {
                    drop(tx);
                    tracing::warn!(saga = %id, %error, "saga timeout not handled; tried again later");
                    self.put_off(&id, None).await;
                }
            }
        }
        Ok(moved)
    }

    /// Marks saga `id` failed, out of the sweep, for someone to look at; only while it is
    /// still unfinished (or its status unknown) and overdue, so a transition that moved it
    /// meanwhile stands.
    async fn mark_failed(&self, id: &str, reason: &str) -> Result<(), SagaError> {
        let now = now_millis();
        let mut tx = self.inner.db.begin().await?;
        let failed = sqlx::query(
            "UPDATE keel_sagas SET status = $1, error = $2, deadline_at = NULL, \
             version = version + 1, updated_at = $3 WHERE id = $4 AND saga = $5 \
             AND status NOT IN ('completed', 'compensated', 'failed') AND deadline_at <= $3",
        )
        .bind(SagaStatus::Failed.as_str())
        .bind(reason)
        .bind(now)
        .bind(id)
        .bind(self.inner.saga.name)
        .execute(&mut *tx)
        .await?;
        if failed.rows_affected() == 1 {
            let failed = Line::new("-", "-", "failed", Some(reason.to_owned()));
            self.write_lines(&mut tx, id, &[failed]).await?;
            // Its owner is told when the saga's data can still be read (a step index past
            // the end, say); when it cannot, there is nothing to tell it with.
            let told = match self.load(&mut tx, id).await {
                Ok(Some(state)) => self.end(&mut tx, id, &state).await,
                Ok(None) => Ok(()),
                Err(error) => Err(error),
            };
            match told {
                Ok(()) => {}
                // The owner's own failure: tried again on the next sweep.
                Err(error @ SagaError::End(_)) => return Err(error),
                // Data that no longer fits: there is nothing to tell it with; the mark stands.
                Err(error) => {
                    tracing::error!(saga = %id, %error, "a failed saga's owner cannot be told");
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// The saga `id` with its history; `None` when there is none.
    pub async fn instance(&self, id: &str) -> Result<Option<SagaInstance>, SagaError> {
        let mut connection = self.inner.db.connection().await?;
        let Some(row) = sqlx::query(
            "SELECT saga, status, step, data, results, error FROM keel_sagas WHERE id = $1 AND saga = $2",
        )
        .bind(id)
        .bind(self.inner.saga.name)
        .fetch_optional(&mut *connection)
        .await?
        else {
            connection.release();
            return Ok(None);
        };
        let history = self.history_on(&mut connection, id).await?;
        connection.release();
        let status: String = row.try_get("status")?;
        Ok(Some(SagaInstance {
            id: id.to_owned(),
            saga: row.try_get("saga")?,
            status: SagaStatus::parse(&status).unwrap_or(SagaStatus::Failed),
            step: usize::try_from(row.try_get::<i64, _>("step")?).unwrap_or(0),
            data: serde_json::from_str(&row.try_get::<String, _>("data")?)?,
            results: serde_json::from_str(&row.try_get::<String, _>("results")?)?,
            error: row.try_get("error")?,
            history,
        }))
    }

    /// Saga `id`'s history alone (empty when there is none), on `connection`: one the
    /// caller already holds, to read it beside what the saga is for.
    pub async fn history_on(
        &self,
        connection: &mut AnyConnection,
        id: &str,
    ) -> Result<Vec<StepRecord>, SagaError> {
        Ok(sqlx::query(
            "SELECT step, phase, outcome, detail, at FROM keel_saga_steps WHERE saga_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&mut *connection)
        .await?
        .iter()
        .map(|row| {
            Ok(StepRecord {
                step: row.try_get("step")?,
                phase: row.try_get("phase")?,
                outcome: row.try_get("outcome")?,
                detail: row.try_get("detail")?,
                at: row.try_get("at")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?)
    }

    /// The ids of this saga's instances in `status`, oldest first.
    pub async fn list(&self, status: SagaStatus, limit: u32) -> Result<Vec<String>, SagaError> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM keel_sagas WHERE saga = $1 AND status = $2 ORDER BY created_at, id LIMIT $3",
        )
        .bind(self.inner.saga.name)
        .bind(status.as_str())
        .bind(i64::from(limit))
        .fetch_all(self.inner.db.pool())
        .await?)
    }

    /// Applies `answer` to saga `id`, if it is still waiting for the command that
    /// `correlation` names (for a timeout: if it is still overdue).
    async fn advance(
        &self,
        tx: &mut Tx,
        id: &str,
        correlation: Option<&Correlation>,
        answer: Answer,
    ) -> Result<Advanced, SagaError> {
        // A reply usually finds its saga as this instance left it, in the cache: the
        // transition starts from there, and its write, only over the row at the cached
        // version, takes the row's lock. When the row has moved on meanwhile (another
        // instance, a sweep), or the cached state sees nothing to do (which a stale one
        // may wrongly see), what it staged is dropped and the row is read, locked.
        let cached = self.inner.cache.take(id);
        if let (Some(state), Some(_)) = (cached, correlation) {
            let mark = tx.staged();
            let from = Source::Cache;
            if self
                .transition(tx, id, state, correlation, &answer, from)
                .await?
                == Advanced::Moved
            {
                return Ok(Advanced::Moved);
            }
            tx.unstage_to(mark);
        }
        // Lock before reading: SQLite takes its write lock now (waiting for it), where a
        // transaction that read first would fail with SQLITE_BUSY on its first write;
        // PostgreSQL locks the row, so concurrent transitions of one saga queue here.
        let Some(state) = self.lock(tx, id).await? else {
            return Ok(Advanced::Nothing);
        };
        self.transition(tx, id, state, correlation, &answer, Source::Row)
            .await
    }

    /// [`Orchestrator::advance`] from `state`, read `from` the locked row or the cache.
    async fn transition(
        &self,
        tx: &mut Tx,
        id: &str,
        mut state: State,
        correlation: Option<&Correlation>,
        answer: &Answer,
        from: Source,
    ) -> Result<Advanced, SagaError> {
        // The answer to a compensation sent without being awaited (its step timed out,
        // and the saga went on below it, or has ended since).
        if let (Some(correlation), Answer::Reply(reply)) = (correlation, answer)
            && correlation.phase == "compensation"
            && (state.status.is_final() || correlation.step > state.step)
        {
            return match from {
                Source::Row => self.followed_up(tx, id, correlation.step, reply).await,
                Source::Cache => Ok(Advanced::Nothing),
            };
        }
        if state.status.is_final() {
            return Ok(Advanced::Nothing);
        }
        let phase = phase(state.status);
        let step = self.step(state.step)?;
        if let Some(correlation) = correlation {
            let awaited = correlation.step == state.step && correlation.phase == phase;
            // A command resent after a timeout (a compensation, or a step that resends)
            // may be answered by an earlier send: done is done. Anything else must answer
            // the latest send.
            let resent = phase == "compensation" || step.resend;
            let done_earlier = resent && matches!(&answer, Answer::Reply(reply) if reply.ok);
            if !awaited || (correlation.send != state.sends && !done_earlier) {
                return Ok(Advanced::Nothing);
            }
        }
        // A sweep's snapshot may be stale: another instance may have moved the saga on
        // since (the row, locked above, is current now).
        if matches!(answer, Answer::TimedOut)
            && state
                .deadline_at
                .is_none_or(|deadline| deadline > now_millis())
        {
            return Ok(Advanced::Nothing);
        }
        let version = state.version;
        let timed_out = matches!(answer, Answer::TimedOut);
        // Neither done nor refused: the command may still take effect (it is late, or its
        // dead letter is replayed), so the step is undone as well as those before it.
        let maybe_done = timed_out || matches!(&answer, Answer::Reply(reply) if reply.unhandled);
        let (outcome, detail, ok, data) = match answer {
            Answer::Reply(reply) => {
                let outcome = if reply.ok { "done" } else { "failed" };
                (outcome, reply.error.clone(), reply.ok, reply.data.clone())
            }
            Answer::TimedOut => (
                "timed_out",
                Some(format!("no reply within {:?}", step.timeout)),
                false,
                serde_json::Value::Null,
            ),
        };
        state
            .lines
            .push(Line::new(step.name, phase, outcome, detail.clone()));
        match (state.status, ok) {
            (SagaStatus::Running, true) => {
                state.results.insert(step.name.to_owned(), data);
                if state.step + 1 == self.inner.saga.steps.len() {
                    state.status = SagaStatus::Completed;
                } else {
                    state.step += 1;
                    state.sends = 0;
                    self.send_current(tx, id, &mut state).await?;
                }
            }
            // A command that is always done in the end: unanswered, it is sent again; refused
            // (a passing problem, then), it is sent again when its deadline passes.
            (SagaStatus::Running, false) if step.resend => {
                if timed_out {
                    self.send_current(tx, id, &mut state).await?;
                }
            }
            (SagaStatus::Running, false) => {
                state.status = SagaStatus::Compensating;
                state.error = Some(format!(
                    "{} {outcome}: {}",
                    step.name,
                    detail.unwrap_or_default()
                ));
                if maybe_done && step.compensation.is_some() {
                    // Unanswered (or dead-lettered) is not undone: the step may happen
                    // after all, so it is compensated too (participants are idempotent,
                    // and one that meets the undoing first refuses the command later). Its
                    // compensation is sent but not awaited: the participant that did not
                    // answer may stay away, and the earlier steps' compensations must not
                    // wait for it. The command is durable (outbox, broker), so it takes
                    // effect whenever the participant is back.
                    state.sends = 0;
                    self.send_current(tx, id, &mut state).await?;
                    // Not awaited, but not forgotten: the sweep sends it again until it is
                    // answered done.
                    self.follow_up(tx, id, state.step, 1, step.timeout).await?;
                }
                self.compensate_below(tx, id, &mut state).await?;
            }
            (SagaStatus::Compensating, true) => {
                self.compensate_below(tx, id, &mut state).await?;
            }
            // Sent again once its deadline passes, not at once: a refusal is often a
            // passing problem. Never given up on: what the saga did stays done until it is
            // undone, however long the participant is away.
            (SagaStatus::Compensating, false) if !timed_out => {}
            (SagaStatus::Compensating, false) => self.send_current(tx, id, &mut state).await?,
            (_, _) => return Ok(Advanced::Nothing),
        }
        if !self
            .write(tx, id, &mut state, Write::Update(version))
            .await?
        {
            return match from {
                Source::Cache => Ok(Advanced::Nothing),
                Source::Row => Err(SagaError::Definition(format!(
                    "saga {id} changed under a locked transition"
                ))),
            };
        }
        if state.status.is_final() {
            self.end(tx, id, &state).await?;
        } else {
            self.remember(tx, id, state);
        }
        Ok(Advanced::Moved)
    }

    /// Caches `state`, just written, once `tx` commits.
    fn remember(&self, tx: &mut Tx, id: &str, state: State) {
        let (cache, id) = (self.inner.cache.clone(), id.to_owned());
        tx.after_commit(move || cache.put(id, state));
    }

    /// Remembers that step `index`'s compensation was sent (`sends` times) without being
    /// awaited; the sweep sends it again after `timeout` (doubling) until it is done.
    async fn follow_up(
        &self,
        tx: &mut Tx,
        id: &str,
        index: usize,
        sends: i64,
        timeout: Duration,
    ) -> Result<(), SagaError> {
        let timeout = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        let backoff = 1_i64
            .checked_shl(u32::try_from(sends.saturating_sub(1)).unwrap_or(u32::MAX))
            .unwrap_or(MAX_BACKOFF)
            .clamp(1, MAX_BACKOFF);
        let deadline = now_millis().saturating_add(timeout.saturating_mul(backoff));
        sqlx::query(
            "INSERT INTO keel_saga_followups (saga_id, saga, step, sends, deadline_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (saga_id, step) \
             DO UPDATE SET sends = excluded.sends, deadline_at = excluded.deadline_at",
        )
        .bind(id)
        .bind(self.inner.saga.name)
        .bind(i64::try_from(index).unwrap_or(i64::MAX))
        .bind(sends)
        .bind(deadline)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// A compensation followed up answered: done ends the follow-up; a refusal leaves it
    /// to be sent again.
    async fn followed_up(
        &self,
        tx: &mut Tx,
        id: &str,
        index: usize,
        reply: &Reply,
    ) -> Result<Advanced, SagaError> {
        if !reply.ok {
            return Ok(Advanced::Nothing);
        }
        let done = sqlx::query("DELETE FROM keel_saga_followups WHERE saga_id = $1 AND step = $2")
            .bind(id)
            .bind(i64::try_from(index).unwrap_or(i64::MAX))
            .execute(&mut **tx)
            .await?;
        if done.rows_affected() == 0 {
            return Ok(Advanced::Nothing);
        }
        let done = Line::new(self.step(index)?.name, "compensation", "done", None);
        self.write_lines(tx, id, &[done]).await?;
        Ok(Advanced::Moved)
    }

    /// Moves overdue saga `id` (or its followed-up compensation of `step`), which failed
    /// to be handled, `RETRY_LATER` on; best effort.
    async fn put_off(&self, id: &str, step: Option<i64>) {
        let update = match step {
            None => "UPDATE keel_sagas SET deadline_at = $1 WHERE id = $2 AND deadline_at <= $3",
            Some(_) => {
                "UPDATE keel_saga_followups SET deadline_at = $1 \
                 WHERE saga_id = $2 AND deadline_at <= $3 AND step = $4"
            }
        };
        let now = now_millis();
        let later = now.saturating_add(i64::try_from(RETRY_LATER.as_millis()).unwrap_or(i64::MAX));
        let mut query = sqlx::query(update).bind(later).bind(id).bind(now);
        if let Some(step) = step {
            query = query.bind(step);
        }
        if let Err(error) = query.execute(self.inner.db.pool()).await {
            tracing::warn!(saga = %id, %error, "an overdue saga could not be put off");
        }
    }

    /// Sends again the followed-up compensations whose time ran out; returns how many.
    async fn sweep_followups(&self) -> Result<usize, SagaError> {
        let due = sqlx::query(
            "SELECT saga_id, step FROM keel_saga_followups WHERE saga = $1 AND deadline_at <= $2 \
             ORDER BY deadline_at LIMIT 100",
        )
        .bind(self.inner.saga.name)
        .bind(now_millis())
        .fetch_all(self.inner.db.pool())
        .await?;
        let mut sent = 0;
        for row in due {
            let id: String = row.try_get("saga_id")?;
            let step: i64 = row.try_get("step")?;
            match self.resend_followup(&id, step).await {
                Ok(true) => sent += 1,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(saga = %id, %error, "a followed-up compensation was not sent again");
                    self.put_off(&id, Some(step)).await;
                }
            }
        }
        Ok(sent)
    }

    async fn resend_followup(&self, id: &str, step: i64) -> Result<bool, SagaError> {
        let mut tx = self.inner.db.begin().await?;
        // The saga's row first, as every transition locks it: one at a time per saga.
        let Some(state) = self.lock(&mut tx, id).await? else {
            return Ok(false);
        };
        let row = sqlx::query(
            "SELECT sends, deadline_at FROM keel_saga_followups WHERE saga_id = $1 AND step = $2",
        )
        .bind(id)
        .bind(step)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        let deadline: i64 = row.try_get("deadline_at")?;
        if deadline > now_millis() {
            return Ok(false);
        }
        let Ok(index) = usize::try_from(step) else {
            return Ok(false);
        };
        let sends = row.try_get::<i64, _>("sends")? + 1;
        let sent = self
            .stage_command(&mut tx, id, index, "compensation", &state, sends)
            .await?;
        self.write_lines(&mut tx, id, &[sent]).await?;
        let timeout = self.step(index)?.timeout;
        self.follow_up(&mut tx, id, index, sends, timeout).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Tells the saga's [`OnEnd`], if it has one, how saga `id` ended.
    async fn end(&self, tx: &mut Tx, id: &str, state: &State) -> Result<(), SagaError> {
        let Some(on_end) = &self.inner.saga.on_end else {
            return Ok(());
        };
        let ended = Ended {
            id,
            data: serde_json::from_value(state.data.clone())?,
            status: state.status,
            error: state.error.as_deref(),
            results: &state.results,
        };
        on_end.ended(tx, ended).await.map_err(|error| {
            SagaError::End(match error {
                HandlerError::Retry(message) | HandlerError::Reject(message) => message,
            })
        })
    }

    /// Step `index` of the definition; an error when the stored saga points past its end
    /// (the definition lost steps since it started).
    fn step(&self, index: usize) -> Result<&Step<D>, SagaError> {
        self.inner.saga.steps.get(index).ok_or_else(|| {
            SagaError::Definition(format!(
                "saga {} has no step {index} (it has {})",
                self.inner.saga.name,
                self.inner.saga.steps.len()
            ))
        })
    }

    /// Moves to the nearest step below the current one that has a compensation and sends
    /// it; when none is left, the saga is compensated.
    async fn compensate_below(
        &self,
        tx: &mut Tx,
        id: &str,
        state: &mut State,
    ) -> Result<(), SagaError> {
        let steps = &self.inner.saga.steps;
        for index in (0..state.step).rev() {
            if steps[index].compensation.is_some() {
                state.step = index;
                state.sends = 0;
                return self.send_current(tx, id, state).await;
            }
            let skipped = Line::new(steps[index].name, "compensation", "skipped", None);
            state.lines.push(skipped);
        }
        state.status = SagaStatus::Compensated;
        Ok(())
    }

    /// Stages the command the saga now waits for (the current step's action or
    /// compensation) with its correlation, and sets its deadline.
    async fn send_current(
        &self,
        tx: &mut Tx,
        id: &str,
        state: &mut State,
    ) -> Result<(), SagaError> {
        state.sends += 1;
        let (index, phase) = (state.step, phase(state.status));
        let sent = self
            .stage_command(tx, id, index, phase, state, state.sends)
            .await?;
        state.lines.push(sent);
        Ok(())
    }

    /// Stages step `index`'s action or compensation (`phase`) for saga `id` as send number
    /// `send`; returns the history line that says so.
    async fn stage_command(
        &self,
        tx: &mut Tx,
        id: &str,
        index: usize,
        phase: &'static str,
        state: &State,
        send: i64,
    ) -> Result<Line, SagaError> {
        let step = self.step(index)?;
        let make = match phase {
            "compensation" => step.compensation.as_ref(),
            _ => Some(&step.action),
        };
        let Some(make) = make else {
            return Err(SagaError::Definition(format!(
                "step {} of saga {} has no compensation any more",
                step.name, self.inner.saga.name
            )));
        };
        let data: D = serde_json::from_value(state.data.clone())?;
        // The builder is the service's code: a panic in it must not take the sweep down.
        let built =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| make(&data, &state.results)))
                .map_err(|_| {
                    SagaError::Definition(format!(
                        "the {phase} builder of step {} panicked",
                        step.name
                    ))
                })?;
        let mut command = built?;
        let correlation = Correlation {
            saga: id.to_owned(),
            step: index,
            phase,
            send,
        };
        command.source = format!("/keel/{}", self.inner.bus.service());
        command.correlationid = Some(correlation.to_string());
        command.replyto = Some(self.inner.reply_type.clone());
        self.inner.bus.stage_envelope(tx, &command).await?;
        Ok(Line::new(step.name, phase, "sent", None))
    }

    /// Saga `id`, its row locked for the rest of `tx`. On SQLite written and read in one
    /// statement (a no-op update that returns the row), which takes the database's write
    /// lock first; on PostgreSQL `FOR UPDATE`, a row lock without a new row version (the
    /// saga's data and results are not copied into the WAL once more per transition).
    async fn lock(&self, tx: &mut Tx, id: &str) -> Result<Option<State>, SagaError> {
        let sql = match self.inner.db.backend() {
            Backend::Postgres => {
                "SELECT status, step, data, results, error, sends, deadline_at, version \
                 FROM keel_sagas WHERE id = $1 AND saga = $2 FOR UPDATE"
            }
            Backend::Sqlite => {
                "UPDATE keel_sagas SET version = version WHERE id = $1 AND saga = $2 \
                 RETURNING status, step, data, results, error, sends, deadline_at, version"
            }
        };
        let row = sqlx::query(sql)
            .bind(id)
            .bind(self.inner.saga.name)
            .fetch_optional(&mut **tx)
            .await?;
        row.map(|row| Self::state(id, &row)).transpose()
    }

    async fn load(&self, tx: &mut Tx, id: &str) -> Result<Option<State>, SagaError> {
        let row = sqlx::query(
            "SELECT status, step, data, results, error, sends, deadline_at, version FROM keel_sagas \
             WHERE id = $1 AND saga = $2",
        )
        .bind(id)
        .bind(self.inner.saga.name)
        .fetch_optional(&mut **tx)
        .await?;
        row.map(|row| Self::state(id, &row)).transpose()
    }

    fn state(id: &str, row: &sqlx::any::AnyRow) -> Result<State, SagaError> {
        let status: String = row.try_get("status")?;
        let step: i64 = row.try_get("step")?;
        Ok(State {
            status: SagaStatus::parse(&status).ok_or_else(|| {
                SagaError::Definition(format!("saga {id}: unknown status {status:?}"))
            })?,
            step: usize::try_from(step)
                .map_err(|_| SagaError::Definition(format!("saga {id}: step {step}")))?,
            data: serde_json::from_str(&row.try_get::<String, _>("data")?)?,
            results: serde_json::from_str(&row.try_get::<String, _>("results")?)?,
            error: row.try_get("error")?,
            sends: row.try_get("sends")?,
            deadline_at: row.try_get("deadline_at")?,
            version: row.try_get("version")?,
            lines: Vec::new(),
        })
    }

    /// Writes `state`, a new saga's or over the row if it is still at `version`, with the
    /// transition's history lines; then `state` is as stored (its lines written). False,
    /// and nothing written, when the row is at another version.
    async fn write(
        &self,
        tx: &mut Tx,
        id: &str,
        state: &mut State,
        write: Write,
    ) -> Result<bool, SagaError> {
        let deadline = match state.status.is_final() {
            true => None,
            false => {
                let timeout = self.step(state.step)?.timeout;
                let timeout = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
                // The first send waits the timeout; each send after it twice the one before.
                let backoff = 1_i64
                    .checked_shl(u32::try_from(state.sends.saturating_sub(1)).unwrap_or(u32::MAX))
                    .unwrap_or(MAX_BACKOFF)
                    .clamp(1, MAX_BACKOFF);
                Some(now_millis().saturating_add(timeout.saturating_mul(backoff)))
            }
        };
        // $1 to $8 mean the same to both; $9 is the version, or the saga's name (and $10 its
        // data) for a new one.
        let (head, first_line) = match write {
            Write::Update(_) => (
                "UPDATE keel_sagas SET status = $1, step = $2, results = $3, error = $4, \
                 sends = $5, deadline_at = $6, version = version + 1, updated_at = $7 \
                 WHERE id = $8 AND version = $9",
                10,
            ),
            Write::Insert => (
                "INSERT INTO keel_sagas (id, saga, status, step, data, results, error, sends, \
                 deadline_at, version, created_at, updated_at) \
                 VALUES ($8, $9, $1, $2, $10, $3, $4, $5, $6, 0, $7, $7)",
                11,
            ),
        };
        // PostgreSQL: the row and the transition's history lines in one statement (one
        // round trip, not one per line and one for the row); the lines are inserted only
        // when the row was, so as many rows as lines means saved. SQLite (no writes in
        // `WITH`, and no network to save): one statement each.
        let combined = self.inner.db.backend() == Backend::Postgres && !state.lines.is_empty();
        let sql = if combined {
            let values = value_rows(state.lines.len(), 6, first_line);
            format!(
                "WITH saved AS ({head} RETURNING id), \
                 last AS (SELECT COALESCE(MAX(seq), 0) AS seq FROM keel_saga_steps WHERE saga_id = $8) \
                 INSERT INTO keel_saga_steps (saga_id, seq, step, phase, outcome, detail, at) \
                 SELECT saved.id, last.seq + v.n, v.step, v.phase, v.outcome, v.detail, v.at \
                 FROM saved, last, (VALUES {values}) AS v (n, step, phase, outcome, detail, at)"
            )
        } else {
            head.to_owned()
        };
        // Placeholders and numbers only: the values are bound.
        let mut save = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(state.status.as_str())
            .bind(i64::try_from(state.step).unwrap_or(i64::MAX))
            .bind(serde_json::to_string(&state.results)?)
            .bind(state.error.as_deref())
            .bind(state.sends)
            .bind(deadline)
            .bind(now_millis())
            .bind(id);
        save = match write {
            Write::Update(version) => save.bind(version),
            Write::Insert => save.bind(self.inner.saga.name).bind(state.data.to_string()),
        };
        if combined {
            for (n, line) in (1_i64..).zip(&state.lines) {
                save = save
                    .bind(n)
                    .bind(line.step)
                    .bind(line.phase)
                    .bind(line.outcome)
                    .bind(line.detail.as_deref())
                    .bind(line.at);
            }
        }
        let written = save.execute(&mut **tx).await?.rows_affected();
        let expected = if combined {
            state.lines.len() as u64
        } else {
            1
        };
        if written != expected {
            return Ok(false);
        }
        if !combined {
            self.write_lines(tx, id, &state.lines).await?;
        }
        state.lines.clear();
        state.deadline_at = deadline;
        if let Write::Update(version) = write {
            state.version = version + 1;
        }
        Ok(true)
    }

    /// Appends `lines` to saga `id`'s history, one statement each.
    async fn write_lines(&self, tx: &mut Tx, id: &str, lines: &[Line]) -> Result<(), SagaError> {
        for line in lines {
            sqlx::query(
                "INSERT INTO keel_saga_steps (saga_id, seq, step, phase, outcome, detail, at) \
                 SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3, $4, $5, $6 FROM keel_saga_steps WHERE saga_id = $1",
            )
            .bind(id)
            .bind(line.step)
            .bind(line.phase)
            .bind(line.outcome)
            .bind(line.detail.as_deref())
            .bind(line.at)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }
}

/// Replies reach the orchestrator through its consumer, inside the consumer's transaction.
impl<D> Dispatch for Orchestrator<D>
where
    D: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    fn dispatch<'a>(
        &'a self,
        tx: &'a mut Tx,
        envelope: &'a Envelope,
        _attempt: u32,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let correlation = envelope
                .correlationid
                .as_deref()
                .and_then(Correlation::parse)
                .ok_or_else(|| {
                    HandlerError::reject("a saga reply without a usable correlation id")
                })?;
            let reply: Reply =
                serde_json::from_value(envelope.data.clone()).map_err(HandlerError::reject)?;
            let saga = correlation.saga.clone();
            match self
                .advance(tx, &saga, Some(&correlation), Answer::Reply(reply))
                .await
            {
                Ok(Advanced::Moved | Advanced::Nothing) => Ok(()),
                // The sweep marks it failed when its deadline passes.
                Err(error @ (SagaError::Definition(_) | SagaError::Data(_))) => {
                    Err(HandlerError::reject(error))
                }
                Err(error) => Err(HandlerError::Retry(error.to_string())),
            }
        })
    }
}

/// What a command's correlation id says: `<saga id>/<step>/<phase>/<send>`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Correlation {
    saga: String,
    step: usize,
    phase: &'static str,
    send: i64,
}

impl std::fmt::Display for Correlation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}",
            self.saga, self.step, self.phase, self.send
        )
    }
}

impl Correlation {
    fn parse(text: &str) -> Option<Self> {
        let mut parts = text.rsplitn(4, '/');
        let send = parts.next()?.parse().ok()?;
        let phase = match parts.next()? {
            "action" => "action",
            "compensation" => "compensation",
            _ => return None,
        };
        let step = parts.next()?.parse().ok()?;
        let saga = parts.next()?.to_owned();
        Some(Self {
            saga,
            step,
            phase,
            send,
        })
    }
}

fn phase(status: SagaStatus) -> &'static str {
    match status {
        SagaStatus::Compensating => "compensation",
        _ => "action",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlations_round_trip_and_garbage_is_refused() {
        let correlation = Correlation {
            saga: "0190-abc".into(),
            step: 2,
            phase: "compensation",
            send: 3,
        };
        let text = correlation.to_string();
        assert_eq!(text, "0190-abc/2/compensation/3");
        assert_eq!(Correlation::parse(&text), Some(correlation));
        for garbage in ["", "x", "a/1/sideways/1", "a/x/action/1", "a/1/action/y"] {
            assert_eq!(Correlation::parse(garbage), None, "{garbage}");
        }
    }
}
