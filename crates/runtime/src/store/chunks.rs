//! Large values in chunks: the Redis tier for values too large for one
//! string (Redis refuses strings over 512 MB, and one `SET`/`GET` of a huge
//! value needs buffers as large in redis-rs).
//!
//! The stored bytes of a value (exactly what would be in `r:{key}`: value,
//! optional HMAC, tag byte) are cut into [`CHUNK_SIZE`] pieces written as
//! the fields `"0"`..`"n-1"` of the hash `c:{key}` ([`Names::chunks_key`],
//! same hash tag as the result), a few chunks per round trip; `r:{key}`
//! then holds only a small manifest:
//!
//! | bytes | content |
//! | --- | --- |
//! | 8 | total length, u64 big-endian |
//! | 4 | chunk size, u32 big-endian |
//! | 4 | chunk count, u32 big-endian |
//! | 1 | [`TAG_CHUNKED`] |
//!
//! The chunks carry the sealed bytes as they are, so the reassembled value
//! opens with `Codec::open_result` like any other: signing needs nothing new.
//! A reader gets the manifest with the other results, then the chunks with
//! pipelined `HGET`s, [`CHUNKS_PER_TRIP`] per round trip, into one buffer
//! of the total length. A chunk missing or of the wrong size (released
//! meanwhile) makes the whole value read as missing, never as garbage.

use crate::Redis;
use flotilla_proto::Names;
use redis::RedisResult;

/// The size of one chunk of a chunked value (4 MiB).
pub const CHUNK_SIZE: usize = 4 << 20;

/// Stored bytes at least this large go to Redis in chunks (see
/// [`Store::write_chunks`](super::Store::write_chunks)); smaller ones in one
/// string.
pub const CHUNKED_MIN: usize = CHUNK_SIZE;

/// The tag byte of a manifest in `r:{key}`: the value itself is in chunks.
/// A chunked value is always a success: readers see [`flotilla_proto::TAG_OK`].
pub const TAG_CHUNKED: u8 = 3;

/// Chunks written or read per round trip: the extra memory a writer or a
/// reader holds beyond the value itself.
pub const CHUNKS_PER_TRIP: usize = 4;

/// The length of an encoded manifest.
const MANIFEST_LEN: usize = 8 + 4 + 4 + 1;

/// What `r:{key}` holds for a chunked value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Manifest {
    /// Length of the stored bytes.
    pub(super) total: u64,
    /// Size of every chunk but the last.
    pub(super) chunk_size: u32,
    /// Number of chunks.
    pub(super) count: u32,
}

impl Manifest {
    /// The manifest of `total` bytes cut into [`CHUNK_SIZE`] chunks.
    pub(super) fn of(total: usize) -> Manifest {
        Manifest {
            total: total as u64,
            chunk_size: CHUNK_SIZE as u32,
            count: total.div_ceil(CHUNK_SIZE) as u32,
        }
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MANIFEST_LEN);
        out.extend_from_slice(&self.total.to_be_bytes());
        out.extend_from_slice(&self.chunk_size.to_be_bytes());
        out.extend_from_slice(&self.count.to_be_bytes());
        out.push(TAG_CHUNKED);
        out
    }

    /// The manifest in `stored`, if `stored` is one (and a consistent one).
    pub(super) fn decode(stored: &[u8]) -> Option<Manifest> {
        if stored.len() != MANIFEST_LEN || stored[MANIFEST_LEN - 1] != TAG_CHUNKED {
            return None;
        }
        let total = u64::from_be_bytes(stored[0..8].try_into().ok()?);
        let chunk_size = u32::from_be_bytes(stored[8..12].try_into().ok()?);
        let count = u32::from_be_bytes(stored[12..16].try_into().ok()?);
        let expected = if chunk_size == 0 {
            None
        } else {
            Some(total.div_ceil(u64::from(chunk_size)))
        };
        (expected == Some(u64::from(count)) && usize::try_from(total).is_ok()).then_some(Manifest {
            total,
            chunk_size,
            count,
        })
    }

    /// The byte range of chunk `index`.
    pub(super) fn range(&self, index: u32) -> std::ops::Range<usize> {
        let start = index as usize * self.chunk_size as usize;
        let end = (start + self.chunk_size as usize).min(self.total as usize);
        start..end
    }
}

