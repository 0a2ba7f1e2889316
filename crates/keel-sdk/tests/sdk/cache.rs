//! The two-level cache against the real Redis: single-flight loads, negative caching,
//! invalidation across instances, versions, and Redis going away.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keel_sdk::cache::{Cache, CacheOptions, CacheRedis};
use keel_testkit::{FaultProxy, Service, require, unique_name};
use serde::{Deserialize, Serialize};

use crate::helpers::{TestDb, eventually};

const REDIS_URL: &str = "redis://127.0.0.1:6379";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Product {
    sku: String,
    price: i64,
}

fn product(price: i64) -> Product {
    Product {
        sku: "sku-1".to_owned(),
        price,
    }
}

/// A loader standing in for the database: counts its reads, takes a while, answers with
/// whatever `price` holds (`None` when it is negative).
#[derive(Clone, Default)]
struct Database {
    reads: Arc<AtomicUsize>,
    price: Arc<std::sync::atomic::AtomicI64>,
}

impl Database {
    fn priced(price: i64) -> Self {
        let database = Self::default();
        database.price.store(price, Ordering::SeqCst);
        database
    }

    async fn load(&self) -> Result<Option<Product>, std::io::Error> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let price = self.price.load(Ordering::SeqCst);
        Ok((price >= 0).then(|| product(price)))
    }

    /// `key` through `cache`, with this database as the loader.
    async fn read(&self, cache: &Cache<Product>, key: &str) -> Option<Arc<Product>> {
        cache.get_or_load(key, || self.load()).await.unwrap()
    }

    fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }
}

/// A fresh key prefix, when Redis answers (or is required).
fn redis_prefix() -> Option<String> {
    require(Service::Redis).then(|| format!("{}:", unique_name("keel-cache")))
}

fn products(redis: Option<&CacheRedis>) -> Cache<Product> {
    Cache::new("products", 1, CacheOptions::default(), redis)
}

/// A Redis level of one "instance", under a per-test prefix.
fn redis_level(url: &str, prefix: &str) -> CacheRedis {
    CacheRedis::new(url, prefix, Duration::from_millis(250)).unwrap()
}

async fn subscribed(redis: &CacheRedis) {
    eventually(
        "the invalidation subscription",
        Duration::from_secs(5),
        || async { redis.subscribed() },
    )
    .await;
}

#[tokio::test]
async fn a_hundred_concurrent_misses_on_one_key_read_the_database_once() {
    let prefix = format!("{}:", unique_name("keel-cache"));
    let mut levels = vec![None];
    if require(Service::Redis) {
        levels.push(Some(redis_level(REDIS_URL, &prefix)));
    }
    for redis in &levels {
        let cache = products(redis.as_ref());
        let database = Database::priced(1250);
        let lookups = (0..100).map(|_| {
            let cache = cache.clone();
            let database = database.clone();
            tokio::spawn(async move { cache.get_or_load("sku-1", || database.load()).await })
        });
        for lookup in futures_util::future::join_all(lookups).await {
            let value = lookup.unwrap().unwrap().unwrap();
            assert_eq!(*value, product(1250));
        }
        assert_eq!(database.reads(), 1, "redis: {}", redis.is_some());
        assert_eq!(cache.stats().loads.load(Ordering::Relaxed), 1);
    }
}

