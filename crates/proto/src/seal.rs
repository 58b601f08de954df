//! Signed messages and results: with a shared secret (`FLOTILLA_SECRET`),
//! everything Flotilla's processes exchange carries an HMAC-SHA256 tag, so
//! a party with access to the broker (or to Redis) but not the secret can
//! neither inject tasks nor spoof results.
//!
//! A [`Codec`] is built from a [`Config`]. Without a secret it writes and
//! reads the plain envelope of [`crate::encode`]; with one, it *seals*:
//!
//! ```text
//! message: 0x81 | issued_at_ms: u64 | nonce: 16 bytes | MessagePack body | tag: 32 bytes
//! result:  value bytes | tag: 32 bytes | kind byte (0 value, 1 error)
//! ```
//!
//! The tag covers the purpose of the bytes (which queue a message is for,
//! or the result key a value is stored under) and everything before it. The
//! key is derived from the secret and the namespace, so nothing signed in
//! one namespace is valid in another. A message with a bad tag is *forged*;
//! one without a tag, read by a process that has a secret, is *unsigned*;
//! both are refused.
//!
//! **Replays.** A consumer keeps a [`ReplayGuard`]: the nonces it took within
//! the replay window (`FLOTILLA_REPLAY_WINDOW_MS`, 5 minutes by default). A
//! second copy of a message is refused, and so is a message issued longer
//! ago than the window. A copy the broker marks *redelivered* is not
//! refused but, like a message older than the window, checked against the
//! state in Redis instead of being trusted (an outsider can make a captured
//! copy come back redelivered by taking it and requeueing it): the
//! scheduler takes up a stale submission's tasks from their stored specs,
//! and workers run a task (also one that reached another worker than a
//! first copy) only while its spec is stored, that is, while it is not
//! done. Clocks must agree within the window.

use crate::codec::{body_of, DecodeError, WIRE_VERSION};
// The sealed version byte and the refusals are part of the envelope
// (`codec.rs`); they keep their public paths here.
pub use crate::codec::{SealError, SEALED_VERSION};
use crate::{Config, StoredResult, TaskError};
use ring::hmac;
use serde::{de::DeserializeOwned, Serialize};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const TAG_LEN: usize = 32;

/// The most bytes sealing adds after a stored value: its signature (when
/// results are signed) and its tag. [`crate::Encoded`] values leave this
/// much room.
pub const SEAL_ROOM: usize = TAG_LEN + 1;
const HEADER_LEN: usize = 1 + 8 + 16;

/// What a sealed message or value is for: part of what its tag covers, so
/// bytes signed for one use are refused in any other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Purpose {
    /// A [`crate::ToScheduler`] message.
    ToScheduler,
    /// A [`crate::ToWorker`] message.
    ToWorker,
    /// An [`crate::EventBatch`].
    Events,
    /// An [`crate::ActorCall`].
    ActorCall,
    /// An [`crate::ActorReply`].
    ActorReply,
    /// A [`crate::TaskSpec`] stored in Redis.
    Spec,
    /// A request for a kept value on a worker's direct data connection
    /// (`flotilla_runtime::data`).
    Data,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::ToScheduler => b"to-scheduler",
            Purpose::ToWorker => b"to-worker",
            Purpose::Events => b"events",
            Purpose::ActorCall => b"actor-call",
            Purpose::ActorReply => b"actor-reply",
            Purpose::Spec => b"spec",
            Purpose::Data => b"data",
        }
    }
}

/// Writes and reads Flotilla's messages and stored values, sealing and
/// checking them when the configuration has a secret.
///
/// Cheap to clone; one per process is enough.
#[derive(Clone)]
pub struct Codec {
    key: Option<hmac::Key>,
    window: Duration,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("sealed", &self.is_sealed())
            .field("window", &self.window)
            .finish()
    }
}

static NONCE_PREFIX: std::sync::LazyLock<u64> =
    std::sync::LazyLock::new(|| uuid::Uuid::new_v4().as_u64_pair().0);
