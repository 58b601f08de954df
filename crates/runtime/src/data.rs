//! The direct data connection: large values kept in the memory of the
//! process that made them, served to readers over plain TCP (issue 15).
//!
//! A [`DataServer`] listens on an address and serves the values of a
//! [`Keep`] (key → [`Bytes`]); a [`DataClient`] fetches them, reusing idle
//! connections per address. The bytes cross one socket each way: the server
//! writes them from the kept buffer (no frame buffer), the client reads them
//! into a buffer allocated once at the announced size.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use flotilla_proto::Codec;
//! use flotilla_runtime::data::{CancellationToken, DataClient, DataServer, Keep};
//!
//! let keep = Keep::new();
//! keep.insert("ns:r:big", vec![7u8; 1 << 20]);
//! let server = DataServer::bind("127.0.0.1:0", keep, Codec::plain(), Default::default()).await?;
//! let addr = server.local_addr();
//! let shutdown = CancellationToken::new();
//! let serving = tokio::spawn(server.serve(shutdown.clone()));
//!
//! let client = DataClient::new(Codec::plain(), Default::default());
//! let value = client.fetch(addr, "ns:r:big").await?;
//! assert_eq!(value.len(), 1 << 20);
//!
//! shutdown.cancel();
//! serving.await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Protocol (versions 1 and 2)
//!
//! A connection carries any number of requests, one after the other (the
//! next request is sent once the previous answer has been read in full).
//!
//! ```text
//! request:  "FLD" | version: u8 (1 or 2) | length: u32 BE | envelope: `length` bytes
//! response: version: u8 (the request's) | status: u8 | length: u64 BE | `length` bytes
//! ```
//!
//! In version 1 the envelope is the key (a MessagePack string); in version
//! 2 it is the key and the reader's shared-memory domain (a MessagePack
//! array of a string and a string or nil; see [`crate::shm`]). Either is
//! written by [`Codec::encode`] with [`Purpose::Data`]: without a secret the plain
//! envelope; with `FLOTILLA_SECRET` a sealed one, which carries the time it
//! was issued, a 16-byte nonce and an HMAC-SHA256 tag over the purpose and
//! all of it, keyed per namespace and checked in constant time (see
//! [`flotilla_proto::seal`]). A server with a secret refuses unsigned,
//! forged, stale and replayed requests; one without a secret refuses sealed
//! ones.
//!
//! Statuses: `0` found (the bytes are the value), `1` not found (no bytes),
//! `2` refused (the bytes are the reason, UTF-8: the request's seal did not
//! check), `3` error (the bytes are the reason: a malformed request, an
//! unknown version, a key over the limit), `4` mapped (version 2 only, to a
//! reader of the server's own domain, for a value in one of the process'
//! shared-memory files: `offset: u64 BE | length: u64 BE | path`, the
//! value being `length` bytes of the file at `path` from `offset`; a reader
//! that cannot map it asks again in version 1). After `2` or `3` the server
//! closes the connection.
//!
//! **Replays and freshness.** A fetch only reads, but a captured request
//! replayed by someone who can reach the port would hand them the value, so
//! the server keeps one [`ReplayGuard`] for all its connections: a request
//! is refused if it was issued further than the replay window
//! (`FLOTILLA_REPLAY_WINDOW_MS`, 5 minutes by default) from the server's
//! clock, or if its nonce was already taken within the window. The guard
//! holds one nonce per request for the window's length; at this path's
//! sizes (values over 1 MiB) that is at most a few hundred thousand nonces.
//!
//! **What the seal does not do.** The value's bytes travel as they are kept:
//! not encrypted, and checked only if the caller keeps sealed bytes (as the
//! Redis path does with [`Codec::result_ok`] and [`Codec::open_result`]).
//!
//! # Bounds
//!
//! The server takes at most [`DataServerOptions::max_connections`]
//! connections at a time: the next one waits in the listen backlog until a
//! connection ends. A connection idle for
//! [`DataServerOptions::idle_timeout`] between requests is closed, as is one
//! whose request takes longer than [`DataServerOptions::request_timeout`] to
//! arrive or whose reader stops taking bytes for
//! [`DataServerOptions::write_timeout`]. Keys are at most
//! [`DataServerOptions::max_key_len`] bytes. On the client, the connect
//! takes at most [`DataClientOptions::connect_timeout`] (2 s), a stalled
//! read at most [`DataClientOptions::read_timeout`], and an announced
//! length over [`DataClientOptions::max_value_len`] is refused before any
//! of the body is read.

use bytes::{Bytes, BytesMut};
use flotilla_proto::{Codec, DecodeError, Purpose, ReplayGuard};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::timeout;
/// The shutdown signal of [`DataServer::serve`] (re-exported from
/// `tokio-util`).
pub use tokio_util::sync::CancellationToken;

/// The first bytes of every request.
const MAGIC: &[u8; 3] = b"FLD";
/// The first bytes of a connection for another protocol, handed over to
/// the server's [`Handover`] (a worker's direct actor calls).
pub const HANDOVER_MAGIC: &[u8; 3] = b"FLA";

/// The version of the direct actor-call protocol a connection opened with
/// [`HANDOVER_MAGIC`] speaks (a worker's; the header's length is that of
/// the worker id that follows, then frames `length: u32 BE | envelope`
/// both ways: sealed calls in, sealed answers out).
pub const DIRECT_CALLS_VERSION: u8 = 1;