#[tokio::test]
async fn another_instance_reads_what_one_loaded_from_redis_absences_included() {
    let Some(prefix) = redis_prefix() else { return };
    let first = products(Some(&redis_level(REDIS_URL, &prefix)));
    let second = products(Some(&redis_level(REDIS_URL, &prefix)));
    let database = Database::priced(700);
    database.read(&first, "sku-1").await;
    let gone = Database::priced(-1);
    assert!(gone.read(&first, "sku-404").await.is_none());
    assert!(gone.read(&first, "sku-404").await.is_none());
    assert_eq!(gone.reads(), 1, "an absence is remembered in process");

    let value = database.read(&second, "sku-1").await;
    assert_eq!(*value.unwrap(), product(700));
    assert!(gone.read(&second, "sku-404").await.is_none());
    assert_eq!(database.reads(), 1, "the value came from Redis");
    assert_eq!(gone.reads(), 1, "the absence came from Redis");
    assert_eq!(second.stats().redis_hits.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn an_invalidation_reaches_another_instances_process_within_100_ms() {
    let Some(prefix) = redis_prefix() else { return };
    let (redis_a, redis_b) = (
        redis_level(REDIS_URL, &prefix),
        redis_level(REDIS_URL, &prefix),
    );
    subscribed(&redis_a).await;
    subscribed(&redis_b).await;
    let a = products(Some(&redis_a));
    let b = products(Some(&redis_b));
    let database = Database::priced(100);
    database.read(&a, "sku-1").await;
    database.read(&b, "sku-1").await;
    assert!(a.holds_locally("sku-1") && b.holds_locally("sku-1"));

    // The write, then the invalidation, as `invalidate_after_commit` runs it.
    database.price.store(90, Ordering::SeqCst);
    let started = Instant::now();
    a.invalidate("sku-1").await;
    while b.holds_locally("sku-1") {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the invalidation never arrived"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_millis(100), "took {elapsed:?}");
    let fresh = database.read(&b, "sku-1").await;
    assert_eq!(fresh.unwrap().price, 90, "B reads the new price");
}

#[tokio::test]
async fn a_new_version_never_reads_the_old_shape_and_garbage_is_a_miss() {
    let Some(prefix) = redis_prefix() else { return };
    let redis = redis_level(REDIS_URL, &prefix);
    let v1 = products(Some(&redis));
    let database = Database::priced(5);
    database.read(&v1, "sku-1").await;

    #[derive(Debug, Serialize, Deserialize)]
    struct ProductV2 {
        sku: String,
        price_minor: i64,
        currency: String,
    }
    let v2 = Cache::<ProductV2>::new("products", 2, CacheOptions::default(), Some(&redis));
    let loads = AtomicUsize::new(0);
    let value = v2
        .get_or_load("sku-1", || async {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(Some(ProductV2 {
                sku: "sku-1".into(),
                price_minor: 500,
                currency: "EUR".into(),
            }))
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!((value.price_minor, loads.load(Ordering::SeqCst)), (500, 1));

    // Bytes that are not a cached value (written by something else) count as a miss.
    let client = redis::Client::open(REDIS_URL).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{prefix}cache:products:v1:sku-2");
    redis::cmd("SET")
        .arg(&key)
        .arg("+{not json")
        .query_async::<()>(&mut connection)
        .await
        .unwrap();
    let value = database.read(&v1, "sku-2").await;
    assert_eq!(*value.unwrap(), product(5));
    assert_eq!(database.reads(), 2);
}

#[tokio::test]
async fn with_redis_cut_off_requests_are_still_served_and_counted() {
    let Some(prefix) = redis_prefix() else { return };
    let proxy = FaultProxy::start(Service::Redis.addr()).await;
    let redis = redis_level(&format!("redis://{}", proxy.addr()), &prefix);
    subscribed(&redis).await;
    let cache = products(Some(&redis));
    let database = Database::priced(42);
    database.read(&cache, "sku-1").await;

    proxy.cut();
    eventually(
        "the subscription noticed",
        Duration::from_secs(5),
        || async { !redis.subscribed() },
    )
    .await;
    // Its in-process level was cleared (invalidations may be missed now): the database
    // answers, within Redis's timeout, and each failure is counted.
    let started = Instant::now();
    let value = database.read(&cache, "sku-1").await;
    assert_eq!(*value.unwrap(), product(42));
    let value = database.read(&cache, "sku-9").await;
    assert_eq!(*value.unwrap(), product(42));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(cache.stats().redis_errors.load(Ordering::Relaxed) >= 2);
    // And from process memory after that, with no Redis at all.
    let reads = database.reads();
    database.read(&cache, "sku-9").await;
    assert_eq!(database.reads(), reads);

    proxy.restore();
    subscribed(&redis).await;
    cache.invalidate("sku-9").await;
    let errors = cache.stats().redis_errors.load(Ordering::Relaxed);
    eventually("Redis used again", Duration::from_secs(5), || async {
        cache.invalidate("sku-9").await;
        cache.stats().redis_errors.load(Ordering::Relaxed) == errors
    })
    .await;
}

#[tokio::test]
async fn an_invalidation_redis_missed_lands_once_redis_is_back() {
    let Some(prefix) = redis_prefix() else { return };
    let proxy = FaultProxy::start(Service::Redis.addr()).await;
    let redis = redis_level(&format!("redis://{}", proxy.addr()), &prefix);
    subscribed(&redis).await;
    let cache = products(Some(&redis));
    Database::priced(42).read(&cache, "sku-1").await;
    let client = redis::Client::open(REDIS_URL).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{prefix}cache:products:v1:sku-1");
    let stored = |mut connection: redis::aio::MultiplexedConnection| {
        let key = key.clone();
        async move {
            redis::cmd("EXISTS")
                .arg(&key)
                .query_async::<bool>(&mut connection)
                .await
                .unwrap()
        }
    };
    assert!(stored(connection.clone()).await);

    // The price changes while Redis is out of reach: the invalidation cannot land.
    proxy.cut();
    let errors = cache.stats().redis_errors.load(Ordering::Relaxed);
    cache.invalidate("sku-1").await;
    assert!(cache.stats().redis_errors.load(Ordering::Relaxed) > errors);
    assert!(
        stored(connection.clone()).await,
        "the old copy is still there"
    );
    // Back, it lands by itself: no instance reads the old price from Redis for its ttl.
    proxy.restore();
    eventually("the invalidation lands", Duration::from_secs(15), || {
        let connection = connection.clone();
        async { !stored(connection).await }
    })
    .await;
    let _: () = redis::cmd("DEL")
        .arg(format!("{prefix}cache-fence:products:v1:sku-1"))
        .query_async(&mut connection)
        .await
        .unwrap();
}

#[tokio::test]
async fn invalidate_after_commit_waits_for_the_commit() {
    let test = TestDb::sqlite().await;
    let cache = products(None);
    let database = Database::priced(1);
    database.read(&cache, "sku-1").await;

    let mut tx = test.db.begin().await.unwrap();
    cache.invalidate_after_commit(&mut tx, "sku-1");
    tx.rollback().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(cache.holds_locally("sku-1"), "kept after a rollback");

    let mut tx = test.db.begin().await.unwrap();
    cache.invalidate_after_commit(&mut tx, "sku-1");
    tx.commit().await.unwrap();
    eventually(
        "dropped after the commit",
        Duration::from_secs(2),
        || async { !cache.holds_locally("sku-1") },
    )
    .await;
}

#[tokio::test]
async fn a_load_that_overlapped_an_invalidation_does_not_stay_cached() {
    let cache = products(None);
    let (started, go) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let slow = {
        let (cache, started, go) = (cache.clone(), started.clone(), go.clone());
        tokio::spawn(async move {
            cache
                .get_or_load("sku-1", || async move {
                    // Read the old price, then wait while the write commits.
                    started.notify_one();
                    go.notified().await;
                    Ok::<_, std::io::Error>(Some(product(100)))
                })
                .await
                .unwrap()
        })
    };
    started.notified().await;
    cache.invalidate("sku-1").await; // the write's invalidation, during the load
    go.notify_one();
    assert_eq!(
        slow.await.unwrap().unwrap().price,
        100,
        "the overlapping read"
    );
    assert!(
        !cache.holds_locally("sku-1"),
        "not kept for the next reader"
    );
    let database = Database::priced(90);
    assert_eq!(database.read(&cache, "sku-1").await.unwrap().price, 90);
}
