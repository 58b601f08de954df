//! Tasks over large byte values, for the large-values tests: they take a
//! value of any size (scattered, or an argument the client scattered for
//! itself) and return something small about it.
//!
//! ```no_run
//! # async fn demo(client: flotilla::Client) -> flotilla::Result<()> {
//! use flotilla_examples::large_values::{bytes_digest, digest};
//! let data = bytes::Bytes::from(vec![7u8; 50 << 20]);
//! let scattered = client.scatter(&data).await?;
//! let (len, sum) = client.submit(bytes_digest, (&scattered,)).await?;
//! assert_eq!((len, sum), digest(&data));
//! # Ok(()) }
//! ```

/// The length of `data` and a checksum of all of it (a word-wise
/// multiply-add: quick even in a debug build, and it sees every byte and
/// its position).
pub fn digest(data: &[u8]) -> (u64, u64) {
    let mut words = data.chunks_exact(8);
    let mut sum: u64 = 0;
    for word in &mut words {
        let word = u64::from_le_bytes(word.try_into().unwrap_or([0; 8]));
        sum = sum.rotate_left(5).wrapping_mul(0x0100_0000_01b3) ^ word;
    }
    for &byte in words.remainder() {
        sum = sum.rotate_left(5).wrapping_mul(0x0100_0000_01b3) ^ u64::from(byte);
    }
    (data.len() as u64, sum)
}

/// [`digest`] of a `bytes::Bytes` value, in a task.
#[flotilla::task]
pub fn bytes_digest(data: bytes::Bytes) -> (u64, u64) {
    digest(&data)
}

/// [`digest`] of a plain `Vec<u8>` value, in a task.
#[flotilla::task]
pub fn vec_digest(data: Vec<u8>) -> (u64, u64) {
    digest(&data)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_digest_sees_every_byte_and_its_place() {
        let data: Vec<u8> = (0..1001u32).map(|i| (i * 7) as u8).collect();
        let (len, sum) = super::digest(&data);
        assert_eq!(len, 1001);
        let mut changed = data.clone();
        changed[1000] ^= 1;
        assert_ne!(super::digest(&changed).1, sum);
        let mut swapped = data.clone();
        swapped.swap(0, 8);
        assert_ne!(super::digest(&swapped).1, sum);
    }
}