static NONCE_COUNTER: AtomicU64 = AtomicU64::new(0);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Codec {
    /// The codec of `config`: sealing when it has a secret.
    pub fn new(config: &Config) -> Codec {
        let key = config.secret.as_ref().map(|secret| {
            // One key per namespace: HMAC(secret, "flotilla/1/" + namespace).
            let root = hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes());
            let mut context = hmac::Context::with_key(&root);
            context.update(b"flotilla/1/");
            context.update(config.namespace.as_bytes());
            hmac::Key::new(hmac::HMAC_SHA256, context.sign().as_ref())
        });
        Codec {
            key,
            window: Duration::from_millis(config.replay_window_ms),
        }
    }

    /// A codec without a secret: the plain envelope only.
    pub fn plain() -> Codec {
        Codec {
            key: None,
            window: Duration::from_millis(crate::config::DEFAULT_REPLAY_WINDOW_MS),
        }
    }

    /// Whether this codec signs and requires signatures.
    pub fn is_sealed(&self) -> bool {
        self.key.is_some()
    }

    /// A public fingerprint of the key (never the key itself), or
    /// `"no secret"`: what `flotilla_runtime::seal::publish_fingerprint` records.
    pub fn fingerprint(&self) -> String {
        match &self.key {
            None => "no secret".to_owned(),
            Some(key) => {
                let tag = hmac::sign(key, b"flotilla/fingerprint");
                let hex: String = tag.as_ref()[..6]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                format!("key {hex}")
            }
        }
    }

    /// Encodes `message` for `purpose`, sealed when there is a secret.
    pub fn encode<T: Serialize + ?Sized>(&self, purpose: Purpose, message: &T) -> Vec<u8> {
        let Some(key) = &self.key else {
            return crate::encode(message);
        };
        let mut out = Vec::with_capacity(128 + HEADER_LEN + TAG_LEN);
        out.push(SEALED_VERSION);
        out.extend_from_slice(&now_ms().to_be_bytes());
        out.extend_from_slice(&NONCE_PREFIX.to_be_bytes());
        out.extend_from_slice(&NONCE_COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes());
        rmp_serde::encode::write_named(&mut out, message).expect("wire types always encode");
        let tag = message_tag(key, purpose, &out);
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// Decodes bytes at rest (a spec in Redis) or only watched (the
    /// dashboard's event tap): checks the seal, not freshness.
    pub fn decode<T: DeserializeOwned>(
        &self,
        purpose: Purpose,
        bytes: &[u8],
        limit: usize,
    ) -> Result<T, DecodeError> {
        self.unseal(purpose, bytes, limit)
            .and_then(|(body, _)| Ok(rmp_serde::from_slice(body)?))
    }

    /// Decodes a message taken from a queue: checks the seal, then, unless
    /// the broker marks it `redelivered`, refuses a copy `guard` has seen
    /// and a message issued outside the replay window. For messages whose
    /// second application is harmless (events); see [`Codec::open_aged`]
    /// for those that must be checked against Redis.
    pub fn open<T: DeserializeOwned>(
        &self,
        purpose: Purpose,
        bytes: &[u8],
        redelivered: bool,
        guard: &ReplayGuard,
        limit: usize,
    ) -> Result<T, DecodeError> {
        let (message, stale) = self.open_aged(purpose, bytes, redelivered, guard, limit)?;
        match stale {
            // For consumers of idempotent messages (events): a redelivered
            // copy is taken as it comes.
            Some(_) if redelivered => Ok(message),
            Some(error) => Err(error.into()),
            None => Ok(message),
        }
    }

    /// Like [`Codec::open`], but a stale message is returned with the
    /// reason it is stale, for consumers that can check it against the
    /// state in Redis (a task message that waited behind long tasks). A
    /// redelivered copy of a message `guard` has seen comes back as
    /// [`SealError::Replayed`] (to check), never as fresh.
    pub fn open_aged<T: DeserializeOwned>(
        &self,
        purpose: Purpose,
        bytes: &[u8],
        redelivered: bool,
        guard: &ReplayGuard,
        limit: usize,
    ) -> Result<(T, Option<SealError>), DecodeError> {
        let (body, header) = self.unseal(purpose, bytes, limit)?;
        let message = rmp_serde::from_slice(body)?;
        let stale = match header {
            Some((issued, nonce)) if !redelivered => guard.admit(issued, nonce, self.window)?,
            // A redelivered copy of a message this consumer took is not
            // refused (its first delivery may have been lost with a
            // channel) but is returned as one to check against Redis, as
            // is a stale one: a captured message requeued by an outsider
            // arrives redelivered too.
            Some((issued, nonce)) => guard.admit(issued, nonce, self.window).unwrap_or_else(Some),
            None => None,
        };
        Ok((message, stale))
    }

    /// Checks the envelope and returns the body, with the issue time and
    /// nonce of a sealed message.
    #[allow(clippy::type_complexity)]
    fn unseal<'a>(
        &self,
        purpose: Purpose,
        bytes: &'a [u8],
        limit: usize,
    ) -> Result<(&'a [u8], Option<(u64, u128)>), DecodeError> {
        if bytes.len() > limit {
            return Err(DecodeError::TooLarge {
                size: bytes.len(),
                limit,
            });
        }
        match (&self.key, bytes.first()) {
            (_, None) => Err(DecodeError::Empty),
            (None, Some(&SEALED_VERSION)) => Err(SealError::NoSecret.into()),
            (None, Some(_)) => Ok((body_of(bytes)?, None)),
            (Some(_), Some(&WIRE_VERSION)) => Err(SealError::Unsigned.into()),
            (Some(key), Some(&SEALED_VERSION)) => {
                if bytes.len() < HEADER_LEN + TAG_LEN {
                    return Err(SealError::Truncated.into());
                }
                let (signed, tag) = bytes.split_at(bytes.len() - TAG_LEN);
                verify(key, &[purpose.label(), &[0], signed], tag)?;
                let issued = u64::from_be_bytes(signed[1..9].try_into().expect("8 bytes"));
                let nonce = u128::from_be_bytes(signed[9..25].try_into().expect("16 bytes"));
                Ok((&signed[HEADER_LEN..], Some((issued, nonce))))
            }
            (Some(_), Some(&found)) => Err(DecodeError::Version { found }),
        }
    }

    /// A task's value as stored under result key `key`.
    pub fn result_ok(&self, key: &str, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(value.len() + TAG_LEN + 1);
        out.extend_from_slice(value);
        if let Some(tag) = self.result_tag(key, crate::TAG_OK, value) {
            out.extend_from_slice(tag.as_ref());
        }
        out.push(crate::TAG_OK);
        out
    }

    /// A task's value as one Redis argument, written straight into the
    /// command (the same bytes as [`Codec::result_ok`] without a copy).
    pub fn result_ok_arg<'a>(&self, key: &str, value: &'a [u8]) -> crate::StoredOk<'a> {
        crate::StoredOk::new(value, self.result_tag(key, crate::TAG_OK, value))
    }

    /// A task's error as stored under result key `key`.
    pub fn result_err(&self, key: &str, error: &TaskError) -> Vec<u8> {
        let mut out = crate::encode(error);
        if let Some(tag) = self.result_tag(key, crate::TAG_ERR, &out) {
            out.extend_from_slice(tag.as_ref());
        }
        out.push(crate::TAG_ERR);
        out
    }

    /// A location record as stored under result key `key`: the value is
    /// kept by the worker it names (see [`crate::Location`]). Signed like a
    /// value, so a forged record cannot send readers (and their signed
    /// requests) to another address.
    pub fn result_kept(&self, key: &str, location: &crate::Location) -> Vec<u8> {
        let mut out = crate::encode(location);
        if let Some(tag) = self.result_tag(key, crate::TAG_KEPT, &out) {
            out.extend_from_slice(tag.as_ref());
        }
        out.push(crate::TAG_KEPT);
        out
    }

    /// Reads a stored result: its value, its error or where it is kept,
    /// after checking that it was signed for result key `key`.
    pub fn open_result(&self, key: &str, mut bytes: Vec<u8>) -> Result<StoredResult, DecodeError> {
        let (kind, len) = self.check_result(key, &bytes)?;
        // Dropping the signature and tag is a truncate, not a copy.
        bytes.truncate(len);
        match kind {
            crate::TAG_OK => Ok(StoredResult::Ok(bytes)),
            crate::TAG_ERR => Ok(StoredResult::Err(crate::decode(&bytes, usize::MAX)?)),
            crate::TAG_KEPT => Ok(StoredResult::Kept(crate::decode(&bytes, 64 * 1024)?)),
            found => Err(DecodeError::Version { found }),
        }
    }

    /// Checks that `stored` is a value (not an error or a location record)
    /// signed for result key `key`, and returns the length of the value:
    /// what [`Codec::open_result`] gives as [`StoredResult::Ok`], without
    /// taking the buffer.
    pub fn check_result_ok(&self, key: &str, stored: &[u8]) -> Result<usize, DecodeError> {
        match self.check_result(key, stored)? {
            (crate::TAG_OK, len) => Ok(len),
            (found, _) => Err(DecodeError::Version { found }),
        }
    }

    /// The tag of a stored result and the length of what it tags, once its
    /// signature (when results are signed) is checked.
    fn check_result(&self, key: &str, stored: &[u8]) -> Result<(u8, usize), DecodeError> {
        let Some((&kind, rest)) = stored.split_last() else {
            return Err(DecodeError::Empty);
        };
        let Some(secret) = &self.key else {
            return Ok((kind, rest.len()));
        };
        if rest.len() < TAG_LEN {
            return Err(SealError::Truncated.into());
        }
        let at = rest.len() - TAG_LEN;
        let (value, tag) = rest.split_at(at);
        verify(
            secret,
            &[b"result", &[0], key.as_bytes(), &[0, kind], value],
            tag,
        )?;
        Ok((kind, at))
    }

    fn result_tag(&self, key: &str, kind: u8, value: &[u8]) -> Option<hmac::Tag> {
        let secret = self.key.as_ref()?;
        let mut context = hmac::Context::with_key(secret);
        for part in [b"result" as &[u8], &[0], key.as_bytes(), &[0, kind], value] {
            context.update(part);
        }
        Some(context.sign())
    }
}

