//! The store's contract: one suite, run against the in-memory fake and a
//! real Redis (in a fresh namespace), so that the fake is proven faithful.

use super::{Held, Reply, Store, Stored};
use flotilla_proto::{StoredResult, TAG_ERR, TAG_OK};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn s(key: &str) -> String {
    key.to_owned()
}

fn hold_of(reply: &Reply) -> Held {
    match reply {
        Reply::Held(held) => *held,
        other => panic!("expected a hold's reply, got {other:?}"),
    }
}

async fn holders(store: &Store, key: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut pages = store.holders();
    while let Some(sets) = pages.next_page().await.unwrap() {
        found.extend(
            sets.into_iter()
                .filter(|(k, _)| k == key)
                .flat_map(|(_, members)| members),
        );
    }
    found.sort();
    found.dedup();
    found
}

/// Holds, releases and stores: a result lives exactly while it is held.
async fn results_live_while_held(store: &Store) {
    let ok = StoredResult::encode_ok(b"3");
    let mut batch = store.batch();
    batch.hold("a", "c1").store_result("a", &ok).hold("a", "c2");
    let replies = batch.exec().await.unwrap();
    assert_eq!(
        replies,
        [
            Reply::Held(Held::Missing),
            Reply::Stored(Stored::Kept),
            Reply::Held(Held::Stored(TAG_OK)),
        ]
    );
    assert_eq!(
        store.read_results(&[s("a")]).await.unwrap(),
        [Some(ok.clone())]
    );
    assert_eq!(
        store.result_tags(&[s("a"), s("zz")]).await.unwrap(),
        [Some(TAG_OK), None]
    );
    assert_eq!(holders(store, "a").await, ["c1", "c2"]);
    assert_eq!(store.held(&[s("a"), s("zz")]).await.unwrap(), [true, false]);

    let freed = store.release(&[(s("a"), s("c1"))]).await.unwrap();
    assert!(freed.is_empty(), "c2 still holds it");
    assert_eq!(store.read_results(&[s("a")]).await.unwrap(), [Some(ok)]);
    let freed = store
        .release(&[(s("a"), s("c2")), (s("never-held"), s("c2"))])
        .await
        .unwrap();
    assert_eq!(freed, ["a", "never-held"]);
    assert_eq!(store.read_results(&[s("a")]).await.unwrap(), [None]);
    assert_eq!(store.held(&[s("a")]).await.unwrap(), [false]);
    assert!(holders(store, "a").await.is_empty());

    // Nobody holds it: not stored at all.
    let mut batch = store.batch();
    batch.store_result("b", &ok_bytes());
    assert_eq!(
        batch.exec().await.unwrap(),
        [Reply::Stored(Stored::Unwanted)]
    );
    assert_eq!(store.read_results(&[s("b")]).await.unwrap(), [None]);

    // An error keeps its tag.
    let mut batch = store.batch();
    batch
        .hold("e", "c1")
        .store_result("e", &[7, TAG_ERR])
        .hold("e", "c2");
    let replies = batch.exec().await.unwrap();
    assert_eq!(hold_of(&replies[2]), Held::Stored(TAG_ERR));
    store
        .release(&[(s("e"), s("c1")), (s("e"), s("c2"))])
        .await
        .unwrap();
    assert!(store.batch().exec().await.unwrap().is_empty());
}

fn ok_bytes() -> Vec<u8> {
    StoredResult::encode_ok(b"value")
}

