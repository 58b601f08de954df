//! Buffers for receiving large values.
//!
//! A value received into fresh memory costs a page fault per 4 KiB page the
//! first time it is written: for 100 MB, 25,000 faults, more than the copy
//! itself. A [`Receiving`] buffer of [`HUGE_MIN`] bytes or more is an
//! anonymous memory mapping advised into transparent huge pages
//! (`MADV_HUGEPAGE`, which the kernel honours when
//! `/sys/kernel/mm/transparent_hugepage/enabled` is `madvise` or `always`):
//! 2 MiB per fault. Filled once, it becomes a [`Bytes`] without a copy.

use bytes::{Bytes, BytesMut};
use std::io;

pub use flotilla_proto::HUGE_MIN;

/// A buffer of a known length, filled in order, then frozen into [`Bytes`].
#[derive(Debug)]
pub struct Receiving(Repr);

#[derive(Debug)]
enum Repr {
    /// Small: allocated at the length, filled without zeroing first.
    Small(BytesMut, usize),
    /// Large: a mapping of the whole length, and how much is filled.
    Large(memmap2::MmapMut, usize),
}

impl Receiving {
    /// A buffer for `len` bytes. A large one is mapped now (its pages come
    /// as they are written); if the mapping fails, an ordinary allocation.
    pub fn new(len: usize) -> Receiving {
        if len >= HUGE_MIN {
            if let Ok(map) = memmap2::MmapOptions::new().len(len).map_anon() {
                #[cfg(target_os = "linux")]
                // Advice only: without huge pages the mapping still works.
                let _ = map.advise(memmap2::Advice::HugePage);
                return Receiving(Repr::Large(map, 0));
            }
        }
        Receiving(Repr::Small(BytesMut::with_capacity(len), len))
    }

    /// How many bytes are filled.
    pub fn filled(&self) -> usize {
        match &self.0 {
            Repr::Small(buffer, _) => buffer.len(),
            Repr::Large(_, filled) => *filled,
        }
    }

    /// How many bytes are still to be filled.
    pub fn remaining(&self) -> usize {
        match &self.0 {
            Repr::Small(_, len) => len - self.filled(),
            Repr::Large(map, filled) => map.len() - filled,
        }
    }

    /// Fills up to `max` more bytes from `source` with one read; returns
    /// how many (0: `source` is at its end).
    pub async fn read_from<R>(&mut self, source: &mut R, max: usize) -> io::Result<usize>
    where
        R: tokio::io::AsyncRead + Unpin,
    {
        use tokio::io::AsyncReadExt;
        let max = max.min(self.remaining());
        match &mut self.0 {
            Repr::Small(buffer, _) => source.take(max as u64).read_buf(buffer).await,
            Repr::Large(map, filled) => {
                let read = source.read(&mut map[*filled..*filled + max]).await?;
                *filled += read;
                Ok(read)
            }
        }
    }

    /// Copies `bytes` in after what is filled.
    ///
    /// # Panics
    /// When `bytes` is longer than what remains.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        assert!(
            bytes.len() <= self.remaining(),
            "more than the buffer holds"
        );
        match &mut self.0 {
            Repr::Small(buffer, _) => buffer.extend_from_slice(bytes),
            Repr::Large(map, filled) => {
                map[*filled..*filled + bytes.len()].copy_from_slice(bytes);
                *filled += bytes.len();
            }
        }
    }

    /// The bytes filled so far, shared without a copy.
    pub fn freeze(self) -> Bytes {
        match self.0 {
            Repr::Small(buffer, _) => buffer.freeze(),
            Repr::Large(map, filled) => Bytes::from_owner(map).slice(..filled),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn small_and_large_buffers_fill_and_freeze() {
        for len in [0, 10, HUGE_MIN - 1, HUGE_MIN, HUGE_MIN * 3 + 5] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut buffer = Receiving::new(len);
            assert!(matches!(
                (&buffer.0, len >= HUGE_MIN),
                (Repr::Large(..), true) | (Repr::Small(..), false)
            ));
            let mut source = &data[..];
            while buffer.remaining() > 0 {
                let read = buffer.read_from(&mut source, 1 << 20).await.unwrap();
                assert!(read > 0);
            }
            assert_eq!(buffer.read_from(&mut source, 10).await.unwrap(), 0);
            assert_eq!(buffer.filled(), len);
            assert_eq!(buffer.freeze(), data);
        }
    }

    #[test]
    fn a_partly_filled_buffer_freezes_to_what_was_filled() {
        let mut buffer = Receiving::new(HUGE_MIN);
        buffer.extend_from_slice(b"abc");
        buffer.extend_from_slice(b"de");
        assert_eq!(buffer.remaining(), HUGE_MIN - 5);
        assert_eq!(&buffer.freeze()[..], b"abcde");
    }
}
