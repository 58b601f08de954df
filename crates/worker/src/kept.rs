//! Large results kept in the worker's memory (issue 15, ARCHITECTURE.md
//! §8): a result of at least [`DataOptions::keep_min`] bytes stays here,
//! sealed as it would be in Redis, and Redis gets only a small signed
//! [`Location`] record under the result key (same holders, same release).
//! Readers fetch the value over this worker's data connection
//! ([`flotilla_runtime::data::DataServer`]); the worker drops its copy once
//! the record is gone (released, overwritten, rolled back), which a sweep
//! of the recorded keys notices within [`SWEEP_EVERY`].
//!
//! With a memory bound ([`DataOptions::memory`], `--data-memory`) the
//! oldest kept values beyond it are spilled: handed over to Redis (in
//! chunks), the record replaced by the value, as on a graceful stop. A
//! spilled value stays served for [`SPILL_GRACE`] more, for readers that
//! read its record just before.

use bytes::Bytes;
use flotilla_proto::{Codec, Encoded, Location, TAG_KEPT};
use flotilla_runtime::data::Keep;
use flotilla_runtime::store::Store;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tracing::{debug, warn};

/// How often the kept keys are checked against Redis.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// How long a spilled value is still served here, for readers that read
/// its location record just before it was replaced.
pub(crate) const SPILL_GRACE: Duration = Duration::from_secs(5);

/// The default of [`DataOptions::keep_min`]: 1 MiB.
pub const KEEP_MIN: usize = 1 << 20;

/// Where and from what size a worker keeps its large results.
#[derive(Debug, Clone)]
pub struct DataOptions {
    /// The address the data connection listens on (`FLOTILLA_DATA_ADDR`,
    /// default `127.0.0.1:0`: loopback, any free port). Give `0.0.0.0:PORT`
    /// when readers run on other hosts.
    pub listen: String,
    /// The address readers are told (`FLOTILLA_DATA_ADVERTISE`). By
    /// default the bound address; when bound to all interfaces, this
    /// host's name with the bound port.
    pub advertise: Option<String>,
    /// Results at least this large (encoded) are kept here rather than
    /// written to Redis (`FLOTILLA_KEEP_MIN`, default [`KEEP_MIN`]).
    pub keep_min: usize,
    /// At most this many bytes of kept values stay in memory
    /// (`FLOTILLA_DATA_MEMORY`); beyond it the oldest are spilled to Redis
    /// within about a second. `None` (the default): no bound.
    pub memory: Option<usize>,
}

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            listen: "127.0.0.1:0".into(),
            advertise: None,
            keep_min: KEEP_MIN,
            memory: None,
        }
    }
}

/// The worker's kept values and what it tells readers.
#[derive(Debug)]
pub(crate) struct Kept {
    keep: Keep,
    /// The advertised data address.
    addr: String,
    keep_min: usize,
    /// [`DataOptions::memory`].
    memory: Option<usize>,
    /// How long a spilled value is still served ([`SPILL_GRACE`]).
    grace: Duration,
    /// The location record of each kept key, and whether its write has
    /// been tried: from then on the sweep drops the value once Redis no
    /// longer holds a record, and a graceful stop hands it over.
    records: Mutex<Records>,
}

#[derive(Debug, Default)]
struct Records {
    by_key: HashMap<String, Record>,
    /// The order of keeping, for spilling the oldest first.
    next: u64,
}

#[derive(Debug)]
struct Record {
    bytes: Vec<u8>,
    written: bool,
    /// When it was kept, in order.
    order: u64,
    /// When it was spilled to Redis (it is dropped [`SPILL_GRACE`] later).
    spilled: Option<std::time::Instant>,
}

impl Record {
    /// Written and not spilled: the sweep checks it against Redis, a spill
    /// or a graceful stop may hand it over.
    fn watched(&self) -> bool {
        self.written && self.spilled.is_none()
    }
}

impl Kept {
    pub(crate) fn new(keep: Keep, addr: String, keep_min: usize) -> Kept {
        Kept {
            keep,
            addr,
            keep_min: keep_min.max(1),
            memory: None,
            grace: SPILL_GRACE,
            records: Mutex::default(),
        }
    }

    /// The same, keeping at most `memory` bytes (see [`DataOptions::memory`]);
    /// spilled values are still served for `grace`.
    pub(crate) fn with_memory(mut self, memory: Option<usize>, grace: Duration) -> Kept {
        self.memory = memory;
        self.grace = grace;
        self
    }

    /// The advertised data address.
    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// The values kept (for the reader of this worker's own inputs).
    pub(crate) fn keep(&self) -> &Keep {
        &self.keep
    }