/// `fire_and_forget` holds until the result is stored, and no longer.
async fn fire_and_forget(store: &Store) {
    let ff = super::FIRE_AND_FORGET;
    let mut batch = store.batch();
    batch
        .hold_until_done("f", ff)
        .store_result("f", &ok_bytes());
    assert_eq!(
        batch.exec().await.unwrap(),
        [Reply::Held(Held::Missing), Reply::Stored(Stored::Dropped)]
    );
    assert_eq!(store.read_results(&[s("f")]).await.unwrap(), [None]);
    assert_eq!(store.held(&[s("f")]).await.unwrap(), [false]);

    let mut batch = store.batch();
    batch
        .hold("g", "c1")
        .hold_until_done("g", ff)
        .store_result("g", &ok_bytes())
        .hold_until_done("g", ff);
    let replies = batch.exec().await.unwrap();
    assert_eq!(replies[2], Reply::Stored(Stored::Kept));
    assert_eq!(hold_of(&replies[3]), Held::NotTaken);
    assert_eq!(holders(store, "g").await, ["c1"]);
    assert_eq!(store.release(&[(s("g"), s("c1"))]).await.unwrap(), ["g"]);
}

/// A hold taken only while a witness still holds the key.
async fn hold_if_held(store: &Store) {
    let mut batch = store.batch();
    batch
        .hold_if_held("w", "new", "witness")
        .scatter("w", "witness", &ok_bytes())
        .hold_if_held("w", "new", "witness");
    let replies = batch.exec().await.unwrap();
    assert_eq!(hold_of(&replies[0]), Held::NotTaken);
    assert_eq!(replies[1], Reply::Done);
    assert_eq!(hold_of(&replies[2]), Held::Stored(TAG_OK));
    assert_eq!(holders(store, "w").await, ["new", "witness"]);
    let freed = store
        .release(&[(s("w"), s("new")), (s("w"), s("witness"))])
        .await
        .unwrap();
    assert_eq!(freed, ["w"]);
}

/// Large values are written as they are and finalized like small ones.
async fn large_results(store: &Store) {
    let value = vec![5u8; super::LARGE_RESULT + 10];
    let mut batch = store.batch();
    batch
        .hold("big", "c1")
        .store_large_result("big", StoredResult::ok_arg(&value))
        .store_large_result("unheld", StoredResult::ok_arg(&value));
    let replies = batch.exec().await.unwrap();
    assert_eq!(
        replies[1..],
        [Reply::Stored(Stored::Kept), Reply::Stored(Stored::Unwanted)]
    );
    let read = store.read_results(&[s("big"), s("unheld")]).await.unwrap();
    assert_eq!(read, [Some(StoredResult::encode_ok(&value)), None]);
    assert_eq!(
        store.release(&[(s("big"), s("c1"))]).await.unwrap(),
        ["big"]
    );
}

/// A value of `len` bytes whose chunks differ (so a chunk out of place
/// shows).
fn patterned(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i / 4099 + i) as u8).collect()
}

