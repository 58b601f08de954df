//! Opening stored results wherever their bytes are (issue 15): in Redis
//! (whole, or in chunks the [`Store`](crate::store::Store) reassembles), or
//! kept by the worker that made them, behind a
//! [`Location`] record and fetched over that
//! worker's data connection ([`crate::data`]).
//!
//! A [`Reader`] is what the client and the worker read results with: it
//! checks the seal of what Redis holds, follows a location record to its
//! worker, and checks the seal of the fetched value against the key, so a
//! value is accepted only as its maker signed it, whichever way it came.
//! A kept value whose worker cannot be reached (gone, or it freed the
//! value) is [`Opened::Lost`], named with the worker and the address: a
//! clear error for the future or the dependent task, never a hang (every
//! step of a fetch is bounded, see [`DataClientOptions`]).

use crate::data::{DataClient, DataClientOptions, DataError, Keep};
use bytes::Bytes;
use flotilla_proto::{Codec, Location, StoredResult, TaskError};
use std::net::SocketAddr;
use std::sync::Arc;

/// A stored result, opened.
#[derive(Debug)]
pub enum Opened {
    /// The value's bytes (MessagePack of the task's output), possibly
    /// shared with the worker's kept value or the fetched buffer.
    Ok(Bytes),
    /// The task's error.
    Err(TaskError),
    /// Nothing is stored under the key (released, never stored, or lost
    /// with Redis' data).
    Missing,
    /// What is stored did not open: a wrong seal or a malformed record.
    Refused(String),
    /// The value was kept by a worker that could not give it.
    Lost {
        /// Where the value was kept.
        location: Location,
        /// Why the fetch failed.
        cause: String,
    },
}

/// Opens stored results, fetching kept values from their workers. Cheap to
/// clone; clones share the data connections.
#[derive(Debug, Clone)]
pub struct Reader {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    codec: Codec,
    data: DataClient,
    /// This process' own kept values and the address it advertises: a
    /// record naming that address is read from memory, not over a socket.
    local: Option<(String, Keep)>,
}

impl Reader {
    /// A reader checking seals with `codec` and signing its fetches with it.
    pub fn new(codec: Codec) -> Reader {
        Reader::with_options(codec, DataClientOptions::default())
    }

    /// [`Reader::new`] with the data connections' bounds.
    pub fn with_options(codec: Codec, options: DataClientOptions) -> Reader {
        let data = DataClient::new(codec.clone(), options);
        Reader {
            inner: Arc::new(Inner {
                codec,
                data,
                local: None,
            }),
        }
    }

    /// A reader for a process that keeps values itself (a worker), with the
    /// data connections' bounds: records
    /// naming `addr` are read from `keep` without a connection.
    pub fn with_local(
        codec: Codec,
        options: DataClientOptions,
        addr: String,
        keep: Keep,
    ) -> Reader {
        Reader {
            inner: Arc::new(Inner {
                data: DataClient::new(codec.clone(), options),
                codec,
                local: Some((addr, keep)),
            }),
        }
    }

    /// Opens what Redis holds for `key` (`None`: nothing), fetching the
    /// value from its worker when the record says where it is kept.
    pub async fn open(&self, key: &str, stored: Option<Vec<u8>>) -> Opened {
        let keys = [key.to_owned()];
        let mut opened = self.open_all(&keys, vec![stored]).await;
        opened.pop().unwrap_or(Opened::Missing)
    }

    /// [`Reader::open`] for many keys, in order; kept values are fetched
    /// side by side.
    pub async fn open_all(&self, keys: &[String], stored: Vec<Option<Vec<u8>>>) -> Vec<Opened> {
        let mut out: Vec<Option<Opened>> = Vec::with_capacity(keys.len());
        let mut fetches = tokio::task::JoinSet::new();
        for (index, (key, stored)) in keys.iter().zip(stored).enumerate() {
            let Some(stored) = stored else {
                out.push(Some(Opened::Missing));
                continue;
            };
            match self.inner.codec.open_result(key, stored) {
                Ok(StoredResult::Ok(bytes)) => out.push(Some(Opened::Ok(bytes.into()))),
                Ok(StoredResult::Err(error)) => out.push(Some(Opened::Err(error))),
                Ok(StoredResult::Kept(location)) => {
                    out.push(None);
                    let reader = self.clone();
                    let key = key.clone();
                    fetches.spawn(async move { (index, reader.fetch(&key, location).await) });
                }
                Err(error) => out.push(Some(Opened::Refused(error.to_string()))),
            }
        }
        while let Some(done) = fetches.join_next().await {
            match done {
                Ok((index, opened)) => out[index] = Some(opened),
                // A fetch panicked or was cancelled: its slot says so below.
                Err(error) => tracing::warn!(%error, "a value fetch ended abnormally"),
            }
        }
        out.into_iter()
            .map(|opened| {
                opened.unwrap_or_else(|| Opened::Refused("the value fetch ended abnormally".into()))
            })
            .collect()
    }