/// Reads one frame of a direct call connection (`length: u32 BE | bytes`)
/// into `buf`, which grows only as the bytes arrive; errs at the end of the
/// stream or on a length over `limit`.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    read: &mut R,
    limit: usize,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    let mut length = [0u8; 4];
    read.read_exact(&mut length).await?;
    let length = u32::from_be_bytes(length) as usize;
    if length > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {length} bytes, over the limit of {limit}"),
        ));
    }
    buf.clear();
    let got = (&mut *read).take(length as u64).read_to_end(buf).await?;
    if got < length {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Writes one frame of a direct call connection (see [`read_frame`]).
pub async fn write_frame<W: tokio::io::AsyncWrite + Unpin>(
    write: &mut W,
    bytes: &[u8],
) -> io::Result<()> {
    let length = u32::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a frame over 4 GiB"))?;
    let mut frame = Vec::with_capacity(4 + bytes.len());
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(bytes);
    write.write_all(&frame).await
}

/// Serves a connection that opened with [`HANDOVER_MAGIC`] (its 8-byte
/// header read: magic, version, a length the handler may ignore), for as
/// long as it likes; see [`DataServer::with_handover`].
pub type Handover = Arc<
    dyn Fn(
            TcpStream,
            [u8; REQUEST_HEADER],
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + Sync,
>;
/// The protocol version this build speaks (and the one before it).
pub const DATA_VERSION: u8 = 2;
/// Version 1: a request names a key; the answer is the bytes.
const V1: u8 = 1;
/// Bytes of a request's header: magic, version, envelope length.
pub const REQUEST_HEADER: usize = 3 + 1 + 4;
/// Bytes of a response's header: version, status, length.
const RESPONSE_HEADER: usize = 1 + 1 + 8;
/// An envelope's bytes besides the key (version, time, nonce, tag, the
/// MessagePack headers and a version-2 request's shared-memory domain),
/// with room to spare.
const ENVELOPE_OVERHEAD: usize = 96 + 256;
/// The body is written and read in pieces of this size, each under the
/// write or read timeout: a slow reader is given time per piece, a stalled
/// one is dropped.
const PIECE: usize = 8 << 20;

const FOUND: u8 = 0;
const NOT_FOUND: u8 = 1;
const REFUSED: u8 = 2;
const ERROR: u8 = 3;
const MAPPED: u8 = 4;
/// Not a status on the wire: the connection goes to the [`Handover`].
const HANDED_OVER: u8 = u8::MAX;
/// Bytes of a `MAPPED` answer besides the path: offset and length.
const MAPPED_HEADER: usize = 8 + 8;

/// The values a process serves: key → bytes, shared by the
/// [`DataServer`] and whoever puts values in it. Cheap to clone (one map
/// behind an `Arc`).
#[derive(Debug, Clone, Default)]
pub struct Keep {
    inner: Arc<RwLock<KeepInner>>,
}

#[derive(Debug, Default)]
struct KeepInner {
    values: HashMap<String, Bytes>,
    total: u64,
}

impl Keep {
    /// An empty keep.
    pub fn new() -> Keep {
        Keep::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, KeepInner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, KeepInner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `value` under `key`, returning the value it replaces.
    pub fn insert(&self, key: impl Into<String>, value: impl Into<Bytes>) -> Option<Bytes> {
        let value = value.into();
        let mut inner = self.write();
        inner.total += value.len() as u64;
        let old = inner.values.insert(key.into(), value);
        if let Some(old) = &old {
            inner.total -= old.len() as u64;
        }
        old
    }

    /// Drops the value under `key`, returning it.
    pub fn remove(&self, key: &str) -> Option<Bytes> {
        let mut inner = self.write();
        let old = inner.values.remove(key);
        if let Some(old) = &old {
            inner.total -= old.len() as u64;
        }
        old
    }

    /// The value under `key` (a cheap clone of the kept buffer).
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.read().values.get(key).cloned()
    }

    /// The keys of the kept values.
    pub fn keys(&self) -> Vec<String> {
        self.read().values.keys().cloned().collect()
    }

    /// How many values are kept.
    pub fn len(&self) -> usize {
        self.read().values.len()
    }

    /// Whether no value is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The kept values' total size, in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.read().total
    }
}

/// The bounds of a [`DataServer`] (see the module documentation).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DataServerOptions {
    /// Longest key a request may name, in bytes (default 1,024).
    pub max_key_len: usize,
    /// Connections served at a time (default 512); more wait to be accepted.
    pub max_connections: usize,
    /// How long a connection may wait between requests (default 60 s).
    pub idle_timeout: Duration,
    /// How long a request may take to arrive once it has begun (default 10 s).
    pub request_timeout: Duration,
    /// How long the reader may stop taking the answer's bytes (default 30 s).
    pub write_timeout: Duration,
    /// This host's shared-memory domain ([`crate::shm::domain`]), when the
    /// kept values may be in shared memory: a version-2 request from the
    /// same domain for a value in a segment of this process
    /// ([`crate::shm::locate`]) is answered with the file, not the bytes.
    pub shm_domain: Option<String>,
}

impl Default for DataServerOptions {
    fn default() -> Self {
        DataServerOptions {
            max_key_len: 1024,
            max_connections: 512,
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            shm_domain: None,
        }
    }
}

impl DataServerOptions {
    /// Sets [`DataServerOptions::shm_domain`].
    pub fn shm_domain(mut self, domain: Option<String>) -> Self {
        self.shm_domain = domain;
        self
    }

    /// Sets [`DataServerOptions::max_key_len`].
    pub fn max_key_len(mut self, bytes: usize) -> Self {
        self.max_key_len = bytes;
        self
    }

    /// Sets [`DataServerOptions::max_connections`] (at least 1).
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections.max(1);
        self
    }

    /// Sets [`DataServerOptions::idle_timeout`].
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets [`DataServerOptions::request_timeout`].
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`DataServerOptions::write_timeout`].
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }
}

/// Counts of a [`DataServer`]'s connections, readable while it serves.
/// Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct DataServerCounters {
    inner: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    open: AtomicUsize,
    served: AtomicU64,
    mapped: AtomicU64,
}

impl DataServerCounters {
    /// Connections accepted since the server started.
    pub fn accepted(&self) -> u64 {
        self.inner.accepted.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Relaxed)
    }

    /// Values sent in full since the server started.
    pub fn served(&self) -> u64 {
        self.inner.served.load(Ordering::Relaxed)
    }

    /// Values answered with their shared-memory file since the server
    /// started (readers on the same host; see [`crate::shm`]).
    pub fn mapped(&self) -> u64 {
        self.inner.mapped.load(Ordering::Relaxed)
    }
}

/// Serves the values of a [`Keep`] over TCP (see the module documentation).
#[derive(Debug)]
pub struct DataServer {
    listener: TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    keep: Keep,
    codec: Codec,
    guard: ReplayGuard,
    options: DataServerOptions,
    counters: DataServerCounters,
    handover: Option<Handover>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("keep", &self.keep)
            .field("options", &self.options)
            .field("handover", &self.handover.is_some())
            .finish_non_exhaustive()
    }
}

