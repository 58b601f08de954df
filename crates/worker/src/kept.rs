//! Large results kept in the worker's memory (issue 15, ARCHITECTURE.md
//! §8): a result of at least [`DataOptions::keep_min`] bytes stays here,
//! sealed as it would be in Redis, and Redis gets only a small signed
//! [`Location`] record under the result key (same holders, same release).
//! Readers fetch the value over this worker's data connection
//! ([`flotilla_runtime::data::DataServer`]); the worker drops its copy once
//! the record is gone (released, overwritten, rolled back), which a sweep
//! of the recorded keys notices within [`SWEEP_EVERY`].

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
}

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            listen: "127.0.0.1:0".into(),
            advertise: None,
            keep_min: KEEP_MIN,
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
    /// The location record of each kept key, and whether its write has
    /// been tried: from then on the sweep drops the value once Redis no
    /// longer holds a record, and a graceful stop hands it over.
    records: Mutex<HashMap<String, Record>>,
}

#[derive(Debug)]
struct Record {
    bytes: Vec<u8>,
    written: bool,
}

impl Kept {
    pub(crate) fn new(keep: Keep, addr: String, keep_min: usize) -> Kept {
        Kept {
            keep,
            addr,
            keep_min: keep_min.max(1),
            records: Mutex::default(),
        }
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
        self.lock().insert(
            key.to_owned(),
            Record {
                bytes: record.clone(),
                written: false,
            },
        );
        Some(record)
    }

    /// The record writes of `keys` have been tried: the sweep watches them.
    pub(crate) fn recorded(&self, keys: impl IntoIterator<Item = String>) {
        let mut records = self.lock();
        for key in keys {
            if let Some(record) = records.get_mut(&key) {
                record.written = true;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Record>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the kept values whose record Redis no longer holds. Returns
    /// how many were dropped.
    pub(crate) async fn sweep(&self, store: &Store) -> usize {
        let keys: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, record)| record.written)
            .map(|(key, _)| key.clone())
            .collect();
        let mut dropped = 0;
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
                if tag != Some(TAG_KEPT) {
                    records.remove(key);
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

    /// Hands every value still kept over to Redis (a graceful stop: the
    /// values outlive the worker). Each goes only where its record is still
    /// this worker's; one that fails to go is logged, and its readers will
    /// find it lost. Returns how many were handed over.
    pub(crate) async fn hand_over_all(&self, store: &Store) -> usize {
        let records: Vec<(String, Vec<u8>)> = self
            .lock()
            .iter()
            .filter(|(_, record)| record.written)
            .map(|(key, record)| (key.clone(), record.bytes.clone()))
            .collect();
        if records.is_empty() {
            return 0;
        }
        let started = std::time::Instant::now();
        let (mut handed, mut bytes) = (0, 0u64);
        for (key, record) in records {
            let Some(value) = self.keep.get(&key) else {
                continue;
            };
            match store.hand_over(&key, &record, &[&value]).await {
                Ok(true) => {
                    handed += 1;
                    bytes += value.len() as u64;
                }
                Ok(false) => {}
                Err(error) => {
                    warn!(%key, %error, "handing a kept value over to Redis failed: its readers will find it lost");
                }
            }
            self.keep.remove(&key);
            self.lock().remove(&key);
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