fn message_tag(key: &hmac::Key, purpose: Purpose, signed: &[u8]) -> hmac::Tag {
    let mut context = hmac::Context::with_key(key);
    context.update(purpose.label());
    context.update(&[0]);
    context.update(signed);
    context.sign()
}

/// Checks `tag` over the concatenation of `parts`, in constant time.
fn verify(key: &hmac::Key, parts: &[&[u8]], tag: &[u8]) -> Result<(), SealError> {
    let mut context = hmac::Context::with_key(key);
    for part in parts {
        context.update(part);
    }
    let expected = context.sign();
    // Compared in constant time (`subtle`): the time taken tells nothing
    // about how much of a forged tag was right.
    if tag.len() == TAG_LEN && bool::from(subtle::ConstantTimeEq::ct_eq(expected.as_ref(), tag)) {
        Ok(())
    } else {
        Err(SealError::Forged)
    }
}

/// The nonces one consumer took within the replay window (see the module
/// documentation). One per queue consumer: two consumers of one message
/// (an event batch goes to the scheduler and to a client) each take it once.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    nonces: HashSet<u128>,
    /// (forget after, nonce), oldest first.
    order: VecDeque<(u64, u128)>,
}

impl ReplayGuard {
    /// An empty guard.
    pub fn new() -> ReplayGuard {
        ReplayGuard::default()
    }

