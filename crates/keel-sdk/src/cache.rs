//! Cache-aside with two levels: in-process (moka) in front of Redis, in front of the
//! loader (the database).
//!
//! - A miss on both levels runs the loader once per key and instance however many
//!   requests want the key at that moment (moka's `try_get_with` coalesces them), and
//!   writes the value to Redis for the other instances.
//! - Absent values are cached too (negative caching, for `negative_ttl`), so a flood of
//!   lookups for something that does not exist does not reach the database.
//! - TTLs get up to `jitter` of random extra, so keys loaded together do not expire
//!   together.
//! - [`Cache::invalidate`] drops the key here and in Redis and tells every instance over
//!   Redis pub/sub to drop its in-process copy; [`Cache::invalidate_after_commit`] does it
//!   once a transaction commits.
//! - Values are stored as JSON under a key that carries the cache's `version`: a new
//!   shape of the type gets a new version and never reads the old bytes. Bytes that do not
//!   decode count as a miss.
//! - When Redis is away, the cache serves from the in-process level and the loader, counts
//!   each failure (`keel_cache_redis_errors_total`), and clears its in-process level when
//!   the invalidation channel comes back (it may have missed some meanwhile).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::data::Tx;
use crate::events::reconnect_delay;

/// How long entries live, and how long Redis may take.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Life of a value in Redis.
    pub ttl: Duration,
    /// Life of a value in process: short, since an invalidation may be missed while Redis
    /// is away.
    pub local_ttl: Duration,
    /// Life of an "absent" answer, on both levels.
    pub negative_ttl: Duration,
    /// Up to this share of a TTL is added at random.
    pub jitter: f64,
    pub max_local_entries: u64,
    /// How long one Redis command may take before the cache goes on without it.
    pub redis_timeout: Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(300),
            local_ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(30),
            jitter: 0.1,
            max_local_entries: 10_000,
            redis_timeout: Duration::from_millis(250),
        }
    }
}

/// What a cache has done so far; also exported as `keel_cache_requests_total`.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub local_hits: AtomicU64,
    pub redis_hits: AtomicU64,
    /// Loader runs.
    pub loads: AtomicU64,
    pub redis_errors: AtomicU64,
    /// Invalidations received from other instances (or this one) over pub/sub.
    pub invalidations_received: AtomicU64,
}

/// A value as the in-process level holds it: `None` is a cached "absent".
type Local<T> = Option<Arc<T>>;

/// Anything that can drop keys of the in-process level when told to.
trait Invalidate: Send + Sync {
    fn drop_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()>;
    fn drop_all(&self);
}

/// The Redis level, shared by every cache of a service: one connection for commands, one
/// subscription for invalidations.
#[derive(Clone)]
pub struct CacheRedis {
    inner: Arc<RedisInner>,
}

struct RedisInner {
    client: redis::Client,
    /// Made on first use and kept; `ConnectionManager` reconnects by itself.
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    prefix: String,
    timeout: Duration,
    /// Cache name → its in-process level.
    caches: Mutex<HashMap<String, Weak<dyn Invalidate>>>,
    /// Whether the invalidation subscription is live.
    subscribed: AtomicBool,
    /// Writes a load's copy unless an invalidation landed since the load began.
    fill: redis::Script,
}

/// Background attempts of an invalidation Redis did not take (from 100 ms apart, growing
/// to 5 s: about a minute in all).
const INVALIDATION_RETRIES: u32 = 16;

/// KEYS[1] the value, KEYS[2] its fence (the count of the key's invalidations); ARGV[1]
/// the fence the load saw (`""` none), ARGV[2] the value, ARGV[3] its life in seconds.
const FILL_SCRIPT: &str = r"
if (redis.call('GET', KEYS[2]) or '') == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
";

