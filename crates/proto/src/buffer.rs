//! [`Bytes`]: the byte buffer for large values, which decodes without a
//! copy when the value it is read from is already in memory.
//!
//! A value's encoded bytes (a task's input in a worker's cache, a result the
//! client fetched) are held in a reference-counted [`bytes::Bytes`]. While
//! such a buffer is decoded under [`decode_sharing`], a [`Bytes`] field read
//! from it shares that buffer: a 100 MB input given to fifty tasks is one
//! allocation, not fifty copies. Decoded anywhere else, it copies, like any
//! other owned type.

use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};
use serde::{Serialize, Serializer};
use std::cell::RefCell;
use std::fmt;
use std::ops::{Deref, RangeBounds};

/// A cheaply cloneable, immutable byte buffer (a [`bytes::Bytes`]) for
/// binary task arguments, results and scattered data. It travels as
/// MessagePack `bin` (one length header and the bytes), and a task's
/// `Bytes` argument or a client's `Bytes` result shares the buffer the value
/// arrived in instead of copying it (see [`decode_sharing`]), from
/// [`SHARE_MIN`] bytes on. A shared `Bytes` keeps the whole buffer alive:
/// to keep a small part of a large value for long, copy it
/// ([`Bytes::copy_from_slice`]).
///
/// ```
/// use flotilla_proto::Bytes;
/// let data = Bytes::from(vec![1u8, 2, 3]);
/// assert_eq!(&data[..], &[1, 2, 3]);
/// assert_eq!(data.slice(1..), Bytes::from_static(&[2, 3]));
/// ```
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bytes(bytes::Bytes);

impl Bytes {
    /// An empty buffer.
    pub const fn new() -> Bytes {
        Bytes(bytes::Bytes::new())
    }