    /// Takes a first delivery: `Err` for a copy already taken, `Ok(Some)`
    /// for a message outside the window, `Ok(None)` for a fresh one.
    fn admit(
        &self,
        issued: u64,
        nonce: u128,
        window: Duration,
    ) -> Result<Option<SealError>, SealError> {
        let now = now_ms();
        let window_ms = window.as_millis() as u64;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(&(until, old)) = seen.order.front() {
            if until > now {
                break;
            }
            seen.order.pop_front();
            seen.nonces.remove(&old);
        }
        if !seen.nonces.insert(nonce) {
            return Err(SealError::Replayed);
        }
        // Remembered until it would be refused as stale anyway (and at
        // least one window from now, for one issued in the future).
        let until = issued.max(now).saturating_add(window_ms);
        seen.order.push_back((until, nonce));
        if now.abs_diff(issued) > window_ms {
            return Ok(Some(SealError::Stale {
                age_s: (now as i64 - issued as i64) / 1000,
                window_s: window_ms / 1000,
            }));
        }
        Ok(None)
    }

    /// How many nonces the guard remembers.
    pub fn len(&self) -> usize {
        self.seen.lock().map_or(0, |s| s.nonces.len())
    }

    /// Whether the guard remembers no nonce.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Secret, ToScheduler};

    fn codec(secret: Option<&str>, namespace: &str) -> Codec {
        Codec::new(&Config {
            namespace: namespace.into(),
            secret: secret.map(Secret::new),
            ..Config::default()
        })
    }

