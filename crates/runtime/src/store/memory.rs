//! The in-memory backend of [`Store`](super::Store): the same operations on
//! plain maps, step for step as the Redis scripts do them.

use super::chunks::{self, Manifest};
use super::{Held, Reply, Stored, START_RECORD_EXPIRY_S};
use redis::RedisResult;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// One operation of a batch, as the memory backend runs it.
#[derive(Debug, Clone)]
pub(super) enum Op {
    Hold {
        key: String,
        holder: String,
        witness: Option<String>,
    },
    HoldUntilDone {
        key: String,
        holder: String,
    },
    Release {
        key: String,
        holder: String,
    },
    Store {
        key: String,
        stored: Vec<u8>,
    },
    StoreLarge {
        key: String,
        stored: Vec<u8>,
    },
    Scatter {
        key: String,
        holder: String,
        stored: Vec<u8>,
    },
    RollBack(String),
    WriteSpec {
        key: String,
        spec: Vec<u8>,
    },
    ForgetSpec(String),
    SpecExists(String),
    ForgetStart(String),
    LeaveCustody(Vec<String>),
}

/// The namespace's task-life state.
#[derive(Debug, Default)]
pub(super) struct Memory {
    pub(super) results: HashMap<String, Vec<u8>>,
    /// The chunks of values stored in chunks (`c:{key}`), by index.
    chunks: HashMap<String, HashMap<u32, Vec<u8>>>,
    holders: HashMap<String, BTreeSet<String>>,
    pub(super) specs: HashMap<String, Vec<u8>>,
    /// Lost-start records: failed starts, last worker, expiry.
    starts: HashMap<String, (u32, String, Instant)>,
    /// Custody: key → lease expiry in ms since the epoch.
    custody: HashMap<String, u64>,
    /// Client leases: id → expiry in ms since the epoch (client's clock).
    pub(super) leases: HashMap<String, u64>,
    /// Like Redis' `maxmemory`: writes that may grow the store are refused
    /// while results and specs take more.
    pub(super) max_bytes: Option<usize>,
}

pub(super) fn lock(memory: &Arc<Mutex<Memory>>) -> MutexGuard<'_, Memory> {
    memory
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// The chunked scripts' refusal of a manifest whose chunks are gone.
fn incomplete() -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
        "INCOMPLETE chunks were deleted while they were written",
    ))
}

/// Redis' own refusal, word for word.
fn oom() -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
        "OOM command not allowed when used memory > 'maxmemory'.",
    ))
}

impl Memory {
    fn used_bytes(&self) -> usize {
        self.results.values().map(Vec::len).sum::<usize>()
            + self.specs.values().map(Vec::len).sum::<usize>()
            + self
                .chunks
                .values()
                .flat_map(HashMap::values)
                .map(Vec::len)
                .sum::<usize>()
    }

    /// Refuses a write that may grow the store while it is over its limit.
    fn may_grow(&self) -> RedisResult<()> {
        match self.max_bytes {
            Some(max) if self.used_bytes() > max => Err(oom()),
            _ => Ok(()),
        }
    }

    pub(super) fn is_held(&self, key: &str) -> bool {
        self.holders.get(key).is_some_and(|set| !set.is_empty())
    }

    pub(super) fn tag(&self, key: &str) -> Option<u8> {
        self.results
            .get(key)
            .and_then(|value| value.last().copied())
            .map(super::reported_tag)
    }

    /// `key`'s stored result, reassembled when it is in chunks (`None`
    /// when a chunk is gone).
    pub(super) fn read_result(&self, key: &str) -> Option<Vec<u8>> {
        let stored = self.results.get(key)?;
        let Some(manifest) = Manifest::decode(stored) else {
            return Some(stored.clone());
        };
        let chunks = self.chunks.get(key);
        let mut out = Vec::with_capacity(manifest.total as usize);
        for index in 0..manifest.count {
            let chunk = chunks.and_then(|chunks| chunks.get(&index))?;
            if chunk.len() != manifest.range(index).len() {
                return None;
            }
            out.extend_from_slice(chunk);
        }
        Some(out)
    }

    /// Writes the chunks of `pieces` (`HSET`s, which even a full Redis
    /// takes one by one until it is over its limit: not checked here).
    pub(super) fn write_chunks(&mut self, key: &str, pieces: &[&[u8]]) -> Manifest {
        let manifest = Manifest::of(pieces.iter().map(|piece| piece.len()).sum());
        let chunks = self.chunks.entry(key.to_owned()).or_default();
        for index in 0..manifest.count {
            chunks.insert(index, chunks::chunk(pieces, &manifest, index).into_owned());
        }
        manifest
    }