    /// A buffer over static bytes (no allocation).
    pub const fn from_static(bytes: &'static [u8]) -> Bytes {
        Bytes(bytes::Bytes::from_static(bytes))
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_from_slice(data: &[u8]) -> Bytes {
        Bytes(bytes::Bytes::copy_from_slice(data))
    }

    /// The bytes in `range`, sharing this buffer.
    ///
    /// # Panics
    /// When `range` is out of bounds.
    pub fn slice(&self, range: impl RangeBounds<usize>) -> Bytes {
        Bytes(self.0.slice(range))
    }

    /// The underlying [`bytes::Bytes`].
    pub fn into_inner(self) -> bytes::Bytes {
        self.0
    }
}

impl Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl std::borrow::Borrow<[u8]> for Bytes {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl From<bytes::Bytes> for Bytes {
    fn from(bytes: bytes::Bytes) -> Bytes {
        Bytes(bytes)
    }
}

impl From<Bytes> for bytes::Bytes {
    fn from(bytes: Bytes) -> bytes::Bytes {
        bytes.0
    }
}

impl From<Vec<u8>> for Bytes {
    /// Takes the vector's allocation, without a copy.
    fn from(vec: Vec<u8>) -> Bytes {
        Bytes(bytes::Bytes::from(vec))
    }
}

impl From<Bytes> for Vec<u8> {
    /// Takes the allocation back when nothing else shares it; copies otherwise.
    fn from(bytes: Bytes) -> Vec<u8> {
        Vec::from(bytes.0)
    }
}

impl From<&'static [u8]> for Bytes {
    fn from(bytes: &'static [u8]) -> Bytes {
        Bytes::from_static(bytes)
    }
}

impl From<String> for Bytes {
    fn from(text: String) -> Bytes {
        Bytes::from(text.into_bytes())
    }
}

impl PartialEq<[u8]> for Bytes {
    fn eq(&self, other: &[u8]) -> bool {
        self.0 == other
    }
}

impl PartialEq<Vec<u8>> for Bytes {
    fn eq(&self, other: &Vec<u8>) -> bool {
        self.0 == other
    }
}

impl PartialEq<Bytes> for Vec<u8> {
    fn eq(&self, other: &Bytes) -> bool {
        *self == other.0
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
        deserializer.deserialize_byte_buf(BytesVisitor)
    }
}

struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = Bytes;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bytes")
    }

    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Bytes, E> {
        Ok(Bytes(
            shared(v).unwrap_or_else(|| bytes::Bytes::copy_from_slice(v)),
        ))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
        Ok(Bytes::copy_from_slice(v))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
        Ok(Bytes::from(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Bytes, E> {
        Ok(Bytes::copy_from_slice(v.as_bytes()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Bytes, E> {
        Ok(Bytes::from(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
        while let Some(byte) = seq.next_element::<u8>()? {
            out.push(byte);
        }
        Ok(Bytes::from(out))
    }
}

/// From this many bytes on, a decoded [`Bytes`] shares the buffer it is
/// read from (under [`decode_sharing`]); a smaller one is copied, which
/// costs less than sharing and keeps no large buffer alive.
pub const SHARE_MIN: usize = 4096;

thread_local! {
    /// The buffers being decoded on this thread (see [`decode_sharing`]).
    static SOURCES: RefCell<Vec<bytes::Bytes>> = const { RefCell::new(Vec::new()) };
}

/// `v` as a view of a buffer being decoded on this thread, if it lies in one.
fn shared(v: &[u8]) -> Option<bytes::Bytes> {
    if v.len() < SHARE_MIN {
        return None;
    }
    let start = v.as_ptr() as usize;
    let end = start + v.len();
    SOURCES.with(|sources| {
        sources.borrow().iter().rev().find_map(|source| {
            let from = source.as_ptr() as usize;
            (from <= start && end <= from + source.len()).then(|| source.slice_ref(v))
        })
    })
}

/// Runs `decode` (a deserialization reading from the buffers `sources`)
/// so that every [`Bytes`] it produces from bytes inside one of them shares
/// that buffer rather than copying it. Nested calls add to the buffers
/// shared; they are forgotten when `decode` returns, or panics.
///
/// ```
/// use flotilla_proto::{decode_sharing, Bytes};
/// let encoded = bytes::Bytes::from(rmp_serde::to_vec(&Bytes::from(vec![7u8; 4096])).unwrap());
/// let value: Bytes = decode_sharing([encoded.clone()], || rmp_serde::from_slice(&encoded)).unwrap();
/// // The value's bytes are inside the encoded buffer: no copy was made.
/// assert!(encoded.as_ptr_range().contains(&value.as_ptr()));
/// ```
pub fn decode_sharing<R>(
    sources: impl IntoIterator<Item = bytes::Bytes>,
    decode: impl FnOnce() -> R,
) -> R {
    struct Restore(usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            SOURCES.with(|sources| sources.borrow_mut().truncate(self.0));
        }
    }
    let before = SOURCES.with(|s| {
        let mut s = s.borrow_mut();
        let before = s.len();
        s.extend(sources);
        before
    });
    let _restore = Restore(before);
    decode()
}

/// A buffer a large value is encoded into, made by the process' large-value
/// allocator (see [`set_large_alloc`]): a worker writes its large results
/// into shared memory this way, so that readers on the same host map them
/// instead of copying them.
pub trait LargeBuffer: Send + Sync + 'static {
    /// The whole buffer (at least the length it was made for).
    fn as_slice(&self) -> &[u8];
    /// The whole buffer, to write into.
    fn as_mut_slice(&mut self) -> &mut [u8];
    /// The first `len` bytes, frozen and shared without a copy.
    fn freeze(self: Box<Self>, len: usize) -> bytes::Bytes;
}

/// Makes a [`LargeBuffer`] of at least the given length, or `None` (then an
/// ordinary allocation is used).
pub type LargeAlloc = dyn Fn(usize) -> Option<Box<dyn LargeBuffer>> + Send + Sync;

static LARGE_ALLOC: std::sync::OnceLock<Box<LargeAlloc>> = std::sync::OnceLock::new();

/// Installs this process' allocator for values of [`MEASURED_MIN`] bytes
/// or more encoded by [`Encoded::encode`]. Once per process: returns
/// `false` (and changes nothing) if one is installed already.
pub fn set_large_alloc(alloc: Box<LargeAlloc>) -> bool {
    LARGE_ALLOC.set(alloc).is_ok()
}

/// From this many encoded bytes on, a value is measured first and encoded
/// once into a buffer of its exact size (no growth, no copy on sealing).
pub const MEASURED_MIN: usize = 4 << 20;

/// A value encoded as Flotilla stores it (see [`crate::write_value`]),
/// with room after it for the few bytes a stored result adds (its
/// signature and tag), so that sealing it never copies it.
pub struct Encoded(Repr);

enum Repr {
    Vec(Vec<u8>),
    /// From the process' [`LargeAlloc`]: `len` bytes written so far.
    Large {
        buffer: Box<dyn LargeBuffer>,
        len: usize,
    },
}

impl Encoded {
    /// Encodes `value`, leaving room for `room` more bytes. A value of
    /// [`MEASURED_MIN`] bytes or more is measured first (cheap for bytes:
    /// one length) and written once into a buffer of its size: one from
    /// the process' large-value allocator when it has one
    /// ([`set_large_alloc`]) and it gives one, else an ordinary one.
    pub fn encode<T: serde::Serialize + ?Sized>(
        value: &T,
        room: usize,
    ) -> Result<Encoded, rmp_serde::encode::Error> {
        if let Ok(mut small) = crate::value_to_vec_within(value, MEASURED_MIN)? {
            small.reserve_exact(room);
            return Ok(Encoded(Repr::Vec(small)));
        }
        let mut counter = Counter(0);
        crate::write_value(&mut counter, value)?;
        let len = counter.0;
        if let Some(mut buffer) = LARGE_ALLOC.get().and_then(|alloc| alloc(len + room)) {
            let mut out = &mut buffer.as_mut_slice()[..len];
            // A value that encodes to other bytes the second time (a
            // Serialize that is not deterministic) does not fit: the
            // ordinary buffer below takes it.
            if crate::write_value(&mut out, value).is_ok() && out.is_empty() {
                return Ok(Encoded(Repr::Large { buffer, len }));
            }
        }
        let mut out = Vec::with_capacity(len + room);
        crate::write_value(&mut out, value)?;
        Ok(Encoded(Repr::Vec(out)))
    }

    /// Bytes already encoded.
    pub fn from_vec(bytes: Vec<u8>) -> Encoded {
        Encoded(Repr::Vec(bytes))
    }

    /// Appends `bytes` (a signature, a tag), in the room left for them.
    ///
    /// # Panics
    /// If the value is in a large buffer without room for `bytes` (the
    /// `room` given to [`Encoded::encode`] was too small).
    pub fn append(&mut self, bytes: &[u8]) {
        match &mut self.0 {
            Repr::Vec(vec) => vec.extend_from_slice(bytes),
            Repr::Large { buffer, len } => {
                let end = *len + bytes.len();
                buffer.as_mut_slice()[*len..end].copy_from_slice(bytes);
                *len = end;
            }
        }
    }

    /// Whether the bytes are in a buffer of the large-value allocator.
    pub fn is_large(&self) -> bool {
        matches!(self.0, Repr::Large { .. })
    }

    /// The encoded bytes, shared without a copy.
    pub fn into_bytes(self) -> bytes::Bytes {
        match self.0 {
            Repr::Vec(vec) => bytes::Bytes::from(vec),
            Repr::Large { buffer, len } => buffer.freeze(len),
        }
    }

    /// The encoded bytes (a copy when they are in a large buffer).
    pub fn into_vec(self) -> Vec<u8> {
        match self.0 {
            Repr::Vec(vec) => vec,
            Repr::Large { .. } => self.to_vec(),
        }
    }
}

impl Deref for Encoded {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            Repr::Vec(vec) => vec,
            Repr::Large { buffer, len } => &buffer.as_slice()[..*len],
        }
    }
}

impl PartialEq for Encoded {
    fn eq(&self, other: &Encoded) -> bool {
        **self == **other
    }
}

impl fmt::Debug for Encoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encoded")
            .field("len", &self.len())
            .field("large", &self.is_large())
            .finish()
    }
}

/// A writer that only counts.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 += bytes.len();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Record {
        name: String,
        data: Bytes,
    }

    fn encode<T: Serialize>(value: &T) -> bytes::Bytes {
        bytes::Bytes::from(crate::value_to_vec(value).unwrap())
    }

    #[test]
    fn bytes_travel_as_bin_and_share_the_decoded_buffer() {
        let record = Record {
            name: "r".into(),
            data: Bytes::from(vec![9u8; 100_000]),
        };
        let encoded = encode(&record);
        assert!(encoded.len() < 100_020, "bin, not an array of integers");
        let range = encoded.as_ptr_range();
        let shared: Record =
            decode_sharing([encoded.clone()], || rmp_serde::from_slice(&encoded)).unwrap();
        assert_eq!(shared, record);
        assert!(range.contains(&shared.data.as_ptr()), "shares the buffer");
        // Outside decode_sharing: a copy.
        let copied: Record = rmp_serde::from_slice(&encoded).unwrap();
        assert_eq!(copied, record);
        assert!(!range.contains(&copied.data.as_ptr()), "a copy");
    }

    #[test]
    fn small_bytes_are_copied_even_when_sharing() {
        let encoded = encode(&Bytes::from(vec![1u8; SHARE_MIN - 1]));
        let back: Bytes =
            decode_sharing([encoded.clone()], || rmp_serde::from_slice(&encoded)).unwrap();
        assert_eq!(back.len(), SHARE_MIN - 1);
        assert!(!encoded.as_ptr_range().contains(&back.as_ptr()), "a copy");
    }

    #[test]
    fn sources_are_forgotten_after_decoding_even_on_panic() {
        let encoded = encode(&Bytes::from(vec![1u8; 64]));
        let result = std::panic::catch_unwind(|| {
            decode_sharing([encoded.clone()], || panic!("in the decoder"))
        });
        assert!(result.is_err());
        SOURCES.with(|s| assert!(s.borrow().is_empty()));
        let outer = encode(&Bytes::from(vec![2u8; 64]));
        decode_sharing([outer.clone()], || {
            decode_sharing([encoded.clone()], || {
                SOURCES.with(|s| assert_eq!(s.borrow().len(), 2));
            });
            SOURCES.with(|s| assert_eq!(s.borrow().len(), 1));
        });
    }

    /// A large buffer on the heap, for the test below.
    struct Boxed(Vec<u8>);

    impl LargeBuffer for Boxed {
        fn as_slice(&self) -> &[u8] {
            &self.0
        }
        fn as_mut_slice(&mut self) -> &mut [u8] {
            &mut self.0
        }
        fn freeze(self: Box<Self>, len: usize) -> bytes::Bytes {
            bytes::Bytes::from(self.0).slice(..len)
        }
    }

    #[test]
    fn a_large_value_goes_to_the_installed_allocator_sealed_in_place() {
        // The allocator is process-wide: it answers only this test's size.
        const LEN: usize = MEASURED_MIN * 3 + 7;
        let value = Bytes::from(vec![9u8; LEN]);
        let plain = crate::value_to_vec(&value).unwrap();
        let asked = plain.len() + 33;
        set_large_alloc(Box::new(move |len| {
            (len == asked).then(|| Box::new(Boxed(vec![0; len])) as Box<dyn LargeBuffer>)
        }));
        let mut encoded = Encoded::encode(&value, 33).unwrap();
        assert!(encoded.is_large());
        assert_eq!(&encoded[..], &plain[..]);
        let before = encoded.as_ptr();
        encoded.append(&[1; 32]);
        encoded.append(&[2]);
        assert_eq!(encoded.as_ptr(), before, "sealed in place");
        assert_eq!(encoded.len(), asked);
        let sealed = encoded.into_bytes();
        assert_eq!(sealed.as_ptr(), before, "frozen without a copy");
        assert_eq!(&sealed[..plain.len()], &plain[..]);
        assert_eq!(&sealed[plain.len()..], [&[1u8; 32][..], &[2]].concat());
        // Other sizes: the allocator says no, an ordinary buffer is used.
        let other = Encoded::encode(&Bytes::from(vec![9u8; LEN + 1]), 33).unwrap();
        assert!(!other.is_large());
    }

    #[test]
    fn small_and_large_values_encode_alike_with_room_to_seal() {
        for len in [
            0usize,
            100,
            MEASURED_MIN - 10,
            MEASURED_MIN,
            MEASURED_MIN * 2 + 3,
        ] {
            let value = Bytes::from(vec![5u8; len]);
            let plain = crate::value_to_vec(&value).unwrap();
            let mut encoded = Encoded::encode(&value, 33).unwrap();
            assert_eq!(&encoded[..], &plain[..], "len {len}");
            let Repr::Vec(vec) = &encoded.0 else {
                panic!("no large-value allocator here")
            };
            assert!(vec.capacity() >= plain.len() + 33, "room to seal");
            let before = encoded.as_ptr();
            encoded.append(&[1; 32]);
            assert_eq!(encoded.as_ptr(), before, "sealed in place");
            encoded.append(&[2]);
            assert_eq!(encoded.as_ptr(), before, "sealed in place");
            let sealed = encoded.into_bytes();
            assert_eq!(sealed.len(), plain.len() + 33);
            assert_eq!(&sealed[..plain.len()], &plain[..]);
            assert_eq!(&sealed[plain.len()..], [&[1u8; 32][..], &[2]].concat());
        }
        // A structured value too large for a Vec is measured, then written.
        let many: Vec<u64> = (0..(MEASURED_MIN as u64 / 4)).collect();
        let encoded = Encoded::encode(&many, 0).unwrap();
        assert_eq!(encoded.into_vec(), crate::value_to_vec(&many).unwrap());
    }

    #[test]
    fn other_encodings_of_bytes_still_decode() {
        // An array of integers (how a plain `Vec<u8>` was once written).
        let array = rmp_serde::to_vec(&vec![1u16, 2, 3]).unwrap();
        let back: Bytes = rmp_serde::from_slice(&array).unwrap();
        assert_eq!(back, vec![1u8, 2, 3]);
        let text = rmp_serde::to_vec("abc").unwrap();
        let back: Bytes = rmp_serde::from_slice(&text).unwrap();
        assert_eq!(&back[..], b"abc");
    }
}