    fn forget() -> ToScheduler {
        ToScheduler::Forget {
            keys: vec!["k".into()],
        }
    }

    fn open(codec: &Codec, bytes: &[u8], guard: &ReplayGuard) -> Result<ToScheduler, DecodeError> {
        codec.open(Purpose::ToScheduler, bytes, false, guard, 1 << 20)
    }

    fn seal_error(result: Result<ToScheduler, DecodeError>) -> Option<SealError> {
        match result {
            Err(DecodeError::Seal(error)) => Some(error),
            _ => None,
        }
    }

    #[test]
    fn a_sealed_message_opens_once() {
        let codec = codec(Some("s3cret"), "ns");
        let guard = ReplayGuard::new();
        let bytes = codec.encode(Purpose::ToScheduler, &forget());
        assert_eq!(bytes[0], SEALED_VERSION);
        assert_eq!(open(&codec, &bytes, &guard).unwrap(), forget());
        assert_eq!(
            seal_error(open(&codec, &bytes, &guard)),
            Some(SealError::Replayed)
        );
        // The broker's own redelivery is taken again.
        let again = codec.open::<ToScheduler>(Purpose::ToScheduler, &bytes, true, &guard, 1 << 20);
        assert_eq!(again.unwrap(), forget());
        // Another consumer takes its own copy.
        assert!(open(&codec, &bytes, &ReplayGuard::new()).is_ok());
    }

    #[test]
    fn forged_unsigned_and_misdirected_messages_are_refused() {
        let ours = codec(Some("s3cret"), "ns");
        let guard = ReplayGuard::new();
        let plain = crate::encode(&forget());
        assert_eq!(
            seal_error(open(&ours, &plain, &guard)),
            Some(SealError::Unsigned)
        );
        for theirs in [codec(Some("guess"), "ns"), codec(Some("s3cret"), "other")] {
            let bytes = theirs.encode(Purpose::ToScheduler, &forget());
            assert_eq!(
                seal_error(open(&ours, &bytes, &guard)),
                Some(SealError::Forged)
            );
        }
        let for_workers = ours.encode(Purpose::ToWorker, &forget());
        assert_eq!(
            seal_error(open(&ours, &for_workers, &guard)),
            Some(SealError::Forged)
        );
        let mut flipped = ours.encode(Purpose::ToScheduler, &forget());
        flipped[HEADER_LEN + 2] ^= 1;
        assert_eq!(
            seal_error(open(&ours, &flipped, &guard)),
            Some(SealError::Forged)
        );
        let sealed = ours.encode(Purpose::ToScheduler, &forget());
        assert_eq!(
            seal_error(open(&ours, &sealed[..20], &guard)),
            Some(SealError::Truncated)
        );
        assert_eq!(
            seal_error(open(&codec(None, "ns"), &sealed, &guard)),
            Some(SealError::NoSecret)
        );
        assert_eq!(guard.len(), 0, "refused messages leave no nonce behind");
    }

    #[test]
    fn a_message_outside_the_window_is_stale() {
        let mut codec = codec(Some("s3cret"), "ns");
        codec.window = Duration::from_millis(1);
        let bytes = codec.encode(Purpose::ToScheduler, &forget());
        std::thread::sleep(Duration::from_millis(1100));
        let guard = ReplayGuard::new();
        assert!(matches!(
            seal_error(open(&codec, &bytes, &guard)),
            Some(SealError::Stale { age_s: 1, .. })
        ));
        let (message, stale) = codec
            .open_aged::<ToScheduler>(
                Purpose::ToScheduler,
                &bytes,
                false,
                &ReplayGuard::new(),
                1 << 20,
            )
            .unwrap();
        assert_eq!((message, stale.is_some()), (forget(), true));
        // Redelivered by the broker: an idempotent message is taken
        // whatever its age; one to check comes back marked stale.
        assert!(codec
            .open::<ToScheduler>(Purpose::ToScheduler, &bytes, true, &guard, 1 << 20)
            .is_ok());
        let (_, stale) = codec
            .open_aged::<ToScheduler>(Purpose::ToScheduler, &bytes, true, &guard, 1 << 20)
            .unwrap();
        assert!(stale.is_some());
    }