/// Values in chunks round trip whole, sealed bytes and all, at every size
/// around the chunk size; releases and roll-backs delete their chunks.
async fn chunked_values(store: &Store) {
    use super::{CHUNKED_MIN, CHUNK_SIZE, TAG_CHUNKED};
    let codec = flotilla_proto::Codec::new(&flotilla_proto::Config {
        secret: Some(flotilla_proto::Secret::new("a secret of enough length")),
        ..flotilla_proto::Config::default()
    });
    for len in [0, CHUNKED_MIN - 1, CHUNKED_MIN, 7 * CHUNK_SIZE / 2] {
        let key = format!("chunked-{len}");
        let value = patterned(len);
        let sealed = codec.result_ok_arg(&key, &value);
        // Through the two steps: chunks, then the manifest as the result.
        let manifest = store.write_chunks(&key, &sealed.pieces()).await.unwrap();
        assert_eq!(manifest.last(), Some(&TAG_CHUNKED));
        assert!(manifest.len() < 32, "a manifest is small");
        let mut batch = store.batch();
        batch
            .hold(&key, "c1")
            .store_result(&key, &manifest)
            .hold(&key, "c2");
        let replies = batch.exec().await.unwrap();
        assert_eq!(replies[1], Reply::Stored(Stored::Kept));
        assert_eq!(hold_of(&replies[2]), Held::Stored(TAG_OK), "{len}");
        assert_eq!(
            store.result_tags(std::slice::from_ref(&key)).await.unwrap(),
            [Some(TAG_OK)]
        );
        let read = store.read_results(&[key.clone(), s("zz")]).await.unwrap();
        let [Some(bytes), None] = <[_; 2]>::try_from(read).unwrap() else {
            panic!("the chunked value of {len} bytes did not read back");
        };
        assert_eq!(bytes, sealed.pieces().concat(), "{len}");
        match codec.open_result(&key, bytes).unwrap() {
            StoredResult::Ok(opened) => assert!(opened == value, "{len}"),
            other => panic!("{other:?}"),
        }
        let freed = store
            .release(&[(key.clone(), s("c1")), (key.clone(), s("c2"))])
            .await
            .unwrap();
        assert_eq!(freed, std::slice::from_ref(&key));
        assert_eq!(
            store
                .read_results(std::slice::from_ref(&key))
                .await
                .unwrap(),
            [None]
        );
    }

    // The one-call forms: a task's result and scattered data.
    let value = patterned(CHUNKED_MIN + 5);
    let mut batch = store.batch();
    batch.hold("big-result", "c1");
    batch.exec().await.unwrap();
    let stored = store
        .store_large("big-result", StoredResult::ok_arg(&value))
        .await
        .unwrap();
    assert_eq!(stored, Stored::Kept);
    assert_eq!(
        store
            .store_large("unheld", StoredResult::ok_arg(&value))
            .await
            .unwrap(),
        Stored::Unwanted
    );
    let small = store
        .store_large("unheld-small", StoredResult::ok_arg(b"7"))
        .await
        .unwrap();
    assert_eq!(small, Stored::Unwanted);
    let sealed = codec.result_ok_arg("big-scatter", &value);
    store
        .scatter_large("big-scatter", "c1", &sealed.pieces())
        .await
        .unwrap();
    store
        .scatter_large("small-scatter", "c1", &StoredResult::ok_arg(b"7").pieces())
        .await
        .unwrap();
    let read = store
        .read_results(&[
            s("big-result"),
            s("unheld"),
            s("big-scatter"),
            s("small-scatter"),
        ])
        .await
        .unwrap();
    assert_eq!(
        read,
        [
            Some(StoredResult::encode_ok(&value)),
            None,
            Some(sealed.pieces().concat()),
            Some(StoredResult::encode_ok(b"7")),
        ]
    );
    assert_eq!(holders(store, "big-scatter").await, ["c1"]);
    let freed = store
        .release(&[
            (s("big-result"), s("c1")),
            (s("big-scatter"), s("c1")),
            (s("small-scatter"), s("c1")),
        ])
        .await
        .unwrap();
    assert_eq!(freed.len(), 3);

    // A release that deletes the chunks while they are written: the
    // manifest is refused rather than stored over missing chunks, and a
    // value whose chunk went missing reads as missing, never as garbage.
    let manifest = store.write_chunks("raced", &[&value[..]]).await.unwrap();
    store.release(&[(s("raced"), s("nobody"))]).await.unwrap();
    let mut batch = store.batch();
    batch.hold("raced", "c1").store_result("raced", &manifest);
    let replies = batch.exec_each().await.unwrap();
    let refused = replies[1].as_ref().unwrap_err().to_string();
    assert!(refused.contains("INCOMPLETE"), "{refused}");
    let mut batch = store.batch();
    batch.scatter("raced", "c1", &manifest);
    assert!(batch.exec().await.is_err(), "a scatter over missing chunks");
    assert_eq!(store.read_results(&[s("raced")]).await.unwrap(), [None]);
    // A roll-back deletes the chunks too.
    store.write_chunks("raced", &[&value[..]]).await.unwrap();
    let mut batch = store.batch();
    batch.store_result("raced", &manifest).roll_back("raced");
    batch.exec().await.unwrap();
    assert_eq!(store.read_results(&[s("raced")]).await.unwrap(), [None]);
    let mut batch = store.batch();
    batch.scatter("raced", "c1", &manifest);
    assert!(
        batch.exec().await.is_err(),
        "the roll-back deleted the chunks"
    );
    store.release(&[(s("raced"), s("c1"))]).await.unwrap();
}