impl CacheRedis {
    /// Redis at `url`, keys under `prefix` (a per-deployment or per-test namespace).
    /// Starts the invalidation subscriber (it reconnects by itself); fails only on a URL
    /// that is not one.
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let redis = Self {
            inner: Arc::new(RedisInner {
                client,
                connection: tokio::sync::Mutex::new(None),
                prefix: prefix.to_owned(),
                timeout,
                caches: Mutex::new(HashMap::new()),
                subscribed: AtomicBool::new(false),
                fill: redis::Script::new(FILL_SCRIPT),
            }),
        };
        tokio::spawn(subscribe(Arc::downgrade(&redis.inner)));
        Ok(redis)
    }

    fn channel(&self) -> String {
        channel(&self.inner.prefix)
    }

    /// Whether invalidations from other instances are arriving (the subscription is
    /// live); while not, the in-process level is cleared and rebuilt from Redis and loads.
    pub fn subscribed(&self) -> bool {
        self.inner.subscribed.load(Ordering::SeqCst)
    }

    /// Runs `command` on the shared connection within the timeout.
    async fn run<R, F, Fut>(&self, command: F) -> Result<R, String>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<R>>,
    {
        let attempt = async {
            let connection = {
                let mut slot = self.inner.connection.lock().await;
                match slot.as_ref() {
                    Some(connection) => connection.clone(),
                    None => {
                        let config = redis::aio::ConnectionManagerConfig::new()
                            .set_connection_timeout(Some(self.inner.timeout))
                            .set_response_timeout(Some(self.inner.timeout))
                            .set_number_of_retries(1);
                        let connection =
                            ConnectionManager::new_with_config(self.inner.client.clone(), config)
                                .await
                                .map_err(|error| error.to_string())?;
                        slot.insert(connection).clone()
                    }
                }
            };
            command(connection).await.map_err(|error| error.to_string())
        };
        tokio::time::timeout(self.inner.timeout, attempt)
            .await
            .map_err(|_| format!("no answer within {:?}", self.inner.timeout))?
    }

    fn register(&self, name: &str, cache: Weak<dyn Invalidate>) {
        self.inner
            .caches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), cache);
    }
}

fn channel(prefix: &str) -> String {
    format!("{prefix}cache-invalidations")
}

/// Listens for invalidations until the last handle to the Redis level is gone; after a
/// lost subscription, every in-process level is cleared, since messages were missed.
async fn subscribe(inner: Weak<RedisInner>) {
    let mut failures = 0;
    loop {
        let Some((client, channel)) = inner
            .upgrade()
            .map(|inner| (inner.client.clone(), channel(&inner.prefix)))
        else {
            return;
        };
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let mut pubsub = match subscribed.await {
            Ok(pubsub) => pubsub,
            Err(error) => {
                failures += 1;
                tracing::debug!(%error, "cache invalidation channel unavailable");
                tokio::time::sleep(reconnect_delay(failures)).await;
                continue;
            }
        };
        if failures > 0 {
            for_each_cache(&inner, |cache| cache.drop_all());
        }
        set_subscribed(&inner, true);
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            let Ok(payload) = message.get_payload::<String>() else {
                continue;
            };
            // "<cache name>\n<key>"
            if let Some((name, key)) = payload.split_once('\n') {
                let target = inner.upgrade().and_then(|inner| {
                    let caches = inner.caches.lock().unwrap_or_else(PoisonError::into_inner);
                    caches.get(name).and_then(Weak::upgrade)
                });
                if let Some(cache) = target {
                    cache.drop_key(key).await;
                }
            }
        }
        // The connection ended: messages may be lost from here until it is back.
        set_subscribed(&inner, false);
        failures = 1;
        for_each_cache(&inner, |cache| cache.drop_all());
    }
}

fn set_subscribed(inner: &Weak<RedisInner>, live: bool) {
    if let Some(inner) = inner.upgrade() {
        inner.subscribed.store(live, Ordering::SeqCst);
    }
}

fn for_each_cache(inner: &Weak<RedisInner>, action: impl Fn(&dyn Invalidate)) {
    let Some(inner) = inner.upgrade() else { return };
    let caches: Vec<_> = inner
        .caches
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
        .filter_map(Weak::upgrade)
        .collect();
    for cache in caches {
        action(cache.as_ref());
    }
}

