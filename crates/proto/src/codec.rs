//! The versioned MessagePack envelope: one version byte, then a named map;
//! and why bytes read from the network are refused. Signing
//! ([`crate::seal`]) builds on it: a sealed message starts with
//! [`SEALED_VERSION`] instead, and its refusals are [`SealError`]s.

use serde::{de::DeserializeOwned, Serialize};

/// Version byte that starts every Flotilla message.
///
/// A peer that reads another version refuses the message with
/// [`DecodeError::Version`] instead of misreading it.
pub const WIRE_VERSION: u8 = 1;

/// First byte of a sealed message (see [`crate::seal`]).
pub const SEALED_VERSION: u8 = 0x80 | WIRE_VERSION;

/// Why bytes from the network could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message was empty.
    #[error("empty message")]
    Empty,
    /// The message was written by an incompatible protocol version.
    #[error("message has wire version {found}, this build speaks version {WIRE_VERSION}")]
    Version {
        /// The version byte found.
        found: u8,
    },
    /// The message is larger than the configured limit.
    #[error("message of {size} bytes is over the {limit}-byte limit")]
    TooLarge {
        /// Size of the message.
        size: usize,
        /// The limit it broke.
        limit: usize,
    },
    /// The body is not valid MessagePack for the expected type.
    #[error("malformed message body: {0}")]
    Body(#[from] rmp_serde::decode::Error),
    /// A signature check refused the message (see [`crate::seal`]).
    #[error(transparent)]
    Seal(#[from] SealError),
}

/// Why a sealed message or value was refused (see [`DecodeError`] and
/// [`crate::seal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The bytes carry no signature, but this process has a secret.
    #[error(
        "unsigned message refused: FLOTILLA_SECRET is set here, so every message must be signed"
    )]
    Unsigned,
    /// The bytes are signed, but this process has no secret to check them.
    #[error("signed message refused: this process has no FLOTILLA_SECRET to verify it with")]
    NoSecret,
    /// The signature does not match: another secret, altered bytes, or
    /// bytes signed for another purpose, key or namespace.
    #[error("forged or corrupted message refused: its signature does not match")]
    Forged,
    /// The signed envelope is cut short.
    #[error("truncated signed message refused")]
    Truncated,
    /// A copy of a message this consumer has already taken.
    #[error("replayed message refused: this consumer already took it")]
    Replayed,
    /// Issued longer ago than the replay window (or that far in the future).
    #[error(
        "stale message refused: issued {age_s} s from now, outside the {window_s} s replay window"
    )]
    Stale {
        /// Seconds between its issue and now (negative: in the future).
        age_s: i64,
        /// The replay window, in seconds.
        window_s: u64,
    },
}

/// Encodes `message` as a version byte followed by a MessagePack named map.
pub fn encode<T: Serialize + ?Sized>(message: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.push(WIRE_VERSION);
    // Serializing our own types into a Vec cannot fail: every type has
    // string keys and no custom serializer returns errors.
    rmp_serde::encode::write_named(&mut out, message).expect("wire types always encode");
    out
}

/// Decodes a message written by [`encode`], refusing anything over `limit`
/// bytes, another wire version, or a malformed body.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, DecodeError> {
    if bytes.len() > limit {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    Ok(rmp_serde::from_slice(body_of(bytes)?)?)
}

/// The MessagePack body of a plain (unsigned) message.
pub(crate) fn body_of(bytes: &[u8]) -> Result<&[u8], DecodeError> {
    match bytes.split_first() {
        None => Err(DecodeError::Empty),
        Some((&WIRE_VERSION, body)) => Ok(body),
        Some((&SEALED_VERSION, _)) => Err(SealError::NoSecret.into()),
        Some((&found, _)) => Err(DecodeError::Version { found }),
    }
}