    /// [`Store::hand_over`](super::Store::hand_over): `stored` (bytes or a
    /// manifest of chunks already written) replaces `record` if it is
    /// still `key`'s result.
    pub(super) fn hand_over(
        &mut self,
        key: &str,
        record: &[u8],
        stored: &[u8],
    ) -> RedisResult<bool> {
        let manifest = Manifest::decode(stored);
        if self.results.get(key).map(Vec::as_slice) != Some(record) {
            if manifest.is_some() {
                self.chunks.remove(key);
            }
            return Ok(false);
        }
        if let Some(manifest) = &manifest {
            if !self.complete(key, manifest) {
                return Err(incomplete());
            }
        }
        self.results.insert(key.to_owned(), stored.to_vec());
        Ok(true)
    }

    /// Whether every chunk a manifest counts is there (the `HLEN` check).
    fn complete(&self, key: &str, manifest: &Manifest) -> bool {
        self.chunks.get(key).map_or(0, HashMap::len) == manifest.count as usize
    }

    /// Deletes `key`'s result and its chunks.
    fn delete_result(&mut self, key: &str) {
        self.results.remove(key);
        self.chunks.remove(key);
    }

    pub(super) fn all_holders(&self) -> Vec<(String, Vec<String>)> {
        self.holders
            .iter()
            .map(|(key, set)| (key.clone(), set.iter().cloned().collect()))
            .collect()
    }

    fn add_holder(&mut self, key: &str, holder: &str) {
        self.holders
            .entry(key.to_owned())
            .or_default()
            .insert(holder.to_owned());
    }

    /// Removes a holder; a set left empty goes (as Redis deletes it).
    fn remove_holder(&mut self, key: &str, holder: &str) {
        if let Some(set) = self.holders.get_mut(key) {
            set.remove(holder);
            if set.is_empty() {
                self.holders.remove(key);
            }
        }
    }

    /// The end of `STORE` and `FINALIZE`: ends a `fire_and_forget` hold,
    /// and drops the result when no holder is left.
    fn settle_stored(&mut self, key: &str) -> Stored {
        self.remove_holder(key, super::FIRE_AND_FORGET);
        if self.is_held(key) {
            Stored::Kept
        } else {
            self.delete_result(key);
            Stored::Dropped
        }
    }

    pub(super) fn apply(&mut self, op: Op) -> RedisResult<Reply> {
        Ok(match op {
            Op::Hold {
                key,
                holder,
                witness,
            } => {
                if let Some(witness) = witness {
                    if !self.holders.get(&key).is_some_and(|s| s.contains(&witness)) {
                        return Ok(Reply::Held(Held::NotTaken));
                    }
                }
                self.may_grow()?;
                self.add_holder(&key, &holder);
                Reply::Held(match self.tag(&key) {
                    Some(tag) => Held::Stored(tag),
                    None => Held::Missing,
                })
            }
            Op::HoldUntilDone { key, holder } => {
                if self.results.contains_key(&key) {
                    return Ok(Reply::Held(Held::NotTaken));
                }
                self.may_grow()?;
                self.add_holder(&key, &holder);
                Reply::Held(Held::Missing)
            }
            Op::Release { key, holder } => {
                self.remove_holder(&key, &holder);
                let freed = !self.is_held(&key);
                if freed {
                    self.delete_result(&key);
                }
                Reply::Released { freed }
            }
            Op::Store { key, stored } => {
                let manifest = Manifest::decode(&stored);
                if !self.is_held(&key) {
                    if manifest.is_some() {
                        self.chunks.remove(&key);
                    }
                    return Ok(Reply::Stored(Stored::Unwanted));
                }
                if manifest.is_some_and(|manifest| !self.complete(&key, &manifest)) {
                    return Err(incomplete());
                }
                self.may_grow()?;
                // An error never replaces a success (see `refs::STORE`).
                let erred = stored.last() == Some(&flotilla_proto::TAG_ERR);
                if !(erred && self.tag(&key) == Some(flotilla_proto::TAG_OK)) {
                    self.results.insert(key.clone(), stored);
                }
                Reply::Stored(self.settle_stored(&key))
            }
            Op::StoreLarge { key, stored } => {
                // The plain `SET`, then `FINALIZE` (refused when the value
                // took the store over its limit; the value stays for the
                // writer to roll back).
                self.may_grow()?;
                self.results.insert(key.clone(), stored);
                self.may_grow()?;
                if !self.is_held(&key) {
                    self.delete_result(&key);
                    return Ok(Reply::Stored(Stored::Unwanted));
                }
                Reply::Stored(self.settle_stored(&key))
            }
            Op::Scatter {
                key,
                holder,
                stored,
            } => {
                if Manifest::decode(&stored).is_some_and(|m| !self.complete(&key, &m)) {
                    return Err(incomplete());
                }
                self.may_grow()?;
                self.add_holder(&key, &holder);
                self.results.insert(key, stored);
                Reply::Done
            }
            Op::RollBack(key) => {
                self.delete_result(&key);
                self.specs.remove(&key);
                Reply::Done
            }
            Op::WriteSpec { key, spec } => {
                self.may_grow()?;
                self.specs.insert(key, spec);
                Reply::Done
            }
            Op::ForgetSpec(key) => {
                self.specs.remove(&key);
                Reply::Done
            }
            Op::SpecExists(key) => Reply::Exists(self.specs.contains_key(&key)),
            Op::ForgetStart(key) => {
                self.starts.remove(&key);
                Reply::Done
            }
            Op::LeaveCustody(keys) => {
                for key in keys {
                    self.custody.remove(&key);
                }
                Reply::Done
            }
        })
    }