/// A typed two-level cache. Cheap to clone.
pub struct Cache<T> {
    inner: Arc<CacheInner<T>>,
}

impl<T> Clone for Cache<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

/// Invalidation counters per cache, a key's chosen by its hash ([`stripe`]).
const GENERATION_STRIPES: usize = 64;

/// A key's invalidation counter: FNV-1a, stable and cheap for short keys.
fn stripe(key: &str) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % GENERATION_STRIPES as u64) as usize
}

struct CacheInner<T> {
    /// Bumped by every invalidation (here or received) of a key of their stripe: a load
    /// that began before one may hold what the invalidation meant to drop, and must not
    /// stay cached. One counter for the whole cache made a write of any key throw away
    /// every load under way, so a cache written to often was hardly ever filled.
    generations: [AtomicU64; GENERATION_STRIPES],
    name: String,
    version: u32,
    local: moka::future::Cache<String, Local<T>>,
    redis: Option<CacheRedis>,
    options: CacheOptions,
    stats: Arc<CacheStats>,
}

impl<T: Send + Sync + 'static> Invalidate for CacheInner<T> {
    fn drop_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.stats
                .invalidations_received
                .fetch_add(1, Ordering::Relaxed);
            self.generation(key).fetch_add(1, Ordering::SeqCst);
            self.local.invalidate(key).await;
        })
    }

    fn drop_all(&self) {
        for generation in &self.generations {
            generation.fetch_add(1, Ordering::SeqCst);
        }
        self.local.invalidate_all();
    }
}

impl<T> CacheInner<T> {
    fn generation(&self, key: &str) -> &AtomicU64 {
        &self.generations[stripe(key)]
    }
}

/// What the Redis level held for a key when a load began.
struct RedisRead<T> {
    /// `Some(Some(v))` a value, `Some(None)` a cached absence, `None` nothing usable
    /// (missing, undecodable, or Redis unavailable).
    found: Option<Local<T>>,
    /// The key's fence then (`""` when it had none): the load's copy is written to Redis
    /// only while it stands. `None` when Redis did not answer: nothing is written.
    fence: Option<String>,
}

impl<T> RedisRead<T> {
    const NOTHING: Self = Self {
        found: None,
        fence: None,
    };
}

/// The in-process life of an entry: `local_ttl` for values, `negative_ttl` (at most
/// `local_ttl`) for absences, each with jitter.
struct LocalExpiry {
    local_ttl: Duration,
    negative_ttl: Duration,
    jitter: f64,
}

impl<T> moka::Expiry<String, Local<T>> for LocalExpiry {
    fn expire_after_create(&self, _: &String, value: &Local<T>, _: Instant) -> Option<Duration> {
        let ttl = match value {
            Some(_) => self.local_ttl,
            None => self.negative_ttl.min(self.local_ttl),
        };
        Some(jittered(ttl, self.jitter))
    }
}

fn jittered(ttl: Duration, jitter: f64) -> Duration {
    ttl.mul_f64(1.0 + jitter.clamp(0.0, 1.0) * fastrand::f64())
}