    /// Keeps `value` (a task's encoded result) when it is large, and
    /// returns the record to store in its place; `None` (and `value`
    /// untouched) for a small one. The value is sealed in place (its
    /// signature and tag appended), so what is kept is byte for byte what
    /// Redis would have held, and a reader checks it the same way.
    pub(crate) fn take(
        &self,
        codec: &Codec,
        worker: &str,
        key: &str,
        value: &mut Encoded,
    ) -> Option<Vec<u8>> {
        if value.len() < self.keep_min {
            return None;
        }
        let size = value.len() as u64;
        let sealed = codec.result_ok_arg(key, value);
        let [_, signature, tag] = sealed.pieces();
        let (signature, tag) = (signature.to_vec(), tag.to_vec());
        // Appended in the room the encoding left for them: no copy.
        value.append(&signature);
        value.append(&tag);
        let sealed: Bytes = std::mem::replace(value, Encoded::from_vec(Vec::new())).into_bytes();
        self.keep.insert(key, sealed);
        let record = codec.result_kept(
            key,
            &Location {
                worker: worker.to_owned(),
                addr: self.addr.clone(),
                size,
            },
        );
        let mut records = self.lock();
        let order = records.next;
        records.next += 1;
        records.by_key.insert(
            key.to_owned(),
            Record {
                bytes: record.clone(),
                written: false,
                order,
                spilled: None,
            },
        );
        Some(record)
    }

