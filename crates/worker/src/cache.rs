//! A worker's cache of large inputs, so that data scattered once and used
//! by many tasks crosses the network to each worker once (the seed's
//! "Scatter Data": "each task uses the same scattered data without
//! re-transfer").
//!
//! A key's stored value never changes once written (task keys name one
//! computation; scattered keys are content hashes or fresh ids), so cached
//! values need no invalidation; the least recently used go when the cache
//! is full.

use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Values smaller than this are not worth caching (they usually ride inline).
pub(crate) const MIN_CACHED: usize = 32 * 1024;

pub(crate) struct InputCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

struct Inner {
    values: HashMap<String, Bytes>,
    order: VecDeque<String>,
    bytes: usize,
}

impl InputCache {
    pub(crate) fn new(capacity: usize) -> Self {
        InputCache {
            inner: Mutex::new(Inner {
                values: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
            }),
            capacity,
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<Bytes> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let value = inner.values.get(key).cloned()?;
        if let Some(position) = inner.order.iter().position(|k| k == key) {
            let key = inner.order.remove(position).unwrap_or_default();
            inner.order.push_back(key);
        }
        Some(value)
    }

    pub(crate) fn insert(&self, key: &str, value: Bytes) {
        if value.len() < MIN_CACHED || value.len() > self.capacity / 4 {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.values.contains_key(key) {
            return;
        }
        inner.bytes += value.len();
        inner.values.insert(key.to_owned(), value);
        inner.order.push_back(key.to_owned());
        while inner.bytes > self.capacity {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if let Some(evicted) = inner.values.remove(&oldest) {
                inner.bytes -= evicted.len();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_go_first() {
        let cache = InputCache::new(4 * MIN_CACHED);
        let value = || Bytes::from(vec![0u8; MIN_CACHED]);
        cache.insert("a", value());
        cache.insert("b", value());
        cache.insert("c", value());
        cache.insert("d", value());
        assert!(cache.get("a").is_some());
        cache.insert("e", value());
        assert!(cache.get("b").is_none(), "b was least recently used");
        assert!(cache.get("a").is_some() && cache.get("e").is_some());
        cache.insert("small", Bytes::from(vec![1]));
        assert!(cache.get("small").is_none(), "small values are not cached");
    }
}