    /// The kept value of `key` from the worker `location` names, its seal
    /// checked as if it had been read from Redis.
    async fn fetch(&self, key: &str, location: Location) -> Opened {
        if let Some((addr, keep)) = &self.inner.local {
            if *addr == location.addr {
                return match keep.get(key) {
                    Some(bytes) => self.check(key, &location, bytes),
                    None => Opened::Lost {
                        cause: format!("this worker ({addr}) no longer keeps `{key}`"),
                        location,
                    },
                };
            }
        }
        let addr = match resolve(&location.addr).await {
            Ok(addr) => addr,
            Err(cause) => return Opened::Lost { location, cause },
        };
        // The kept bytes are the value, its seal (32 bytes when signed) and
        // the tag: a longer answer is refused before it is read.
        let limit = location.size.saturating_add(64);
        let bytes = match self.inner.data.fetch_within(addr, key, limit).await {
            Ok(bytes) => bytes,
            Err(error @ (DataError::Refused { .. } | DataError::TooLarge { .. })) => {
                return Opened::Refused(error.to_string())
            }
            Err(error) => {
                return Opened::Lost {
                    location,
                    cause: error.to_string(),
                }
            }
        };
        self.check(key, &location, bytes)
    }

    /// Opens a fetched (or this worker's own) kept value: it must be a
    /// value signed for `key`. The value shares `bytes`, uncopied.
    fn check(&self, key: &str, location: &Location, bytes: Bytes) -> Opened {
        match self.inner.codec.check_result_ok(key, &bytes) {
            Ok(len) => Opened::Ok(bytes.slice(..len)),
            Err(flotilla_proto::DecodeError::Version { .. }) => Opened::Refused(format!(
                "worker {} answered `{key}` with something other than a value",
                location.worker
            )),
            Err(error) => Opened::Refused(format!(
                "the value of `{key}` from worker {} was refused: {error}",
                location.worker
            )),
        }
    }
}

/// The socket address of `addr` (`ip:port`, or `host:port` resolved now).
async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = addr.parse() {
        return Ok(addr);
    }
    let lookup = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::lookup_host(addr),
    );
    match lookup.await {
        Ok(Ok(mut found)) => found
            .next()
            .ok_or_else(|| format!("`{addr}` resolves to no address")),
        Ok(Err(error)) => Err(format!("`{addr}` does not resolve: {error}")),
        Err(_) => Err(format!("`{addr}` did not resolve within 5 s")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{CancellationToken, DataServer, Keep};

    fn location(addr: &str, size: u64) -> Location {
        Location {
            worker: "w-1".into(),
            addr: addr.into(),
            size,
        }
    }

    #[tokio::test]
    async fn a_kept_value_is_fetched_and_checked_against_its_key() {
        for secret in [None, Some("s3cret")] {
            let codec = Codec::new(&flotilla_proto::Config {
                namespace: "ns".into(),
                secret: secret.map(flotilla_proto::Secret::new),
                ..flotilla_proto::Config::default()
            });
            let value = vec![5u8; 3 << 20];
            let keep = Keep::new();
            keep.insert("big", codec.result_ok("big", &value));
            // Kept under another key than the one it was signed for.
            keep.insert("swapped", codec.result_ok("other", &value));
            let server = DataServer::bind("127.0.0.1:0", keep, codec.clone(), Default::default())
                .await
                .unwrap();
            let addr = server.local_addr().to_string();
            let shutdown = CancellationToken::new();
            let serving = tokio::spawn(server.serve(shutdown.clone()));
            let reader = Reader::new(codec.clone());
            let record = |key: &str| Some(codec.result_kept(key, &location(&addr, 3 << 20)));
            match reader.open("big", record("big")).await {
                Opened::Ok(bytes) => assert_eq!(bytes, value),
                other => panic!("{other:?}"),
            }
            let keys = ["big".to_owned(), "gone".to_owned(), "none".to_owned()];
            let opened = reader
                .open_all(&keys, vec![record("big"), record("gone"), None])
                .await;
            assert!(matches!(&opened[0], Opened::Ok(bytes) if *bytes == value));
            assert!(
                matches!(&opened[1], Opened::Lost { cause, .. } if cause.contains("does not keep")),
                "{:?}",
                opened[1]
            );
            assert!(matches!(opened[2], Opened::Missing));
            if secret.is_some() {
                assert!(matches!(
                    reader.open("swapped", record("swapped")).await,
                    Opened::Refused(_)
                ));
            }
            // A size smaller than what is kept: refused before reading.
            let short = Some(codec.result_kept("big", &location(&addr, 1 << 20)));
            assert!(matches!(
                reader.open("big", short).await,
                Opened::Refused(_)
            ));
            shutdown.cancel();
            serving.await.unwrap();
        }
    }

    #[tokio::test]
    async fn an_unreachable_holder_is_lost_quickly_and_named() {
        // A port nothing listens on: bound, then closed.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let codec = Codec::plain();
        let reader = Reader::new(codec.clone());
        let started = std::time::Instant::now();
        let record = Some(codec.result_kept("k", &location(&addr, 10)));
        match reader.open("k", record).await {
            Opened::Lost { location, cause } => {
                assert_eq!(location.worker, "w-1");
                assert!(cause.contains(&addr), "{cause}");
            }
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        let bad = Some(codec.result_kept("k", &location("no-such-host.invalid:1", 10)));
        assert!(matches!(reader.open("k", bad).await, Opened::Lost { .. }));
    }
}