/// Specs are written, found, read, forgotten and rolled back.
async fn specs(store: &Store) {
    let mut batch = store.batch();
    batch
        .write_spec("p", b"spec-p")
        .write_spec("q", b"spec-q")
        .spec_exists("p")
        .spec_exists("none");
    let replies = batch.exec().await.unwrap();
    assert_eq!(replies[2..], [Reply::Exists(true), Reply::Exists(false)]);
    assert_eq!(
        store.specs_exist(&[s("q"), s("none")]).await.unwrap(),
        [true, false]
    );
    assert_eq!(
        store.read_specs(&[s("p"), s("none")]).await.unwrap(),
        [Some(b"spec-p".to_vec()), None]
    );
    let mut scanned = Vec::new();
    let mut pages = store.specs();
    while let Some(found) = pages.next_page().await.unwrap() {
        scanned.extend(found);
    }
    scanned.sort();
    scanned.dedup();
    assert_eq!(
        scanned,
        [
            (s("p"), Some(b"spec-p".to_vec())),
            (s("q"), Some(b"spec-q".to_vec()))
        ]
    );
    store.forget_specs(&[s("p")]).await.unwrap();
    // A rolled-back store loses its partial value and its spec.
    let mut batch = store.batch();
    batch
        .hold("q", "c1")
        .store_result("q", &ok_bytes())
        .roll_back("q")
        .forget_spec("p");
    batch.exec().await.unwrap();
    assert_eq!(store.read_results(&[s("q")]).await.unwrap(), [None]);
    assert_eq!(
        store.specs_exist(&[s("p"), s("q")]).await.unwrap(),
        [false, false]
    );
    assert_eq!(holders(store, "q").await, ["c1"], "a roll-back keeps holds");
    store.release(&[(s("q"), s("c1"))]).await.unwrap();
}

/// Lost starts are counted up to the limit, then refused.
async fn start_records(store: &Store) {
    assert_eq!(store.start_record("l").await.unwrap(), (None, None));
    assert_eq!(store.start_record_ttl("l").await.unwrap(), None);
    assert_eq!(
        store.record_start("l", 2, "w1").await.unwrap(),
        (true, 0, s("w1"))
    );
    assert_eq!(
        store.record_start("l", 2, "w2").await.unwrap(),
        (true, 1, s("w2"))
    );
    assert_eq!(
        store.record_start("l", 2, "w3").await.unwrap(),
        (false, 2, s("w2"))
    );
    assert_eq!(
        store.start_record("l").await.unwrap(),
        (Some(2), Some(s("w2")))
    );
    let ttl = store.start_record_ttl("l").await.unwrap().unwrap();
    assert!(
        ttl > super::START_RECORD_EXPIRY_S - 60 && ttl <= super::START_RECORD_EXPIRY_S,
        "{ttl}"
    );
    let mut batch = store.batch();
    batch.forget_start("l");
    batch.exec().await.unwrap();
    assert_eq!(store.start_record("l").await.unwrap(), (None, None));
}