    /// The record writes of `keys` have been tried: the sweep watches them.
    pub(crate) fn recorded(&self, keys: impl IntoIterator<Item = String>) {
        let mut records = self.lock();
        for key in keys {
            if let Some(record) = records.by_key.get_mut(&key) {
                record.written = true;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the kept values whose record Redis no longer holds, and the
    /// spilled ones past their grace. Returns how many were dropped.
    pub(crate) async fn sweep(&self, store: &Store) -> usize {
        let mut dropped = 0;
        let keys: Vec<String> = {
            let mut records = self.lock();
            let grace = self.grace;
            records.by_key.retain(|key, record| {
                let over = record.spilled.is_some_and(|at| at.elapsed() >= grace);
                if over && self.keep.remove(key).is_some() {
                    dropped += 1;
                }
                !over
            });
            records
                .by_key
                .iter()
                .filter(|(_, record)| record.watched())
                .map(|(key, _)| key.clone())
                .collect()
        };
        for chunk in keys.chunks(500) {
            let tags = match store.result_tags(chunk).await {
                Ok(tags) => tags,
                Err(error) => {
                    debug!(%error, "checking kept values failed; next sweep");
                    return dropped;
                }
            };
            let mut records = self.lock();
            for (key, tag) in chunk.iter().zip(tags) {
                let spilled = records.by_key.get(key).is_some_and(|r| r.spilled.is_some());
                if tag != Some(TAG_KEPT) && !spilled {
                    records.by_key.remove(key);
                    if self.keep.remove(key).is_some() {
                        dropped += 1;
                    }
                }
            }
        }
        dropped
    }

    /// Sweeps every [`SWEEP_EVERY`] for ever.
    pub(crate) async fn sweep_loop(&self, store: Store) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let spilled = self.spill(&store).await;
            if spilled > 0 {
                debug!(
                    spilled,
                    kept = self.keep.len(),
                    "spilled kept values over the memory bound to Redis"
                );
            }
            let dropped = self.sweep(&store).await;
            if dropped > 0 {
                debug!(
                    dropped,
                    kept = self.keep.len(),
                    kept_bytes = self.keep.total_bytes(),
                    "dropped kept values no longer referenced"
                );
            }
        }
    }

    /// The bytes of the values kept and not spilled.
    fn live_bytes(&self) -> usize {
        let records = self.lock();
        records
            .by_key
            .iter()
            .filter(|(_, record)| record.spilled.is_none())
            .filter_map(|(key, _)| self.keep.get(key))
            .map(|value| value.len())
            .sum()
    }

    /// Spills the oldest kept values (whose record is written) to Redis
    /// until what stays is within the memory bound. Returns how many went.
    pub(crate) async fn spill(&self, store: &Store) -> usize {
        let Some(bound) = self.memory else {
            return 0;
        };
        let mut live = self.live_bytes();
        if live <= bound {
            return 0;
        }
        let mut oldest: Vec<(u64, String, Vec<u8>)> = self
            .lock()
            .by_key
            .iter()
            .filter(|(_, record)| record.watched())
            .map(|(key, record)| (record.order, key.clone(), record.bytes.clone()))
            .collect();
        oldest.sort_unstable_by_key(|(order, _, _)| *order);
        let mut spilled = 0;
        for (_, key, record) in oldest {
            if live <= bound {
                break;
            }
            match self.hand_over(store, &key, &record).await {
                Ok(None) => {}
                // Handed over, or no longer this worker's record: either way
                // readers now find the value (or its absence) in Redis.
                Ok(Some((_, size))) => {
                    if let Some(record) = self.lock().by_key.get_mut(&key) {
                        record.spilled = Some(std::time::Instant::now());
                    }
                    live = live.saturating_sub(size);
                    spilled += 1;
                }
                Err(error) => {
                    warn!(%key, %error, "spilling a kept value to Redis failed; trying again next sweep");
                    break;
                }
            }
        }
        spilled
    }

    /// Hands the kept value of `key` over to Redis in place of its location
    /// `record` (only where that record is still this worker's): whether it
    /// went, and its size; `None` when nothing is kept under `key`.
    async fn hand_over(
        &self,
        store: &Store,
        key: &str,
        record: &[u8],
    ) -> redis::RedisResult<Option<(bool, usize)>> {
        let Some(value) = self.keep.get(key) else {
            return Ok(None);
        };
        let handed = store.hand_over(key, record, &[&value]).await?;
        Ok(Some((handed, value.len())))
    }

    /// Hands every value still kept over to Redis (a graceful stop: the
    /// values outlive the worker). Each goes only where its record is still
    /// this worker's; one that fails to go is logged, and its readers will
    /// find it lost. Returns how many were handed over.
    pub(crate) async fn hand_over_all(&self, store: &Store) -> usize {
        let records: Vec<(String, Vec<u8>)> = self
            .lock()
            .by_key
            .iter()
            .filter(|(_, record)| record.watched())
            .map(|(key, record)| (key.clone(), record.bytes.clone()))
            .collect();
        // Spilled values are in Redis already.
        self.lock().by_key.retain(|key, record| {
            if record.spilled.is_some() {
                self.keep.remove(key);
            }
            record.spilled.is_none()
        });
        if records.is_empty() {
            return 0;
        }
        let started = std::time::Instant::now();
        let (mut handed, mut bytes) = (0, 0u64);
        for (key, record) in records {
            match self.hand_over(store, &key, &record).await {
                Ok(Some((true, size))) => {
                    handed += 1;
                    bytes += size as u64;
                }
                Ok(_) => {}
                Err(error) => {
                    warn!(%key, %error, "handing a kept value over to Redis failed: its readers will find it lost");
                }
            }
            self.keep.remove(&key);
            self.lock().by_key.remove(&key);
        }
        tracing::info!(handed, bytes, took = ?started.elapsed(), "kept values handed over to Redis");
        handed
    }

    /// Values still kept when the worker stops (they are lost with it).
    pub(crate) fn warn_if_any(&self) {
        if !self.keep.is_empty() {
            warn!(
                kept = self.keep.len(),
                bytes = self.keep.total_bytes(),
                "stopping with kept values: readers will find them lost"
            );
        }
    }
}

/// The address to advertise for a listener bound to `bound`.
pub(crate) fn advertised(bound: std::net::SocketAddr, advertise: Option<&str>) -> String {
    if let Some(advertise) = advertise {
        return advertise.to_owned();
    }
    if bound.ip().is_unspecified() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "localhost".into());
        return format!("{host}:{}", bound.port());
    }
    bound.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::StoredResult;

    #[tokio::test]
    async fn a_large_result_is_kept_sealed_and_recorded_small_ones_are_not() {
        let codec = Codec::plain();
        let kept = Kept::new(Keep::new(), "127.0.0.1:9".into(), 1000);
        let mut small = Encoded::from_vec(vec![1u8; 999]);
        assert!(kept.take(&codec, "w", "s", &mut small).is_none());
        assert_eq!(small.len(), 999);
        let mut large = Encoded::from_vec(vec![2u8; 1000]);
        let record = kept.take(&codec, "w", "l", &mut large).unwrap();
        assert!(large.is_empty());
        match codec.open_result("l", record).unwrap() {
            StoredResult::Kept(location) => {
                assert_eq!(location.size, 1000);
                assert_eq!(location.addr, "127.0.0.1:9");
                assert_eq!(location.worker, "w");
            }
            other => panic!("{other:?}"),
        }
        let value = kept.keep().get("l").unwrap();
        assert_eq!(
            codec.open_result("l", value.to_vec()).unwrap(),
            StoredResult::Ok(vec![2u8; 1000])
        );
        // The store has no record of it: the sweep drops it once recorded.
        let store = Store::memory();
        assert_eq!(kept.sweep(&store).await, 0, "not recorded yet: kept");
        kept.recorded(["l".to_owned()]);
        assert_eq!(kept.sweep(&store).await, 1);
        assert!(kept.keep().is_empty());
    }

    #[tokio::test]
    async fn the_sweep_keeps_what_redis_still_records() {
        let codec = Codec::plain();
        let kept = Kept::new(Keep::new(), "127.0.0.1:9".into(), 10);
        let store = Store::memory();
        let mut value = Encoded::from_vec(vec![3u8; 100]);
        let record = kept.take(&codec, "w", "k", &mut value).unwrap();
        let mut batch = store.batch();
        batch.hold("k", "client").store_result("k", &record);
        batch.exec().await.unwrap();
        kept.recorded(["k".to_owned()]);
        assert_eq!(kept.sweep(&store).await, 0);
        assert_eq!(kept.keep().len(), 1);
        store
            .release(&[("k".into(), "client".into())])
            .await
            .unwrap();
        assert_eq!(kept.sweep(&store).await, 1);
        assert!(kept.keep().is_empty());
    }

    #[tokio::test]
    async fn a_graceful_stop_hands_recorded_values_over_to_the_store() {
        let codec = Codec::plain();
        let kept = Kept::new(Keep::new(), "127.0.0.1:9".into(), 10);
        let store = Store::memory();
        let mut held = Encoded::from_vec(vec![4u8; 100]);
        let mut released = Encoded::from_vec(vec![5u8; 100]);
        let record = kept.take(&codec, "w", "held", &mut held).unwrap();
        let other = kept.take(&codec, "w", "released", &mut released).unwrap();
        let mut batch = store.batch();
        batch
            .hold("held", "client")
            .store_result("held", &record)
            .hold("released", "client")
            .store_result("released", &other);
        batch.exec().await.unwrap();
        kept.recorded(["held".to_owned(), "released".to_owned()]);
        store
            .release(&[("released".into(), "client".into())])
            .await
            .unwrap();
        assert_eq!(kept.hand_over_all(&store).await, 1);
        assert!(kept.keep().is_empty());
        let read = store
            .read_results(&["held".into(), "released".into()])
            .await
            .unwrap();
        assert_eq!(read, [Some(codec.result_ok("held", &[4u8; 100])), None]);
    }

    #[tokio::test]
    async fn the_oldest_values_over_the_memory_bound_are_spilled_to_the_store() {
        let codec = Codec::plain();
        // Three values of 101 stored bytes each (100 and the tag), 250 allowed.
        let kept =
            Kept::new(Keep::new(), "127.0.0.1:9".into(), 10).with_memory(Some(250), Duration::ZERO);
        let store = Store::memory();
        let mut batch = store.batch();
        for (key, byte) in [("a", 1u8), ("b", 2), ("c", 3)] {
            let record = kept
                .take(&codec, "w", key, &mut Encoded::from_vec(vec![byte; 100]))
                .unwrap();
            batch.hold(key, "client").store_result(key, &record);
        }
        batch.exec().await.unwrap();
        assert_eq!(kept.spill(&store).await, 0, "records not written yet");
        kept.recorded(["a".to_owned(), "b".to_owned(), "c".to_owned()]);
        assert_eq!(kept.spill(&store).await, 1, "the oldest goes");
        assert_eq!(kept.live_bytes(), 202);
        assert_eq!(kept.spill(&store).await, 0, "within the bound now");
        let read = store.read_results(&["a".into(), "b".into()]).await.unwrap();
        assert_eq!(
            read[0],
            Some(codec.result_ok("a", &[1u8; 100])),
            "the value, in Redis"
        );
        assert!(matches!(
            codec.open_result("b", read[1].clone().unwrap()).unwrap(),
            StoredResult::Kept(_)
        ));
        // Still served through its grace (zero here): the sweep drops it.
        assert!(kept.keep().get("a").is_some());
        assert_eq!(kept.sweep(&store).await, 1);
        assert!(kept.keep().get("a").is_none());
        assert_eq!(kept.keep().len(), 2);
        // Without a bound nothing is spilled.
        let unbounded = Kept::new(Keep::new(), "127.0.0.1:9".into(), 10);
        assert_eq!(unbounded.spill(&store).await, 0);
    }

    #[test]
    fn the_advertised_address_names_this_host_when_bound_to_all() {
        let any: std::net::SocketAddr = "0.0.0.0:7070".parse().unwrap();
        let named = advertised(any, None);
        assert!(
            named.ends_with(":7070") && !named.starts_with("0.0.0.0"),
            "{named}"
        );
        let lo: std::net::SocketAddr = "127.0.0.1:7070".parse().unwrap();
        assert_eq!(advertised(lo, None), "127.0.0.1:7070");
        assert_eq!(advertised(any, Some("w1:7070")), "w1:7070");
    }
}
