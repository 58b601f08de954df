//! The versioned MessagePack envelope: one version byte, then a named map.

use serde::{de::DeserializeOwned, Serialize};

/// Version byte that starts every Flotilla message.
///
/// A peer that reads another version refuses the message with
/// [`DecodeError::Version`] instead of misreading it.
pub const WIRE_VERSION: u8 = 1;

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
    Seal(#[from] crate::seal::SealError),
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
        Some((&crate::seal::SEALED_VERSION, _)) => Err(crate::seal::SealError::NoSecret.into()),
        Some((&found, _)) => Err(DecodeError::Version { found }),
    }
}