impl DataServer {
    /// Binds `addr` (port 0 picks a free port; see
    /// [`DataServer::local_addr`]) to serve `keep`, checking requests with
    /// `codec`.
    pub async fn bind(
        addr: impl ToSocketAddrs,
        keep: Keep,
        codec: Codec,
        options: DataServerOptions,
    ) -> io::Result<DataServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        Ok(DataServer {
            listener,
            addr,
            shared: Arc::new(Shared {
                keep,
                codec,
                guard: ReplayGuard::new(),
                options,
                counters: DataServerCounters::default(),
                handover: None,
            }),
        })
    }

    /// Hands every connection that opens with [`HANDOVER_MAGIC`] to
    /// `handover` instead of serving it (within the same bound on
    /// connections, and closed on shutdown like the others). Call before
    /// [`DataServer::serve`].
    pub fn with_handover(mut self, handover: Handover) -> DataServer {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.handover = Some(handover);
        }
        self
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's connection counts.
    pub fn counters(&self) -> DataServerCounters {
        self.shared.counters.clone()
    }

    /// Serves until `shutdown` is cancelled, then closes the listener and
    /// every connection (an answer being written is cut off) and returns
    /// once their tasks have ended.
    pub async fn serve(self, shutdown: CancellationToken) {
        let limit = Arc::new(Semaphore::new(self.shared.options.max_connections));
        let mut connections = JoinSet::new();
        loop {
            // A permit first: past the limit, connections wait in the
            // listen backlog rather than being taken and then turned away.
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = limit.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            };
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
                // Reap finished connection tasks while waiting.
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors and the like: wait a little
                    // rather than spin.
                    tracing::warn!(%error, "data server: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let counters = &self.shared.counters.inner;
            counters.accepted.fetch_add(1, Ordering::Relaxed);
            counters.open.fetch_add(1, Ordering::Relaxed);
            let shared = self.shared.clone();
            let shutdown = shutdown.clone();
            connections.spawn(async move {
                let _permit = permit;
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    result = serve_connection(stream, &shared) => {
                        if let Err(error) = result {
                            tracing::debug!(%peer, %error, "data connection ended");
                        }
                    }
                }
                shared.counters.inner.open.fetch_sub(1, Ordering::Relaxed);
            });
        }
        drop(self.listener);
        while connections.join_next().await.is_some() {}
    }
}

/// How a connection ended when it did not end cleanly.
#[derive(Debug, thiserror::Error)]
enum ConnectionEnd {
    #[error("idle for longer than the idle timeout")]
    Idle,
    #[error("the request took longer than the request timeout")]
    SlowRequest,
    #[error("the reader stopped taking bytes")]
    SlowReader,
    #[error("refused a request: {0}")]
    Refused(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

async fn serve_connection(mut stream: TcpStream, shared: &Shared) -> Result<(), ConnectionEnd> {
    stream.set_nodelay(true)?;
    let options = &shared.options;
    let max_envelope = options.max_key_len + ENVELOPE_OVERHEAD;
    let mut envelope = Vec::with_capacity(256);
    loop {
        let mut header = [0u8; REQUEST_HEADER];
        // Between requests: the idle timeout, until the first byte.
        match timeout(options.idle_timeout, stream.read(&mut header[..1])).await {
            Err(_) => return Err(ConnectionEnd::Idle),
            Ok(Ok(0)) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return Err(error.into()),
        }
        let request = async {
            stream.read_exact(&mut header[1..]).await?;
            if &header[..3] == HANDOVER_MAGIC && shared.handover.is_some() {
                return Ok(Err((HANDED_OVER, String::new())));
            }
            if &header[..3] != MAGIC {
                return Ok(Err((ERROR, "not a Flotilla data request".to_owned())));
            }
            if header[3] != V1 && header[3] != DATA_VERSION {
                return Ok(Err((
                    ERROR,
                    format!(
                        "data protocol version {} is not spoken here (this server speaks {V1} and {DATA_VERSION})",
                        header[3]
                    ),
                )));
            }
            let length = u32::from_be_bytes(header[4..].try_into().expect("4 bytes")) as usize;
            if length > max_envelope {
                return Ok(Err((
                    ERROR,
                    format!(
                        "a request of {length} bytes is over the limit for keys of {} bytes",
                        options.max_key_len
                    ),
                )));
            }
            envelope.resize(length, 0);
            stream.read_exact(&mut envelope).await?;
            Ok::<_, io::Error>(Ok(()))
        };
        let request = match timeout(options.request_timeout, request).await {
            Err(_) => return Err(ConnectionEnd::SlowRequest),
            Ok(result) => result?,
        };
        if let (Some(handover), Err((HANDED_OVER, _))) = (&shared.handover, &request) {
            handover(stream, header).await;
            return Ok(());
        }
        // Answered in the request's version (the newest for a request in
        // none this server speaks).
        let version = if header[3] == V1 { V1 } else { DATA_VERSION };
        let key = request.and_then(|()| {
            let opened = if version == V1 {
                let key = shared.codec.open::<String>(
                    Purpose::Data,
                    &envelope,
                    false,
                    &shared.guard,
                    max_envelope,
                );
                key.map(|key| (key, None))
            } else {
                shared.codec.open::<(String, Option<String>)>(
                    Purpose::Data,
                    &envelope,
                    false,
                    &shared.guard,
                    max_envelope,
                )
            };
            opened
                .map_err(|error| match error {
                    DecodeError::Seal(seal) => (REFUSED, seal.to_string()),
                    other => (ERROR, other.to_string()),
                })
                .and_then(|(key, domain)| {
                    if key.len() > options.max_key_len {
                        Err((
                            ERROR,
                            format!("the key is over {} bytes", options.max_key_len),
                        ))
                    } else {
                        Ok((key, domain))
                    }
                })
        });
        let (key, domain) = match key {
            Ok(key) => key,
            Err((status, reason)) => {
                refuse(&mut stream, version, status, &reason, options.write_timeout).await;
                return Err(ConnectionEnd::Refused(reason));
            }
        };
        let value = shared.keep.get(&key);
        // Same host: the file, if the value is in a segment of ours.
        let mapped = value.as_ref().and_then(|value| {
            let same = domain.is_some() && domain == options.shm_domain;
            same.then(|| crate::shm::locate(value)).flatten()
        });
        match (value, mapped) {
            (None, _) => {
                write_timed(
                    &mut stream,
                    &response_header(version, NOT_FOUND, 0),
                    options.write_timeout,
                )
                .await?;
            }
            (Some(value), Some((path, offset))) => {
                use std::os::unix::ffi::OsStrExt;
                let path = path.as_os_str().as_bytes();
                let mut answer = Vec::with_capacity(RESPONSE_HEADER + MAPPED_HEADER + path.len());
                answer.extend_from_slice(&response_header(
                    version,
                    MAPPED,
                    (MAPPED_HEADER + path.len()) as u64,
                ));
                answer.extend_from_slice(&offset.to_be_bytes());
                answer.extend_from_slice(&(value.len() as u64).to_be_bytes());
                answer.extend_from_slice(path);
                write_timed(&mut stream, &answer, options.write_timeout).await?;
                shared.counters.inner.mapped.fetch_add(1, Ordering::Relaxed);
            }
            (Some(value), None) => {
                write_timed(
                    &mut stream,
                    &response_header(version, FOUND, value.len() as u64),
                    options.write_timeout,
                )
                .await?;
                // Straight from the kept buffer: no copy into a frame.
                for piece in value.chunks(PIECE) {
                    write_timed(&mut stream, piece, options.write_timeout).await?;
                }
                shared.counters.inner.served.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn response_header(version: u8, status: u8, length: u64) -> [u8; RESPONSE_HEADER] {
    let mut header = [0u8; RESPONSE_HEADER];
    header[0] = version;
    header[1] = status;
    header[2..].copy_from_slice(&length.to_be_bytes());
    header
}

async fn write_timed(stream: &mut TcpStream, bytes: &[u8], limit: Duration) -> io::Result<()> {
    match timeout(limit, stream.write_all(bytes)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            ConnectionEnd::SlowReader.to_string(),
        )),
    }
}

/// Answers a refused or malformed request, then lets the reader take the
/// answer before the connection closes: closing with unread request bytes
/// would reset the connection and could discard the answer on its way.
async fn refuse(stream: &mut TcpStream, version: u8, status: u8, reason: &str, limit: Duration) {
    let mut answer = response_header(version, status, reason.len() as u64).to_vec();
    answer.extend_from_slice(reason.as_bytes());
    if write_timed(stream, &answer, limit).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut left = 1usize << 20;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = timeout(Duration::from_secs(1), drain).await;
}

/// Why a [`DataClient::fetch`] failed. Each names the address and the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// No connection could be made (refused, unreachable, or over the
    /// connect timeout): the holder may be gone.
    #[error("data server {addr} is unreachable for `{key}`: {source}")]
    Unreachable {
        /// The server's address.
        addr: SocketAddr,
        /// The key asked for.
        key: String,
        /// What connecting reported.
        source: io::Error,
    },
    /// The server does not keep the key (it was freed, or moved).
    #[error("data server {addr} does not keep `{key}`")]
    NotFound {
        /// The server's address.
        addr: SocketAddr,
        /// The key asked for.
        key: String,
    },
    /// The server refused the request: its seal did not check (a
    /// different secret or namespace, unsigned, stale or replayed), or the
    /// request was malformed.
    #[error("data server {addr} refused the request for `{key}`: {reason}")]
    Refused {
        /// The server's address.
        addr: SocketAddr,
        /// The key asked for.
        key: String,
        /// The server's reason.
        reason: String,
    },
    /// The connection ended before the whole answer arrived.
    #[error("data server {addr} sent {got} of {expected} bytes for `{key}`, then {cause}")]
    Truncated {
        /// The server's address.
        addr: SocketAddr,
        /// The key asked for.
        key: String,
        /// Bytes received.
        got: u64,
        /// Bytes announced.
        expected: u64,
        /// How the connection ended.
        cause: io::Error,
    },
    /// The server stopped answering for longer than the client's timeout.
    #[error("data server {addr} sent nothing for {after:?} while {during} `{key}`")]
    Timeout {
        /// The server's address.
        addr: SocketAddr,
        /// The key asked for.
        key: String,
        /// What the client was doing.
        during: &'static str,
        /// The timeout.
        after: Duration,
    },
    /// The announced value is larger than the client takes; nothing of it
    /// was read.
    #[error(
        "data server {addr} announced {size} bytes for `{key}`, over the client's limit of {limit}"
    )]
    TooLarge {
        /// The server's address.
        addr: SocketAddr,
        /// The key asked for.
        key: String,
        /// Bytes announced.
        size: u64,
        /// The client's limit.
        limit: u64,
    },
    /// The server's answer does not follow the protocol.
    #[error("data server {addr} answered `{key}` outside the protocol: {detail}")]
    Protocol {
        /// The server's address.
        addr: SocketAddr,
        /// The key asked for.
        key: String,
        /// What was wrong.
        detail: String,
    },
}

/// The bounds of a [`DataClient`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DataClientOptions {
    /// How long connecting may take (default 2 s).
    pub connect_timeout: Duration,
    /// How long the server may send nothing while an answer is due
    /// (default 30 s).
    pub read_timeout: Duration,
    /// Largest value taken, in bytes (default: no limit); a larger
    /// announced length is refused before reading it.
    pub max_value_len: u64,
    /// Idle connections kept per address for reuse (default 4).
    pub max_idle_per_addr: usize,
    /// This host's shared-memory domain ([`crate::shm::domain`]; default
    /// none): when set, requests say it, and a server on the same host
    /// answers with the file of a value in shared memory, which is mapped
    /// instead of read (see [`crate::shm`]).
    pub shm_domain: Option<String>,
}