impl<T> Cache<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// A cache named `name` (unique within the service) whose stored shape is `version`;
    /// with `redis`, a second level shared by every instance.
    pub fn new(
        name: &str,
        version: u32,
        options: CacheOptions,
        redis: Option<&CacheRedis>,
    ) -> Self {
        let local = moka::future::Cache::builder()
            .max_capacity(options.max_local_entries)
            .expire_after(LocalExpiry {
                local_ttl: options.local_ttl,
                negative_ttl: options.negative_ttl,
                jitter: options.jitter,
            })
            .build();
        let inner = Arc::new(CacheInner {
            generations: std::array::from_fn(|_| AtomicU64::new(0)),
            name: name.to_owned(),
            version,
            local,
            redis: redis.cloned(),
            options,
            stats: Arc::default(),
        });
        if let Some(redis) = redis {
            let weak: Weak<CacheInner<T>> = Arc::downgrade(&inner);
            redis.register(name, weak);
        }
        Self { inner }
    }

    pub fn stats(&self) -> Arc<CacheStats> {
        self.inner.stats.clone()
    }

    /// The value for `key`: from process memory, else Redis, else `load` (run once per
    /// key for all concurrent callers here). `Ok(None)`: `load` found nothing, which is
    /// remembered for `negative_ttl`. A loader error is shared by the callers that waited
    /// for it and not cached.
    pub async fn get_or_load<F, Fut, E>(&self, key: &str, load: F) -> Result<Option<Arc<T>>, Arc<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
        E: Send + Sync + 'static,
    {
        let inner = &self.inner;
        let mut fetched = false;
        let counter = inner.generation(key);
        let generation = counter.load(Ordering::SeqCst);
        let value = inner
            .local
            .try_get_with(key.to_owned(), async {
                fetched = true;
                let read = self.redis_get(key).await;
                if let Some(found) = read.found {
                    inner.stats.redis_hits.fetch_add(1, Ordering::Relaxed);
                    self.count("redis_hit");
                    return Ok(found);
                }
                inner.stats.loads.fetch_add(1, Ordering::Relaxed);
                self.count("miss");
                let loaded = load().await?.map(Arc::new);
                if let Some(fence) = &read.fence {
                    self.redis_set(key, loaded.as_deref(), fence).await;
                }
                Ok(loaded)
            })
            .await?;
        if fetched && counter.load(Ordering::SeqCst) != generation {
            // An invalidation came while this load ran: what it read may predate the
            // write. This caller gets it (its read overlapped the write); nobody else does:
            // not from process memory, and not from Redis, where the invalidation's fence
            // kept the copy out or its DEL, coming after, removed it.
            inner.local.invalidate(key).await;
        }
        if !fetched {
            inner.stats.local_hits.fetch_add(1, Ordering::Relaxed);
            self.count("local_hit");
        }
        Ok(value)
    }

    /// Whether this instance holds `key` in process (for tests and diagnostics).
    pub fn holds_locally(&self, key: &str) -> bool {
        self.inner.local.contains_key(key)
    }

    /// Drops `key` here, in Redis, and in every other instance's process memory. When
    /// Redis cannot take it now, it is tried again in the background until it lands (Redis
    /// and the other instances keep the old copy until then), for about a minute.
    pub async fn invalidate(&self, key: &str) {
        self.inner.generation(key).fetch_add(1, Ordering::SeqCst);
        self.inner.local.invalidate(key).await;
        let Err(error) = self.invalidate_in_redis(key).await else {
            return;
        };
        self.redis_error(&error);
        let cache = self.clone();
        let key = key.to_owned();
        tokio::spawn(async move {
            for failures in 1..=INVALIDATION_RETRIES {
                tokio::time::sleep(reconnect_delay(failures)).await;
                match cache.invalidate_in_redis(&key).await {
                    Ok(()) => return,
                    Err(error) => cache.redis_error(&error),
                }
            }
            tracing::warn!(cache = %cache.inner.name, "an invalidation never reached Redis; its copy there lives out its ttl");
        });
    }

    /// The Redis half of [`Self::invalidate`].
    async fn invalidate_in_redis(&self, key: &str) -> Result<(), String> {
        let Some(redis) = &self.inner.redis else {
            return Ok(());
        };
        let redis_key = self.redis_key(key);
        let fence_key = self.fence_key(key);
        // The fence outlives any load that may have begun before it moved.
        let fence_life = (self.inner.options.ttl * 2)
            .max(Duration::from_secs(60))
            .as_secs();
        let message = format!("{}\n{key}", self.inner.name);
        let channel = redis.channel();
        // At once: a load that read before this and writes after it finds the fence moved
        // whether or not this message has reached its instance yet.
        redis
            .run(|mut connection| async move {
                redis::pipe()
                    .atomic()
                    .incr(&fence_key, 1)
                    .ignore()
                    .expire(&fence_key, i64::try_from(fence_life).unwrap_or(i64::MAX))
                    .ignore()
                    .del(&redis_key)
                    .ignore()
                    .publish(&channel, &message)
                    .ignore()
                    .query_async::<()>(&mut connection)
                    .await
            })
            .await
    }

    /// Invalidates `key` once `tx` commits (never when it rolls back): the write is
    /// visible before any instance can load the key again.
    pub fn invalidate_after_commit(&self, tx: &mut Tx, key: &str) {
        let cache = self.clone();
        let key = key.to_owned();
        tx.after_commit(move || {
            tokio::spawn(async move { cache.invalidate(&key).await });
        });
    }

    /// `key`'s value in Redis.
    fn redis_key(&self, key: &str) -> String {
        self.redis_name("cache", key)
    }

    /// The count of `key`'s invalidations, under a name no cache key can take.
    fn fence_key(&self, key: &str) -> String {
        self.redis_name("cache-fence", key)
    }

    /// `<prefix><kind>:<cache name>:v<version>:<key>`.
    fn redis_name(&self, kind: &str, key: &str) -> String {
        let prefix = self
            .inner
            .redis
            .as_ref()
            .map_or("", |redis| redis.inner.prefix.as_str());
        format!(
            "{prefix}{kind}:{}:v{}:{key}",
            self.inner.name, self.inner.version
        )
    }

    /// The Redis level's answer, and its fence for the load that may follow.
    async fn redis_get(&self, key: &str) -> RedisRead<T> {
        let Some(redis) = &self.inner.redis else {
            return RedisRead::NOTHING;
        };
        let keys = [self.redis_key(key), self.fence_key(key)];
        let read: (Option<Vec<u8>>, Option<String>) = match redis
            .run(|mut connection| async move { connection.mget(&keys).await })
            .await
        {
            Ok(read) => read,
            Err(error) => {
                self.redis_error(&error);
                return RedisRead::NOTHING;
            }
        };
        let found = match read.0.as_deref().and_then(<[u8]>::split_first) {
            Some((b'-', _)) => Some(None),
            Some((b'+', json)) => serde_json::from_slice(json)
                .ok()
                .map(|value| Some(Arc::new(value))),
            _ => None,
        };
        RedisRead {
            found,
            fence: Some(read.1.unwrap_or_default()),
        }
    }

    /// Writes a load's copy, unless `key`'s fence moved from what the load saw.
    async fn redis_set(&self, key: &str, value: Option<&T>, fence: &str) {
        let Some(redis) = &self.inner.redis else {
            return;
        };
        let (bytes, ttl) = match value {
            Some(value) => {
                let Ok(json) = serde_json::to_vec(value) else {
                    return;
                };
                ([b"+".as_slice(), &json].concat(), self.inner.options.ttl)
            }
            None => (b"-".to_vec(), self.inner.options.negative_ttl),
        };
        let seconds = jittered(ttl, self.inner.options.jitter).as_secs().max(1);
        let mut fill = redis.inner.fill.prepare_invoke();
        fill.key(self.redis_key(key))
            .key(self.fence_key(key))
            .arg(fence)
            .arg(bytes)
            .arg(seconds);
        let result = redis
            .run(|mut connection| async move { fill.invoke_async::<i64>(&mut connection).await })
            .await;
        if let Err(error) = result {
            self.redis_error(&error);
        }
    }

    fn redis_error(&self, error: &str) {
        self.inner
            .stats
            .redis_errors
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!("keel_cache_redis_errors_total", "cache" => self.inner.name.clone())
            .increment(1);
        tracing::debug!(cache = %self.inner.name, error, "cache goes on without Redis");
    }

    fn count(&self, result: &'static str) {
        metrics::counter!("keel_cache_requests_total", "cache" => self.inner.name.clone(), "result" => result)
            .increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Loading =
        tokio::task::JoinHandle<Result<Option<Arc<String>>, Arc<std::convert::Infallible>>>;

    /// Starts loading `key` (as `value`) and returns once the load runs, held until the
    /// sender is used.
    async fn held_load(
        cache: &Cache<String>,
        key: &'static str,
        value: &'static str,
    ) -> (tokio::sync::oneshot::Sender<()>, Loading) {
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let loads = cache.inner.stats.loads.load(Ordering::SeqCst);
        let loading = {
            let cache = cache.clone();
            tokio::spawn(async move {
                let load = || async move {
                    wait.await.unwrap();
                    Ok::<_, std::convert::Infallible>(Some(value.to_owned()))
                };
                cache.get_or_load(key, load).await
            })
        };
        while cache.inner.stats.loads.load(Ordering::SeqCst) == loads {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (go, loading)
    }

    #[tokio::test]
    async fn a_load_overtaken_by_an_invalidation_leaves_nothing_in_redis_though_its_message_is_late()
     {
        use keel_testkit::{Service, require, unique_name};
        if !require(Service::Redis) {
            return;
        }
        let url = format!("redis://{}", Service::Redis.addr());
        let prefix = format!("{}:", unique_name("keel-cache-fence"));
        let redis = CacheRedis::new(&url, &prefix, Duration::from_millis(500)).unwrap();
        let cache: Cache<String> = Cache::new("prices", 1, CacheOptions::default(), Some(&redis));
        let (go, loading) = held_load(&cache, "mug", "old price").await;
        // A peer's invalidation lands in Redis while the load runs; its message has not
        // reached this instance when the load writes back.
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut peer = ConnectionManager::new(client).await.unwrap();
        redis::pipe()
            .atomic()
            .incr(cache.fence_key("mug"), 1)
            .ignore()
            .del(cache.redis_key("mug"))
            .ignore()
            .query_async::<()>(&mut peer)
            .await
            .unwrap();
        go.send(()).unwrap();
        let loaded = loading.await.unwrap().unwrap();
        assert_eq!(loaded.as_deref().map(String::as_str), Some("old price"));
        let left: Option<Vec<u8>> = peer.get(cache.redis_key("mug")).await.unwrap();
        assert_eq!(left, None, "the overtaken load's copy reached Redis");

        // A load that began after the invalidation fills Redis as ever.
        let other: Cache<String> = Cache::new("prices", 1, CacheOptions::default(), Some(&redis));
        let load = || async { Ok::<_, std::convert::Infallible>(Some("new price".to_owned())) };
        other.get_or_load("mug", load).await.unwrap();
        let stored: Option<Vec<u8>> = peer.get(cache.redis_key("mug")).await.unwrap();
        assert_eq!(stored.as_deref(), Some(b"+\"new price\"".as_slice()));
        let _: () = peer
            .del(&[cache.redis_key("mug"), cache.fence_key("mug")])
            .await
            .unwrap();
    }

    /// A write of another key while a load runs leaves what the load read cached (unless
    /// the two keys share a counter, one in 64).
    #[tokio::test]
    async fn an_invalidation_of_another_key_leaves_a_load_under_way_cached() {
        let cache: Cache<String> = Cache::new("prices", 1, CacheOptions::default(), None);
        let other = (0..)
            .map(|n| format!("tea-{n}"))
            .find(|key| stripe(key) != stripe("mug"))
            .expect("a key of another stripe");
        for (invalidated, stays) in [(other.as_str(), true), ("mug", false)] {
            cache.inner.local.invalidate("mug").await;
            let (go, loading) = held_load(&cache, "mug", "price").await;
            cache.invalidate(invalidated).await;
            go.send(()).unwrap();
            loading.await.unwrap().unwrap();
            assert_eq!(cache.holds_locally("mug"), stays, "{invalidated}");
        }
    }

    #[test]
    fn jitter_only_lengthens_and_stays_within_its_share() {
        let ttl = Duration::from_secs(100);
        for _ in 0..1000 {
            let jittered = jittered(ttl, 0.1);
            assert!(
                jittered >= ttl && jittered <= Duration::from_secs(110),
                "{jittered:?}"
            );
        }
        assert_eq!(jittered(ttl, 0.0), ttl);
        assert!(jittered(ttl, 7.0) <= Duration::from_secs(200), "clamped");
    }
}