/// Custody leases lapse, are taken once, and end on completion.
async fn custody(store: &Store) {
    store
        .renew_custody(&[s("k1"), s("k2")], Duration::from_secs(600))
        .await
        .unwrap();
    store
        .renew_custody(&[s("k3")], Duration::ZERO)
        .await
        .unwrap();
    store.renew_custody(&[], Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(store.lapsed_custody().await.unwrap(), ["k3"]);
    assert!(
        store.lapsed_custody().await.unwrap().is_empty(),
        "taken once"
    );
    let mut batch = store.batch();
    batch.leave_custody(&[s("k1"), s("k2")]);
    batch.exec().await.unwrap();
    // Renewed to lapse now: only a key still in custody comes back.
    store
        .renew_custody(&[s("k2")], Duration::ZERO)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(store.lapsed_custody().await.unwrap(), ["k2"]);
}

/// A task run again after it finished (a redelivery, its inputs released
/// since) may fail: its error must not replace the stored value its
/// dependents read. A success replaces an error (`retry`).
async fn an_error_never_replaces_a_success(store: &Store) {
    let ok = StoredResult::encode_ok(b"4");
    let err = [7, TAG_ERR];
    let mut batch = store.batch();
    batch
        .hold("done", "c1")
        .store_result("done", &ok)
        .store_result("done", &err)
        .hold("retried", "c1")
        .store_result("retried", &err)
        .store_result("retried", &ok);
    batch.exec().await.unwrap();
    assert_eq!(
        store
            .read_results(&[s("done"), s("retried")])
            .await
            .unwrap(),
        [Some(ok.clone()), Some(ok)]
    );
    let freed = store
        .release(&[(s("done"), s("c1")), (s("retried"), s("c1"))])
        .await
        .unwrap();
    assert_eq!(freed.len(), 2);
}

/// Client leases by the client's clock.
async fn leases(store: &Store) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // A renewal tells whether the lease was absent (a first one, or one
    // that vanished).
    assert!(store.renew_lease("old", now - 1000).await.unwrap());
    assert!(store.renew_lease("older", now - 2000).await.unwrap());
    assert!(store.renew_lease("live", now + 1_000).await.unwrap());
    assert!(!store.renew_lease("live", now + 60_000).await.unwrap());
    assert_eq!(
        store.lapsed_leases(now, 50).await.unwrap(),
        ["older", "old"]
    );
    assert_eq!(store.lapsed_leases(now, 1).await.unwrap(), ["older"]);
    assert_eq!(
        store.have_leases(&["old", "live", "none"]).await.unwrap(),
        [true, true, false]
    );
    store.drop_lease("old").await.unwrap();
    store.drop_lease("older").await.unwrap();
    assert!(store.lapsed_leases(now, 50).await.unwrap().is_empty());
    store.drop_lease("live").await.unwrap();
    assert_eq!(store.have_leases(&["live"]).await.unwrap(), [false]);
    assert!(store.renew_lease("live", now + 60_000).await.unwrap());
    store.drop_lease("live").await.unwrap();
}

/// A worker hands its kept values over to Redis when it stops: a record
/// still its own is replaced by the value (whole or in chunks); a record
/// released or replaced meanwhile is left alone, and no chunk is left.
async fn hand_over(store: &Store) {
    let codec = flotilla_proto::Codec::plain();
    let location = flotilla_proto::Location {
        worker: "w".into(),
        addr: "127.0.0.1:1".into(),
        size: 0,
    };
    for len in [10, super::CHUNKED_MIN + 5] {
        let value = patterned(len);
        let key = format!("kept-{len}");
        let record = codec.result_kept(&key, &location);
        let sealed = codec.result_ok_arg(&key, &value);
        let mut batch = store.batch();
        batch.hold(&key, "c").store_result(&key, &record);
        batch.exec().await.unwrap();
        assert!(store
            .hand_over(&key, &record, &sealed.pieces())
            .await
            .unwrap());
        let read = store
            .read_results(std::slice::from_ref(&key))
            .await
            .unwrap();
        assert_eq!(read, [Some(sealed.pieces().concat())], "{len}");
        // Handed over already: the record is not there any more.
        assert!(!store
            .hand_over(&key, &record, &sealed.pieces())
            .await
            .unwrap());
        assert_eq!(
            store.release(&[(key.clone(), s("c"))]).await.unwrap(),
            std::slice::from_ref(&key)
        );
        // Released before the hand-over: nothing is written back.
        assert!(!store
            .hand_over(&key, &record, &sealed.pieces())
            .await
            .unwrap());
        assert_eq!(
            store
                .read_results(std::slice::from_ref(&key))
                .await
                .unwrap(),
            [None]
        );
    }
}

async fn contract(store: Store) {
    store.preload().await.unwrap();
    results_live_while_held(&store).await;
    an_error_never_replaces_a_success(&store).await;
    fire_and_forget(&store).await;
    hold_if_held(&store).await;
    large_results(&store).await;
    chunked_values(&store).await;
    hand_over(&store).await;
    specs(&store).await;
    start_records(&store).await;
    custody(&store).await;
    leases(&store).await;
}