impl Default for DataClientOptions {
    fn default() -> Self {
        DataClientOptions {
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(30),
            max_value_len: u64::MAX,
            max_idle_per_addr: 4,
            shm_domain: None,
        }
    }
}

impl DataClientOptions {
    /// Sets [`DataClientOptions::connect_timeout`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`DataClientOptions::read_timeout`].
    pub fn read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout;
        self
    }

    /// Sets [`DataClientOptions::max_value_len`].
    pub fn max_value_len(mut self, bytes: u64) -> Self {
        self.max_value_len = bytes;
        self
    }

    /// Sets [`DataClientOptions::max_idle_per_addr`].
    pub fn max_idle_per_addr(mut self, connections: usize) -> Self {
        self.max_idle_per_addr = connections;
        self
    }

    /// Sets [`DataClientOptions::shm_domain`].
    pub fn shm_domain(mut self, domain: Option<String>) -> Self {
        self.shm_domain = domain;
        self
    }

    /// The defaults, with the shared-memory domain of `config`'s
    /// [`Config::shm_dir`](flotilla_proto::Config::shm_dir) (none when it
    /// is off or not a directory here).
    pub fn for_config(config: &flotilla_proto::Config) -> Self {
        let domain = config.shm_dir.as_deref().and_then(crate::shm::domain);
        DataClientOptions::default().shm_domain(domain)
    }
}

/// Fetches values from [`DataServer`]s, keeping a few idle connections per
/// address for the next fetch. Cheap to clone; clones share the pool.
#[derive(Debug, Clone)]
pub struct DataClient {
    inner: Arc<ClientInner>,
}

#[derive(Debug)]
struct ClientInner {
    codec: Codec,
    options: DataClientOptions,
    idle: Mutex<HashMap<SocketAddr, Vec<TcpStream>>>,
}

/// A fetch's failure, with whether the connection may have been closed by
/// the server while idle in the pool (nothing of the answer arrived).
struct Failed {
    error: DataError,
    before_answer: bool,
}

impl DataClient {
    /// A client signing its requests with `codec` (when it has a secret).
    pub fn new(codec: Codec, options: DataClientOptions) -> DataClient {
        DataClient {
            inner: Arc::new(ClientInner {
                codec,
                options,
                idle: Mutex::default(),
            }),
        }
    }

    /// The value `addr` keeps under `key`.
    ///
    /// Reuses an idle connection to `addr` when there is one; if that
    /// connection turns out to have been closed by the server before any
    /// answer arrived, the request is sent again once on a new connection.
    pub async fn fetch(&self, addr: SocketAddr, key: &str) -> Result<Bytes, DataError> {
        self.fetch_within(addr, key, self.inner.options.max_value_len)
            .await
    }

