//! The typed description of a registered task, implemented by `#[flotilla::task]`.

use serde::{de::DeserializeOwned, Serialize};

/// A task that workers can run: the zero-sized handle `#[flotilla::task]`
/// generates for a function implements this trait.
///
/// The client uses `Args` and `Output` to check submissions at compile time;
/// `NAME` and `FINGERPRINT` travel on the wire so that a worker built from
/// another version of the task refuses it with a clear error.
pub trait Task: Copy + Send + Sync + 'static {
    /// The task's parameters as a tuple (`(i64, i64)`; `()` for none).
    type Args: Serialize + DeserializeOwned + Send + 'static;
    /// What the task returns on success.
    type Output: Serialize + DeserializeOwned + Send + 'static;
    /// The stable name the task is registered under.
    const NAME: &'static str;
    /// A hash of the task's parameter and return types.
    const FINGERPRINT: u64;
}

/// The success type of a `Result`-returning task function.
pub trait ResultOutput {
    /// `T` in `Result<T, E>`.
    type Ok;
}

impl<T, E> ResultOutput for Result<T, E> {
    type Ok = T;
}

/// Writes a user's value (a task's arguments or output, a scattered value, a
/// primitive's value) as Flotilla stores and sends it: MessagePack with
/// struct fields by name, and sequences of bytes (`Vec<u8>`, `&[u8]`,
/// `Box<[u8]>`) as MessagePack `bin` rather than as arrays of integers, so
/// that bytes stay bytes without `serde_bytes`. Any `Vec<u8>` decodes from
/// `bin` and from an array alike.
///
/// ```
/// let bytes = vec![0xffu8; 1000];
/// let mut encoded = Vec::new();
/// flotilla_proto::write_value(&mut encoded, &bytes).unwrap();
/// assert!(encoded.len() < 1010); // an array of integers would take ~2,000
/// let back: Vec<u8> = rmp_serde::from_slice(&encoded).unwrap();
/// assert_eq!(back, bytes);
/// ```
pub fn write_value<W: std::io::Write, T: Serialize + ?Sized>(
    out: &mut W,
    value: &T,
) -> Result<(), rmp_serde::encode::Error> {
    let mut serializer = rmp_serde::Serializer::new(out)
        .with_struct_map()
        .with_bytes(rmp_serde::config::BytesMode::ForceIterables);
    value.serialize(&mut serializer)
}

/// [`write_value`] into a new buffer.
pub fn value_to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    let mut out = Vec::new();
    write_value(&mut out, value)?;
    Ok(out)
}

/// [`value_to_vec`] in at most `limit` bytes: encoding stops as soon as the
/// limit is passed, so that a large value costs `limit` bytes of work, not
/// all of it. `Ok(Err(size))` then, `size` being how many bytes the write
/// that passed the limit would have made.
pub fn value_to_vec_within<T: Serialize + ?Sized>(
    value: &T,
    limit: usize,
) -> Result<Result<Vec<u8>, usize>, rmp_serde::encode::Error> {
    let mut out = Capped {
        bytes: Vec::new(),
        limit,
        passed: None,
    };
    match write_value(&mut out, value) {
        Ok(()) => Ok(Ok(out.bytes)),
        Err(_) if out.passed.is_some() => Ok(Err(out.passed.unwrap_or(usize::MAX))),
        Err(error) => Err(error),
    }
}

/// A buffer that refuses to grow past `limit` bytes.
struct Capped {
    bytes: Vec<u8>,
    limit: usize,
    /// How many bytes the write that passed the limit would have made.
    passed: Option<usize>,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let total = self.bytes.len().saturating_add(buf.len());
        if total > self.limit {
            self.passed = Some(total);
            return Err(std::io::Error::other("over the limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Blob {
        name: String,
        data: Vec<u8>,
        parts: Vec<Vec<u8>>,
        small: Vec<u16>,
        flags: Vec<bool>,
    }

    #[test]
    fn bytes_travel_as_bin_and_everything_round_trips() {
        let blob = Blob {
            name: "b".into(),
            data: (0..=255).collect(),
            parts: vec![vec![1, 2, 3], vec![]],
            small: vec![1, 300],
            flags: vec![true, false],
        };
        let encoded = value_to_vec(&blob).unwrap();
        // 256 bytes as bin: a 3-byte header and the bytes; as an array of
        // integers the values 128..=255 would take two bytes each.
        let bin = [0xc5u8, 0x01, 0x00];
        assert!(encoded.windows(3).any(|w| w == bin), "{encoded:02x?}");
        assert!(encoded.len() < 256 + 80, "{} bytes", encoded.len());
        let back: Blob = rmp_serde::from_slice(&encoded).unwrap();
        assert_eq!(back, blob);
        // What older encoders wrote (arrays of integers) still decodes.
        let old = rmp_serde::to_vec_named(&blob).unwrap();
        assert_eq!(rmp_serde::from_slice::<Blob>(&old).unwrap(), blob);
    }

    #[test]
    fn a_tuple_of_arguments_keeps_its_shape() {
        let args = (vec![7u8; 3], 5i64, String::from("x"));
        let encoded = value_to_vec(&args).unwrap();
        assert_eq!(encoded[0], 0x93, "a 3-element array");
        let back: (Vec<u8>, i64, String) = rmp_serde::from_slice(&encoded).unwrap();
        assert_eq!(back, args);
    }
}