#[tokio::test]
async fn the_memory_store_keeps_the_contract() {
    contract(Store::memory()).await;
}

#[tokio::test]
async fn the_redis_store_keeps_the_contract() {
    let url =
        std::env::var("FLOTILLA_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut redis = tokio::time::timeout(
        Duration::from_secs(10),
        crate::transport::connect_redis(&url),
    )
    .await
    .unwrap_or_else(|_| panic!("Redis at {url} did not answer within 10 s"))
    .unwrap_or_else(|error| panic!("Redis at {url} is needed for this test: {error}"));
    contract_on(&mut redis).await;
}

/// The same contract on a Redis Cluster: every batch's operations spread
/// over the masters' slots.
#[tokio::test]
async fn the_redis_cluster_store_keeps_the_contract() {
    let (cluster, mut redis) = crate::testing::RedisCluster::start_connected().await;
    contract_on(&mut redis).await;
    drop(cluster);
}

/// Runs the contract on `redis` in a fresh namespace, and checks that it
/// left no key behind.
async fn contract_on(redis: &mut crate::Redis) {
    let names = flotilla_proto::Names::new(&format!("t-store-{}", flotilla_proto::new_id()));
    let store = Store::redis(redis.clone(), names.clone());
    // Run apart, so that the namespace is cleaned up even when it fails.
    let outcome = tokio::spawn(contract(store)).await;
    let left = store_keys_left(redis, &names).await;
    let deleted = crate::transport::delete_redis_keys(redis, &names).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic.into_panic());
    }
    deleted.unwrap();
    assert!(left.is_empty(), "keys left behind: {left:?}");
}

async fn store_keys_left(redis: &crate::Redis, names: &flotilla_proto::Names) -> Vec<String> {
    let mut left = Vec::new();
    let mut pages = redis.scan(format!("{}:*", names.namespace()));
    while let Some(keys) = pages.next_page().await.unwrap() {
        left.extend(keys);
    }
    left
}

/// The fake refuses what a full Redis refuses, and lets through what frees
/// memory.
#[tokio::test]
async fn a_full_memory_store_refuses_growth_but_frees() {
    let store = Store::memory_limited(100);
    let mut batch = store.batch();
    batch.hold("x", "c").store_result("x", &[0u8; 200]);
    batch.exec().await.unwrap();
    let mut batch = store.batch();
    batch
        .hold("y", "c")
        .store_result("x", &ok_bytes())
        .write_spec("y", b"s")
        .release("x", "c")
        .hold("y", "c");
    let replies = batch.exec_each().await.unwrap();
    assert!(replies[0].is_err() && replies[1].is_err() && replies[2].is_err());
    assert_eq!(
        *replies[3].as_ref().unwrap(),
        Reply::Released { freed: true }
    );
    assert_eq!(
        *replies[4].as_ref().unwrap(),
        Reply::Held(Held::Missing),
        "room again once freed"
    );
    // A large value that takes it over the limit: written, then refused.
    let value = vec![1u8; 150];
    let mut batch = store.batch();
    batch.store_large_result("y", StoredResult::ok_arg(&value));
    let replies = batch.exec_each().await.unwrap();
    let error = replies[0].as_ref().unwrap_err().to_string();
    assert!(error.contains("OOM"), "{error}");
    let mut batch = store.batch();
    batch.roll_back("y");
    batch.exec().await.unwrap();
    assert_eq!(store.read_results(&[s("y")]).await.unwrap(), [None]);
}

/// A fresh namespace's store on the local Redis, with its connection.
async fn redis_store() -> (Store, crate::Redis, flotilla_proto::Names) {
    let url =
        std::env::var("FLOTILLA_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let redis = tokio::time::timeout(
        Duration::from_secs(10),
        crate::transport::connect_redis(&url),
    )
    .await
    .unwrap_or_else(|_| panic!("Redis at {url} did not answer within 10 s"))
    .unwrap_or_else(|error| panic!("Redis at {url} is needed for this test: {error}"));
    let names = flotilla_proto::Names::new(&format!("t-store-{}", flotilla_proto::new_id()));
    (Store::redis(redis.clone(), names.clone()), redis, names)
}