    fn live_start(&self, key: &str) -> Option<&(u32, String, Instant)> {
        self.starts
            .get(key)
            .filter(|(_, _, expiry)| *expiry > Instant::now())
    }

    pub(super) fn start_record(&self, key: &str) -> (Option<u32>, Option<String>) {
        match self.live_start(key) {
            Some((n, worker, _)) => (Some(*n), Some(worker.clone())),
            None => (None, None),
        }
    }

    pub(super) fn start_record_ttl(&self, key: &str) -> Option<u64> {
        self.live_start(key)
            .map(|(_, _, expiry)| expiry.saturating_duration_since(Instant::now()).as_secs())
    }

    pub(super) fn record_start(
        &mut self,
        key: &str,
        allowed: u32,
        worker: &str,
    ) -> RedisResult<(bool, u32, String)> {
        let (n, last) = match self.live_start(key) {
            Some((n, last, _)) => (*n, last.clone()),
            None => (0, String::new()),
        };
        if n >= allowed {
            return Ok((false, n, last));
        }
        self.may_grow()?;
        let expiry = Instant::now() + Duration::from_secs(START_RECORD_EXPIRY_S);
        self.starts
            .insert(key.to_owned(), (n + 1, worker.to_owned(), expiry));
        Ok((true, n, worker.to_owned()))
    }

    pub(super) fn renew_custody(&mut self, keys: &[String], lease: Duration) -> RedisResult<()> {
        self.may_grow()?;
        let expiry = now_ms() + lease.as_millis() as u64;
        for key in keys {
            self.custody.insert(key.clone(), expiry);
        }
        Ok(())
    }

    pub(super) fn lapsed_custody(&mut self) -> Vec<String> {
        let now = now_ms();
        let mut due: Vec<(u64, String)> = self
            .custody
            .iter()
            .filter(|(_, expiry)| **expiry <= now)
            .map(|(key, expiry)| (*expiry, key.clone()))
            .collect();
        due.sort();
        due.truncate(1000);
        for (_, key) in &due {
            self.custody.remove(key);
        }
        due.into_iter().map(|(_, key)| key).collect()
    }

    pub(super) fn renew_lease(&mut self, client: &str, expiry_ms: u64) -> RedisResult<bool> {
        self.may_grow()?;
        Ok(self.leases.insert(client.to_owned(), expiry_ms).is_none())
    }

    pub(super) fn lapsed_leases(&self, now_ms: u64, limit: usize) -> Vec<String> {
        let mut lapsed: Vec<(u64, &String)> = self
            .leases
            .iter()
            .filter(|(_, expiry)| **expiry <= now_ms)
            .map(|(id, expiry)| (*expiry, id))
            .collect();
        lapsed.sort();
        lapsed
            .into_iter()
            .take(limit)
            .map(|(_, id)| id.clone())
            .collect()
    }
}