    /// [`DataClient::fetch`], refusing (before reading it) a value larger
    /// than `limit` or than [`DataClientOptions::max_value_len`]: a reader
    /// that knows the value's size does not let a wrong answer make it
    /// allocate more.
    pub async fn fetch_within(
        &self,
        addr: SocketAddr,
        key: &str,
        limit: u64,
    ) -> Result<Bytes, DataError> {
        let limit = limit.min(self.inner.options.max_value_len);
        let domain = self.inner.options.shm_domain.as_deref();
        if let Some(stream) = self.take_idle(addr) {
            match self.request(stream, addr, key, limit, domain).await {
                Ok(value) => return Ok(value),
                Err(Failed {
                    before_answer: true,
                    ..
                }) => {}
                Err(failed) => return Err(failed.error),
            }
        }
        let stream = self.connect(addr, key).await?;
        self.request(stream, addr, key, limit, domain)
            .await
            .map_err(|failed| failed.error)
    }

    /// How many idle connections to `addr` the pool holds.
    pub fn idle_connections(&self, addr: SocketAddr) -> usize {
        self.pool().get(&addr).map_or(0, Vec::len)
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Vec<TcpStream>>> {
        self.inner.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<TcpStream> {
        self.pool().get_mut(&addr)?.pop()
    }

    fn put_idle(&self, addr: SocketAddr, stream: TcpStream) {
        let mut pool = self.pool();
        let idle = pool.entry(addr).or_default();
        if idle.len() < self.inner.options.max_idle_per_addr {
            idle.push(stream);
        }
    }

    async fn connect(&self, addr: SocketAddr, key: &str) -> Result<TcpStream, DataError> {
        let unreachable = |source| DataError::Unreachable {
            addr,
            key: key.to_owned(),
            source,
        };
        let limit = self.inner.options.connect_timeout;
        let stream = match timeout(limit, TcpStream::connect(addr)).await {
            Err(_) => {
                return Err(unreachable(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {limit:?}"),
                )))
            }
            Ok(result) => result.map_err(unreachable)?,
        };
        stream.set_nodelay(true).map_err(unreachable)?;
        Ok(stream)
    }

    /// One request on `stream`: version 2 with this host's shared-memory
    /// `domain` when there is one (a `MAPPED` answer is mapped, or, if that
    /// fails, asked again in version 1), else version 1.
    async fn request(
        &self,
        mut stream: TcpStream,
        addr: SocketAddr,
        key: &str,
        max_value_len: u64,
        domain: Option<&str>,
    ) -> Result<Bytes, Failed> {
        let options = &self.inner.options;
        let fail = |error, before_answer| Failed {
            error,
            before_answer,
        };
        let timed_out = |during| DataError::Timeout {
            addr,
            key: key.to_owned(),
            during,
            after: options.read_timeout,
        };
        let truncated = |got, expected, cause| DataError::Truncated {
            addr,
            key: key.to_owned(),
            got,
            expected,
            cause,
        };
        let frame = request_frame(&self.inner.codec, key, domain);
        let version = if domain.is_some() { DATA_VERSION } else { V1 };
        match timeout(options.read_timeout, stream.write_all(&frame)).await {
            Err(_) => return Err(fail(timed_out("sending the request for"), false)),
            Ok(Err(error)) => {
                return Err(fail(
                    DataError::Unreachable {
                        addr,
                        key: key.to_owned(),
                        source: error,
                    },
                    true,
                ))
            }
            Ok(Ok(())) => {}
        }
        let mut header = [0u8; RESPONSE_HEADER];
        let mut got = 0;
        while got < RESPONSE_HEADER {
            match timeout(options.read_timeout, stream.read(&mut header[got..])).await {
                Err(_) => return Err(fail(timed_out("awaiting the answer for"), false)),
                Ok(Ok(0)) => {
                    let cause = io::Error::new(io::ErrorKind::UnexpectedEof, "closed");
                    return Err(fail(
                        truncated(got as u64, RESPONSE_HEADER as u64, cause),
                        got == 0,
                    ));
                }
                Ok(Ok(n)) => got += n,
                Ok(Err(error)) => {
                    return Err(fail(
                        truncated(got as u64, RESPONSE_HEADER as u64, error),
                        got == 0,
                    ))
                }
            }
        }
        let protocol = |detail: String| {
            fail(
                DataError::Protocol {
                    addr,
                    key: key.to_owned(),
                    detail,
                },
                false,
            )
        };
        if header[0] != version {
            return Err(protocol(format!(
                "answer in protocol version {} to a request in version {version}",
                header[0]
            )));
        }
        let status = header[1];
        let length = u64::from_be_bytes(header[2..].try_into().expect("8 bytes"));
        let limit = match status {
            FOUND => max_value_len,
            NOT_FOUND => 0,
            // Offset, length and a path.
            MAPPED if domain.is_some() => (MAPPED_HEADER + 4096) as u64,
            // A reason: short text.
            REFUSED | ERROR => 64 << 10,
            other => return Err(protocol(format!("unknown status {other}"))),
        };
        if length > limit {
            return Err(match status {
                FOUND => fail(
                    DataError::TooLarge {
                        addr,
                        key: key.to_owned(),
                        size: length,
                        limit,
                    },
                    false,
                ),
                _ => protocol(format!("status {status} with {length} bytes")),
            });
        }
        let Ok(expected) = usize::try_from(length) else {
            return Err(protocol(format!("{length} bytes do not fit in memory")));
        };
        // Allocated once at the announced size, filled by the socket
        // without zeroing first: one copy, no growth.
        let mut body = BytesMut::with_capacity(expected);
        while body.len() < expected {
            let left = (expected - body.len()) as u64;
            let mut piece = (&mut stream).take(left.min(PIECE as u64));
            match timeout(options.read_timeout, piece.read_buf(&mut body)).await {
                Err(_) => return Err(fail(timed_out("reading the value of"), false)),
                Ok(Ok(0)) => {
                    let cause = io::Error::new(io::ErrorKind::UnexpectedEof, "closed");
                    return Err(fail(truncated(body.len() as u64, length, cause), false));
                }
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    return Err(fail(truncated(body.len() as u64, length, error), false))
                }
            }
        }
        match status {
            FOUND => {
                self.put_idle(addr, stream);
                Ok(body.freeze())
            }
            NOT_FOUND => {
                self.put_idle(addr, stream);
                Err(fail(
                    DataError::NotFound {
                        addr,
                        key: key.to_owned(),
                    },
                    false,
                ))
            }
            MAPPED => {
                use std::os::unix::ffi::OsStringExt;
                if body.len() < MAPPED_HEADER {
                    return Err(protocol(format!("a mapped answer of {} bytes", body.len())));
                }
                let offset = u64::from_be_bytes(body[..8].try_into().expect("8 bytes"));
                let len = u64::from_be_bytes(body[8..16].try_into().expect("8 bytes"));
                if len > max_value_len {
                    return Err(fail(
                        DataError::TooLarge {
                            addr,
                            key: key.to_owned(),
                            size: len,
                            limit: max_value_len,
                        },
                        false,
                    ));
                }
                let path =
                    std::path::PathBuf::from(std::ffi::OsString::from_vec(body[16..].to_vec()));
                let mapping = {
                    let path = path.clone();
                    tokio::task::spawn_blocking(move || crate::shm::map(&path, offset, len)).await
                };
                match mapping {
                    Ok(Ok(value)) => {
                        self.put_idle(addr, stream);
                        Ok(value)
                    }
                    failed => {
                        // Gone in between, or not ours to open: the bytes,
                        // over this connection.
                        let error = match failed {
                            Ok(Err(error)) => error.to_string(),
                            _ => "the mapping task failed".to_owned(),
                        };
                        tracing::debug!(%addr, key, path = %path.display(), %error, "could not map a value: fetching its bytes");
                        Box::pin(self.request(stream, addr, key, max_value_len, None)).await
                    }
                }
            }
            _ => Err(fail(
                DataError::Refused {
                    addr,
                    key: key.to_owned(),
                    reason: String::from_utf8_lossy(&body).into_owned(),
                },
                false,
            )),
        }
    }
}