    #[test]
    fn a_redelivered_copy_of_a_message_taken_is_returned_to_check_not_trusted() {
        let codec = codec(Some("s3cret"), "ns");
        let bytes = codec.encode(Purpose::ToScheduler, &forget());
        let guard = ReplayGuard::new();
        let open_aged = |redelivered| {
            codec
                .open_aged::<ToScheduler>(
                    Purpose::ToScheduler,
                    &bytes,
                    redelivered,
                    &guard,
                    1 << 20,
                )
                .map(|(_, stale)| stale)
        };
        assert!(matches!(open_aged(false), Ok(None)));
        // A plain second copy is refused; one requeued so that it arrives
        // redelivered is handed over, marked as a replay to check.
        assert!(matches!(
            open_aged(false),
            Err(DecodeError::Seal(SealError::Replayed))
        ));
        assert!(matches!(open_aged(true), Ok(Some(SealError::Replayed))));
    }

    #[test]
    fn the_guard_forgets_after_the_window() {
        let guard = ReplayGuard::new();
        let window = Duration::from_millis(50);
        let now = now_ms();
        assert_eq!(guard.admit(now, 1, window), Ok(None));
        assert_eq!(guard.admit(now, 1, window), Err(SealError::Replayed));
        std::thread::sleep(Duration::from_millis(120));
        // Forgotten: a copy now is stale, which the caller refuses.
        assert!(matches!(guard.admit(now, 1, window), Ok(Some(_))));
        assert_eq!(guard.len(), 1);
    }

    #[test]
    fn location_records_are_signed_and_bound_to_their_key() {
        let location = crate::Location {
            worker: "w-1".into(),
            addr: "10.0.0.7:7070".into(),
            size: 50 << 20,
        };
        for secret in [None, Some("s3cret")] {
            let codec = codec(secret, "ns");
            let stored = codec.result_kept("ns:r:a", &location);
            assert_eq!(*stored.last().unwrap(), crate::TAG_KEPT);
            assert_eq!(
                codec.open_result("ns:r:a", stored.clone()).unwrap(),
                StoredResult::Kept(location.clone())
            );
            if secret.is_some() {
                assert!(codec.open_result("ns:r:b", stored.clone()).is_err());
                // An unsigned record (one that would send readers elsewhere)
                // is refused where a secret is set.
                let forged = StoredResult::encode_kept(&location);
                assert!(codec.open_result("ns:r:a", forged).is_err());
            } else {
                assert_eq!(stored, StoredResult::encode_kept(&location));
                assert_eq!(
                    StoredResult::decode(stored).unwrap(),
                    StoredResult::Kept(location.clone())
                );
            }
        }
    }

    #[test]
    fn results_are_bound_to_their_key() {
        let codec = codec(Some("s3cret"), "ns");
        let stored = codec.result_ok("ns:r:a", b"value");
        assert_eq!(stored.len(), 5 + TAG_LEN + 1);
        assert_eq!(*stored.last().unwrap(), crate::TAG_OK);
        assert_eq!(
            codec.open_result("ns:r:a", stored.clone()).unwrap(),
            StoredResult::Ok(b"value".to_vec())
        );
        assert!(codec.open_result("ns:r:b", stored.clone()).is_err());
        // Written straight into a command: the same bytes.
        assert_eq!(
            codec.result_ok_arg("ns:r:a", b"value").pieces().concat(),
            stored
        );
        let error = TaskError::new(crate::ErrorKind::User, "Boom", "boom");
        let stored = codec.result_err("ns:r:a", &error);
        assert_eq!(
            codec.open_result("ns:r:a", stored.clone()).unwrap(),
            StoredResult::Err(error)
        );
        let mut spoofed = stored;
        spoofed[1] ^= 1;
        assert!(codec.open_result("ns:r:a", spoofed).is_err());
        // An unsigned value is refused where a secret is set.
        let plain = Codec::plain().result_ok("ns:r:a", b"value");
        assert!(codec.open_result("ns:r:a", plain).is_err());
    }

    #[test]
    fn without_a_secret_the_plain_envelope_is_unchanged() {
        let codec = Codec::plain();
        let bytes = codec.encode(Purpose::ToScheduler, &forget());
        assert_eq!(bytes, crate::encode(&forget()));
        assert_eq!(
            codec.result_ok("k", b"v"),
            StoredResult::encode_ok(b"v"),
            "the stored layout without a secret"
        );
    }
}