/// Runs `test` on a fresh Redis namespace, then checks that it left no
/// key behind (and deletes whatever it left, pass or fail).
async fn on_redis<F, Fut>(test: F)
where
    F: FnOnce(Store, crate::Redis, flotilla_proto::Names) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (store, mut redis, names) = redis_store().await;
    let outcome = tokio::spawn(test(store, redis.clone(), names.clone())).await;
    let left = store_keys_left(&redis, &names).await;
    let deleted = crate::transport::delete_redis_keys(&mut redis, &names).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic.into_panic());
    }
    deleted.unwrap();
    assert!(left.is_empty(), "keys left behind: {left:?}");
}

/// On Redis, the chunks are a hash `c:{key}` beside the manifest, and
/// every path that deletes a result deletes it: a release, a store nobody
/// wanted, a `fire_and_forget` result, a roll-back.
#[tokio::test]
async fn redis_chunks_live_and_die_with_their_result() {
    on_redis(|store, redis, names| async move {
        let value = patterned(super::CHUNKED_MIN * 2 + 1);
        let exists = |key: &str| {
            let mut redis = redis.clone();
            let chunks = names.chunks_key(key);
            async move {
                let n: u32 = redis::cmd("EXISTS")
                    .arg(chunks)
                    .query_async(&mut redis)
                    .await
                    .unwrap();
                n == 1
            }
        };
        store.scatter_large("k", "c1", &[&value]).await.unwrap();
        assert!(exists("k").await);
        let len: u32 = redis::cmd("HLEN")
            .arg(names.chunks_key("k"))
            .query_async(&mut redis.clone())
            .await
            .unwrap();
        assert_eq!(len, 3);
        store.release(&[(s("k"), s("c1"))]).await.unwrap();
        assert!(!exists("k").await, "a release deletes the chunks");

        let unwanted = store
            .store_large("u", StoredResult::ok_arg(&value))
            .await
            .unwrap();
        assert_eq!(unwanted, Stored::Unwanted);
        assert!(!exists("u").await, "chunks nobody wants are deleted");

        let mut batch = store.batch();
        batch.hold_until_done("f", super::FIRE_AND_FORGET);
        batch.exec().await.unwrap();
        let dropped = store
            .store_large("f", StoredResult::ok_arg(&value))
            .await
            .unwrap();
        assert_eq!(dropped, Stored::Dropped);
        assert!(!exists("f").await, "a fire-and-forget result's chunks go");

        store.write_chunks("r", &[&value]).await.unwrap();
        let mut batch = store.batch();
        batch.roll_back("r");
        batch.exec().await.unwrap();
        assert!(!exists("r").await, "a roll-back deletes the chunks");
    })
    .await;
}

/// A value over Redis' 512 MB string limit round trips in chunks.
#[tokio::test]
async fn redis_takes_a_value_over_its_string_limit_in_chunks() {
    on_redis(|store, _, _| async move {
        let len = 600_000_000;
        let value = patterned(len);
        let started = std::time::Instant::now();
        store.scatter_large("huge", "c1", &[&value]).await.unwrap();
        let written = started.elapsed();
        let read = store.read_results(&[s("huge")]).await.unwrap();
        let [Some(bytes)] = <[_; 1]>::try_from(read).unwrap() else {
            panic!("the 600 MB value did not read back");
        };
        eprintln!(
            "600 MB through Redis chunks: written in {written:?}, read in {:?}",
            started.elapsed() - written
        );
        assert!(bytes.len() == len && bytes == value, "the value changed");
        drop(bytes);
        assert_eq!(
            store.release(&[(s("huge"), s("c1"))]).await.unwrap(),
            ["huge"]
        );
    })
    .await;
}