/// A request for `key`, sealed by `codec` when it has a secret: version 2
/// with the reader's shared-memory `domain` when it has one, else 1.
fn request_frame(codec: &Codec, key: &str, domain: Option<&str>) -> Vec<u8> {
    let (version, envelope) = match domain {
        Some(domain) => (
            DATA_VERSION,
            codec.encode(Purpose::Data, &(key, Some(domain))),
        ),
        None => (V1, codec.encode(Purpose::Data, key)),
    };
    let mut frame = Vec::with_capacity(REQUEST_HEADER + envelope.len());
    frame.extend_from_slice(MAGIC);
    frame.push(version);
    frame.extend_from_slice(&(envelope.len() as u32).to_be_bytes());
    frame.extend_from_slice(&envelope);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::{Config, Secret};
    use std::time::Instant;

    fn sealed(secret: &str, window_ms: u64) -> Codec {
        Codec::new(&Config {
            namespace: "t-data".into(),
            secret: Some(Secret::new(secret)),
            replay_window_ms: window_ms,
            ..Config::default()
        })
    }

    /// A value of `len` bytes in which no run of bytes repeats at a
    /// power-of-two distance, so a misplaced piece would show.
    fn value(len: usize, seed: u64) -> Bytes {
        let block_len = (1 << 20) + 7;
        let mut state = seed | 1;
        let block: Vec<u8> = (0..block_len.min(len))
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let take = block.len().min(len - out.len());
            out.extend_from_slice(&block[..take]);
        }
        Bytes::from(out)
    }

    struct Running {
        addr: SocketAddr,
        keep: Keep,
        counters: DataServerCounters,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Running {
        async fn stop(self) {
            self.shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .expect("the server stops on shutdown")
                .unwrap();
        }
    }

    async fn serve(codec: Codec, options: DataServerOptions) -> Running {
        let keep = Keep::new();
        let server = DataServer::bind("127.0.0.1:0", keep.clone(), codec, options)
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        Running {
            addr: server.local_addr(),
            keep,
            counters: server.counters(),
            task: tokio::spawn(server.serve(shutdown.clone())),
            shutdown,
        }
    }

    fn client(codec: Codec) -> DataClient {
        DataClient::new(codec, DataClientOptions::default())
    }

    /// Sends `frame` on a new connection and returns the status and bytes
    /// of the answer.
    async fn raw(addr: SocketAddr, frame: &[u8]) -> (u8, Vec<u8>) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(frame).await.unwrap();
        let mut header = [0u8; RESPONSE_HEADER];
        stream.read_exact(&mut header).await.unwrap();
        let length = u64::from_be_bytes(header[2..].try_into().unwrap());
        let mut body = vec![0; length as usize];
        stream.read_exact(&mut body).await.unwrap();
        (header[1], body)
    }

    #[test]
    fn the_keep_counts_its_values() {
        let keep = Keep::new();
        assert!(keep.is_empty());
        assert!(keep.insert("a", vec![0u8; 10]).is_none());
        assert_eq!(keep.insert("a", vec![0u8; 4]).map(|b| b.len()), Some(10));
        keep.insert("b", Bytes::from_static(b"xyz"));
        assert_eq!((keep.len(), keep.total_bytes()), (2, 7));
        let shared = keep.clone();
        assert_eq!(shared.remove("a").map(|b| b.len()), Some(4));
        assert!(shared.remove("a").is_none());
        assert_eq!((keep.len(), keep.total_bytes()), (1, 3));
        assert_eq!(keep.get("b").as_deref(), Some(&b"xyz"[..]));
    }

    #[tokio::test]
    async fn small_and_large_values_round_trip_byte_exact() {
        let server = serve(sealed("s3cret", 60_000), DataServerOptions::default()).await;
        let client = client(sealed("s3cret", 60_000));
        for (key, len) in [
            ("empty", 0),
            ("one", 1),
            ("small", 1000),
            ("100mb", 100_000_000),
        ] {
            let value = value(len, len as u64);
            server.keep.insert(key, value.clone());
            let back = client.fetch(server.addr, key).await.unwrap();
            assert_eq!(back.len(), len, "{key}");
            assert!(back == value, "{key} came back different");
        }
        // All on one connection.
        assert_eq!(server.counters.accepted(), 1);
        assert_eq!(server.counters.served(), 4);
        server.stop().await;
    }

    #[tokio::test]
    async fn a_reader_on_the_same_host_maps_a_value_in_shared_memory() {
        use flotilla_proto::LargeBuffer;
        let root = crate::shm::tests::root();
        let shm = crate::shm::Shm::at(root.path()).unwrap();
        let domain = shm.domain().to_owned();
        let codec = sealed("s3cret", 60_000);
        let server = serve(
            codec.clone(),
            DataServerOptions::default().shm_domain(Some(domain.clone())),
        )
        .await;
        let made = value(5 << 20, 3);
        let mut buffer = Box::new(shm.alloc(made.len() + 40).unwrap());
        buffer.as_mut_slice()[..made.len()].copy_from_slice(&made);
        let kept = buffer.freeze(made.len());
        server.keep.insert("big", kept.clone());
        server.keep.insert("heap", made.clone());

        let same = DataClient::new(
            codec.clone(),
            DataClientOptions::default().shm_domain(Some(domain.clone())),
        );
        let mapped = same.fetch(server.addr, "big").await.unwrap();
        assert!(mapped == made);
        assert!(
            !mapped.as_ptr_range().contains(&kept.as_ptr()),
            "a mapping of its own"
        );
        assert_eq!((server.counters.mapped(), server.counters.served()), (1, 0));
        // A value on the heap is sent, whatever the reader's domain.
        assert!(same.fetch(server.addr, "heap").await.unwrap() == made);
        assert_eq!((server.counters.mapped(), server.counters.served()), (1, 1));
        // Another domain, or none: the bytes.
        for other in [Some("elsewhere".to_owned()), None] {
            let reader = DataClient::new(
                codec.clone(),
                DataClientOptions::default().shm_domain(other),
            );
            assert!(reader.fetch(server.addr, "big").await.unwrap() == made);
        }
        assert_eq!((server.counters.mapped(), server.counters.served()), (1, 3));
        // The file gone under a kept value: the reader asks for the bytes.
        let (path, _) = crate::shm::locate(&kept).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(same.fetch(server.addr, "big").await.unwrap() == made);
        assert_eq!((server.counters.mapped(), server.counters.served()), (2, 4));
        assert_eq!(
            server.counters.accepted(),
            3,
            "the fallback on the same connection"
        );
        // The mapping outlives the worker's value and its file.
        server.keep.remove("big");
        drop(kept);
        assert!(mapped == made);
        server.stop().await;
    }

    #[tokio::test]
    async fn frames_round_trip_and_a_long_or_cut_one_is_refused() {
        let mut wire = Vec::new();
        write_frame(&mut wire, b"hello").await.unwrap();
        write_frame(&mut wire, b"").await.unwrap();
        let mut read = &wire[..];
        let mut buf = Vec::new();
        read_frame(&mut read, 5, &mut buf).await.unwrap();
        assert_eq!(buf, b"hello");
        read_frame(&mut read, 5, &mut buf).await.unwrap();
        assert!(buf.is_empty());
        let end = read_frame(&mut read, 5, &mut buf).await.unwrap_err();
        assert_eq!(end.kind(), io::ErrorKind::UnexpectedEof);
        let long = read_frame(&mut &wire[..], 4, &mut buf).await.unwrap_err();
        assert_eq!(long.kind(), io::ErrorKind::InvalidData);
        let cut = read_frame(&mut &wire[..7], 5, &mut buf).await.unwrap_err();
        assert_eq!(cut.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_256_mb_value_round_trips() {
        let server = serve(Codec::plain(), DataServerOptions::default()).await;
        let value = value(256 << 20, 9);
        server.keep.insert("big", value.clone());
        let back = client(Codec::plain())
            .fetch(server.addr, "big")
            .await
            .unwrap();
        assert!(back == value);
        server.stop().await;
    }

    #[tokio::test]
    async fn a_missing_key_is_not_found_and_the_connection_stays() {
        let server = serve(Codec::plain(), DataServerOptions::default()).await;
        let client = client(Codec::plain());
        let error = client.fetch(server.addr, "ns:r:gone").await.unwrap_err();
        assert!(
            matches!(&error, DataError::NotFound { key, addr } if key == "ns:r:gone" && *addr == server.addr),
            "{error}"
        );
        let message = error.to_string();
        assert!(message.contains(&server.addr.to_string()) && message.contains("ns:r:gone"));
        server.keep.insert("ns:r:here", Bytes::from_static(b"v"));
        assert_eq!(
            &client.fetch(server.addr, "ns:r:here").await.unwrap()[..],
            b"v"
        );
        assert_eq!(server.counters.accepted(), 1);
        server.stop().await;
    }

    #[tokio::test]
    async fn wrong_or_missing_signatures_are_refused() {
        let server = serve(sealed("s3cret", 60_000), DataServerOptions::default()).await;
        server.keep.insert("k", Bytes::from_static(b"secret value"));
        for (codec, what) in [
            (sealed("guess", 60_000), "forged"),
            (Codec::plain(), "unsigned"),
        ] {
            let error = client(codec).fetch(server.addr, "k").await.unwrap_err();
            match &error {
                DataError::Refused { reason, key, .. } => {
                    assert_eq!(key, "k");
                    assert!(reason.contains(what), "{what}: {reason}");
                }
                other => panic!("{what}: {other}"),
            }
        }
        // A sealed request to a server without a secret is refused too.
        let plain = serve(Codec::plain(), DataServerOptions::default()).await;
        plain.keep.insert("k", Bytes::from_static(b"v"));
        let error = client(sealed("s3cret", 60_000))
            .fetch(plain.addr, "k")
            .await
            .unwrap_err();
        assert!(matches!(error, DataError::Refused { .. }), "{error}");
        // A tag made for another purpose does not open a data request.
        let codec = sealed("s3cret", 60_000);
        let envelope = codec.encode(Purpose::Spec, "k");
        let mut frame = request_frame(&codec, "k", None);
        frame.truncate(REQUEST_HEADER - 4);
        frame.extend_from_slice(&(envelope.len() as u32).to_be_bytes());
        frame.extend_from_slice(&envelope);
        let (status, reason) = raw(server.addr, &frame).await;
        assert_eq!(status, REFUSED, "{reason:?}");
        // The right secret is served.
        let ours = client(sealed("s3cret", 60_000));
        assert_eq!(
            &ours.fetch(server.addr, "k").await.unwrap()[..],
            b"secret value"
        );
        server.stop().await;
        plain.stop().await;
    }

    #[tokio::test]
    async fn replayed_and_expired_requests_are_refused() {
        let codec = sealed("s3cret", 1000);
        let server = serve(codec.clone(), DataServerOptions::default()).await;
        server.keep.insert("k", Bytes::from_static(b"v"));
        let frame = request_frame(&codec, "k", None);
        assert_eq!(raw(server.addr, &frame).await, (FOUND, b"v".to_vec()));
        let (status, reason) = raw(server.addr, &frame).await;
        assert_eq!(status, REFUSED);
        assert!(
            String::from_utf8_lossy(&reason).contains("replay"),
            "{reason:?}"
        );
        let late = request_frame(&codec, "k", None);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (status, reason) = raw(server.addr, &late).await;
        assert_eq!(status, REFUSED);
        assert!(
            String::from_utf8_lossy(&reason).contains("window"),
            "{reason:?}"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn malformed_requests_get_an_error_answer() {
        let server = serve(Codec::plain(), DataServerOptions::default().max_key_len(16)).await;
        let (status, _) = raw(server.addr, b"GET / HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, ERROR);
        let mut frame = request_frame(&Codec::plain(), "k", None);
        frame[3] = 9;
        let (status, reason) = raw(server.addr, &frame).await;
        assert_eq!(status, ERROR);
        assert!(String::from_utf8_lossy(&reason).contains("version 9"));
        let error = client(Codec::plain())
            .fetch(server.addr, &"x".repeat(200))
            .await
            .unwrap_err();
        assert!(matches!(error, DataError::Refused { .. }), "{error}");
        server.stop().await;
    }

    /// A hand-written server that answers the first request with `header`
    /// and `body`, then closes.
    async fn one_answer(status: u8, announced: u64, body: Vec<u8>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut header = [0u8; REQUEST_HEADER];
            stream.read_exact(&mut header).await.unwrap();
            let mut envelope =
                vec![0; u32::from_be_bytes(header[4..].try_into().unwrap()) as usize];
            stream.read_exact(&mut envelope).await.unwrap();
            stream
                .write_all(&response_header(V1, status, announced))
                .await
                .unwrap();
            let _ = stream.write_all(&body).await;
            let _ = stream.shutdown().await;
            // Stay open (no reset) until the client is done.
            let _ = stream.read(&mut [0u8; 1]).await;
        });
        addr
    }

    #[tokio::test]
    async fn a_server_closing_mid_body_gives_truncated() {
        let addr = one_answer(FOUND, 1000, vec![1; 500]).await;
        let error = client(Codec::plain()).fetch(addr, "k").await.unwrap_err();
        assert!(
            matches!(
                error,
                DataError::Truncated {
                    got: 500,
                    expected: 1000,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[tokio::test]
    async fn an_announced_length_over_the_limit_is_refused_unread() {
        // A terabyte announced, nothing sent: the client neither allocates
        // nor waits for it.
        let addr = one_answer(FOUND, 1 << 40, Vec::new()).await;
        let client = DataClient::new(
            Codec::plain(),
            DataClientOptions::default().max_value_len(1 << 20),
        );
        let started = Instant::now();
        let error = client.fetch(addr, "k").await.unwrap_err();
        assert!(
            matches!(error, DataError::TooLarge { size, limit, .. } if size == 1 << 40 && limit == 1 << 20),
            "{error}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(
            client.idle_connections(addr),
            0,
            "the connection is dropped"
        );
        // The same against a real server: the connection is not reused.
        let server = serve(Codec::plain(), DataServerOptions::default()).await;
        server.keep.insert("k", value(2 << 20, 1));
        let error = client.fetch(server.addr, "k").await.unwrap_err();
        assert!(matches!(error, DataError::TooLarge { .. }), "{error}");
        assert_eq!(client.idle_connections(server.addr), 0);
        server.stop().await;
    }

    #[tokio::test]
    async fn an_unreachable_server_and_a_silent_one_are_reported() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let error = client(Codec::plain()).fetch(addr, "k").await.unwrap_err();
        assert!(matches!(error, DataError::Unreachable { .. }), "{error}");
        assert!(error.to_string().contains(&addr.to_string()));
        // Accepts, never answers.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let client = DataClient::new(
            Codec::plain(),
            DataClientOptions::default().read_timeout(Duration::from_millis(300)),
        );
        let error = client.fetch(addr, "k").await.unwrap_err();
        assert!(matches!(error, DataError::Timeout { .. }), "{error}");
        drop(silent);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fifty_concurrent_fetches_on_one_client() {
        let server = serve(sealed("s3cret", 60_000), DataServerOptions::default()).await;
        for i in 0..50 {
            server
                .keep
                .insert(format!("k{i}"), value(100_000 + i, i as u64));
        }
        let client = client(sealed("s3cret", 60_000));
        let fetches = (0..50).map(|i| {
            let client = client.clone();
            let addr = server.addr;
            tokio::spawn(async move { client.fetch(addr, &format!("k{i}")).await })
        });
        let values = futures_join(fetches).await;
        for (i, fetched) in values.into_iter().enumerate() {
            assert!(fetched.unwrap() == value(100_000 + i, i as u64), "k{i}");
        }
        assert_eq!(server.counters.served(), 50);
        assert!(client.idle_connections(server.addr) <= 4);
        server.stop().await;
    }

    async fn futures_join<T: Send + 'static>(
        handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
    ) -> Vec<T> {
        let mut out = Vec::new();
        for handle in handles.collect::<Vec<_>>() {
            out.push(handle.await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn the_pool_reuses_a_connection_and_replaces_a_closed_one() {
        let options = DataServerOptions::default().idle_timeout(Duration::from_millis(300));
        let server = serve(Codec::plain(), options).await;
        server.keep.insert("k", value(3 << 20, 3));
        let client = client(Codec::plain());
        for _ in 0..5 {
            assert_eq!(client.fetch(server.addr, "k").await.unwrap().len(), 3 << 20);
        }
        assert_eq!(server.counters.accepted(), 1);
        assert_eq!(client.idle_connections(server.addr), 1);
        // The server closes the idle connection; the next fetch notices
        // and goes again on a new one.
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(server.counters.open(), 0);
        assert_eq!(client.fetch(server.addr, "k").await.unwrap().len(), 3 << 20);
        assert_eq!(server.counters.accepted(), 2);
        server.stop().await;
    }

    #[tokio::test]
    async fn the_connection_bound_is_enforced() {
        let server = serve(
            Codec::plain(),
            DataServerOptions::default().max_connections(2),
        )
        .await;
        server.keep.insert("k", Bytes::from_static(b"v"));
        let frame = request_frame(&Codec::plain(), "k", None);
        // Two connections, each served once and kept open.
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut stream = TcpStream::connect(server.addr).await.unwrap();
            stream.write_all(&frame).await.unwrap();
            let mut answer = [0u8; RESPONSE_HEADER + 1];
            stream.read_exact(&mut answer).await.unwrap();
            held.push(stream);
        }
        assert_eq!(server.counters.open(), 2);
        // A third waits: not accepted while two are open.
        let waiting = DataClient::new(
            Codec::plain(),
            DataClientOptions::default().read_timeout(Duration::from_millis(500)),
        );
        let error = waiting.fetch(server.addr, "k").await.unwrap_err();
        assert!(matches!(error, DataError::Timeout { .. }), "{error}");
        assert_eq!(server.counters.accepted(), 2);
        // One closes: the next is served.
        drop(held.pop());
        let client = client(Codec::plain());
        let fetched = tokio::time::timeout(Duration::from_secs(10), client.fetch(server.addr, "k"))
            .await
            .expect("served once a connection closes");
        assert_eq!(&fetched.unwrap()[..], b"v");
        assert!(server.counters.open() <= 2);
        server.stop().await;
    }

    #[tokio::test]
    async fn shutdown_closes_open_connections() {
        let server = serve(Codec::plain(), DataServerOptions::default()).await;
        server.keep.insert("k", Bytes::from_static(b"v"));
        let client = client(Codec::plain());
        client.fetch(server.addr, "k").await.unwrap();
        assert_eq!(server.counters.open(), 1);
        let (addr, counters) = (server.addr, server.counters.clone());
        server.stop().await;
        assert_eq!(counters.open(), 0);
        let error = client.fetch(addr, "k").await.unwrap_err();
        assert!(matches!(error, DataError::Unreachable { .. }), "{error}");
    }
}