/// The parts of `pieces` (concatenated) that make bytes `range`.
pub(super) fn slices<'a>(pieces: &[&'a [u8]], range: std::ops::Range<usize>) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut offset = 0;
    for piece in pieces {
        let (start, end) = (offset, offset + piece.len());
        offset = end;
        if end <= range.start || piece.is_empty() {
            continue;
        }
        if start >= range.end {
            break;
        }
        let from = range.start.max(start) - start;
        let to = range.end.min(end) - start;
        out.push(&piece[from..to]);
    }
    out
}

/// Chunk `index` of `pieces` under `manifest`: borrowed when it lies in one
/// piece, copied when it spans several (the last one, with the seal).
pub(super) fn chunk<'a>(
    pieces: &[&'a [u8]],
    manifest: &Manifest,
    index: u32,
) -> std::borrow::Cow<'a, [u8]> {
    let parts = slices(pieces, manifest.range(index));
    match parts.as_slice() {
        [one] => std::borrow::Cow::Borrowed(one),
        _ => std::borrow::Cow::Owned(parts.concat()),
    }
}

/// Writes the chunks of `pieces` into `c:{key}`, [`CHUNKS_PER_TRIP`] per
/// round trip; returns the manifest.
pub(super) async fn write_redis(
    redis: &mut Redis,
    names: &Names,
    key: &str,
    pieces: &[&[u8]],
) -> RedisResult<Manifest> {
    let total = pieces.iter().map(|piece| piece.len()).sum();
    let manifest = Manifest::of(total);
    let chunks_key = names.chunks_key(key);
    let indexes: Vec<u32> = (0..manifest.count).collect();
    for group in indexes.chunks(CHUNKS_PER_TRIP) {
        let mut pipe = redis::pipe();
        for &index in group {
            pipe.cmd("HSET")
                .arg(&chunks_key)
                .arg(index)
                .arg(&*chunk(pieces, &manifest, index))
                .ignore();
        }
        pipe.query_async::<()>(redis).await?;
    }
    Ok(manifest)
}

/// Reads the chunks `manifest` names from `c:{key}` into one buffer;
/// `None` when any is missing or of the wrong size.
pub(super) async fn read_redis(
    redis: &mut Redis,
    names: &Names,
    key: &str,
    manifest: &Manifest,
) -> RedisResult<Option<Vec<u8>>> {
    let chunks_key = names.chunks_key(key);
    let mut out = Vec::with_capacity(manifest.total as usize);
    let indexes: Vec<u32> = (0..manifest.count).collect();
    for group in indexes.chunks(CHUNKS_PER_TRIP) {
        let mut pipe = redis::pipe();
        for &index in group {
            pipe.cmd("HGET").arg(&chunks_key).arg(index);
        }
        let chunks: Vec<Option<Vec<u8>>> = pipe.query_async(redis).await?;
        for (&index, chunk) in group.iter().zip(chunks) {
            match chunk {
                Some(chunk) if chunk.len() == manifest.range(index).len() => {
                    out.extend_from_slice(&chunk)
                }
                _ => return Ok(None),
            }
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_round_trip_and_refuse_what_is_not_one() {
        for total in [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, 7 * CHUNK_SIZE / 2] {
            let manifest = Manifest::of(total);
            let encoded = manifest.encode();
            assert_eq!(Manifest::decode(&encoded), Some(manifest));
            let covered: usize = (0..manifest.count).map(|i| manifest.range(i).len()).sum();
            assert_eq!(covered, total);
        }
        let small = flotilla_proto::StoredResult::encode_ok(b"3");
        assert_eq!(Manifest::decode(&small), None);
        let mut wrong_count = Manifest::of(10).encode();
        wrong_count[15] = 9;
        assert_eq!(Manifest::decode(&wrong_count), None);
        assert_eq!(Manifest::decode(&[0; MANIFEST_LEN]), None);
    }

    #[test]
    fn chunks_cut_across_pieces() {
        let manifest = Manifest {
            total: 10,
            chunk_size: 4,
            count: 3,
        };
        let pieces: [&[u8]; 3] = [b"abcdef", b"", b"ghij"];
        let chunks: Vec<Vec<u8>> = (0..3)
            .map(|i| chunk(&pieces, &manifest, i).into_owned())
            .collect();
        assert_eq!(chunks, [b"abcd".to_vec(), b"efgh".to_vec(), b"ij".to_vec()]);
        assert!(matches!(
            chunk(&pieces, &manifest, 0),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
