//! How task arguments are written: a value, or a future of that value's
//! type (also inside a `Vec`), wherever the task takes a `T`.
//!
//! ```no_run
//! # use flotilla::prelude::*;
//! # #[flotilla::task] fn add(x: i64, y: i64) -> i64 { x + y }
//! # #[flotilla::task] fn total(xs: Vec<i64>) -> i64 { xs.iter().sum() }
//! # async fn demo(client: Client) -> flotilla::Result<()> {
//! let a = client.submit(add, (1, 2));
//! let b = client.submit(add, (&a, 10));           // waits for `a`
//! let parts = client.map(add, (0..4).map(|i| (i, i)));
//! let sum = client.submit(total, (parts,));       // Vec<TaskFuture<i64>> arrives as Vec<i64>
//! # Ok(()) }
//! ```
//!
//! # Large values
//!
//! An argument value whose encoding is over [`INLINE_ARG_MAX`] (or that
//! would take the submission's arguments over `FLOTILLA_MAX_PAYLOAD`) does
//! not travel in the task's message: the client scatters it (keyed by its
//! content, like [`Client::scatter`](crate::Client::scatter)) and passes a
//! reference, as if the program had scattered it and passed the future
//! (Ray's automatic `put` of large arguments). The task holds it until it
//! ends; then it is freed. So a task argument may be of any size.

use crate::error::Error;
use crate::future::{FutureRef, TaskFuture};
use flotilla_proto::Arg;
use serde::Serialize;

/// The largest encoded argument value sent inside a task's message (1 MiB).
/// A larger one (or one that would take the submission's arguments over
/// `FLOTILLA_MAX_PAYLOAD`) is scattered by the client, keyed by its content,
/// and passed by reference, as if the program had scattered it and passed
/// the future: the task holds it until it ends, then it is freed. So
/// messages stay small however large the arguments.
pub const INLINE_ARG_MAX: usize = 1 << 20;

/// Collects what a submission's arguments refer to, and encodes its values
/// within the payload limit.
#[derive(Debug)]
pub struct ArgWriter {
    pub(crate) deps: Vec<String>,
    pub(crate) holds: Vec<String>,
    /// Values scattered implicitly (key, encoded value): the client stores
    /// them before the submission goes out (see the module docs).
    pub(crate) uploads: Vec<(String, Vec<u8>)>,
    /// Whether large values are scattered ([`ArgWriter::within`]) rather
    /// than refused over the limit.
    scatters: bool,
    /// The inputs' states, kept alive until the submission is queued.
    keep: Vec<std::sync::Arc<crate::state::FutureState>>,
    /// The payload limit, shared by all the arguments of a submission.
    limit: usize,
    /// Bytes of values encoded so far.
    written: usize,
    /// What the arguments are, in an error ("the arguments of `add`").
    what: String,
}

impl Default for ArgWriter {
    /// A writer with no payload limit.
    fn default() -> Self {
        ArgWriter {
            deps: Vec::new(),
            holds: Vec::new(),
            uploads: Vec::new(),
            scatters: false,
            keep: Vec::new(),
            limit: usize::MAX,
            written: 0,
            what: "the arguments".to_owned(),
        }
    }
}

impl ArgWriter {
    fn reference<T>(&mut self, future: &TaskFuture<T>) -> Arg {
        let key = future.key();
        if !self.deps.iter().any(|d| d == key) {
            self.deps.push(key.to_owned());
            self.keep.push(future.state.clone());
        }
        Arg::Ref(key.to_owned())
    }

    /// A writer for the arguments of one submission: together the values
    /// sent inside the message take at most `limit` bytes, larger ones are
    /// scattered; `what` names them in errors ("the arguments of `add`").
    pub(crate) fn within(limit: usize, what: String) -> Self {
        ArgWriter {
            limit,
            what,
            scatters: true,
            ..ArgWriter::default()
        }
    }

    /// Keeps an input's state alive until the submission is queued.
    pub(crate) fn keep(&mut self, state: std::sync::Arc<crate::state::FutureState>) {
        self.keep.push(state);
    }

    /// Encodes a plain value: inside the message when it is small, else
    /// scattered and passed by reference (see [`INLINE_ARG_MAX`]). A writer
    /// that does not scatter fails as soon as the arguments written so far
    /// pass the payload limit, without encoding the rest.
    pub fn value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<Arg, Error> {
        if self.scatters {
            let bytes = encode(value, || {
                format!("an argument of type {}", std::any::type_name::<T>())
            })?;
            if bytes.len() <= INLINE_ARG_MAX && self.written + bytes.len() <= self.limit {
                self.written += bytes.len();
                return Ok(Arg::Value(bytes));
            }
            let key = format!("arg-{}", crate::client::content_hash("scatter", 0, &bytes));
            if !self.deps.contains(&key) {
                self.deps.push(key.clone());
                self.uploads.push((key.clone(), bytes));
            }
            return Ok(Arg::Ref(key));
        }
        let room = self.limit.saturating_sub(self.written);
        let bytes = encode_within(value, room, || {
            format!("an argument of type {}", std::any::type_name::<T>())
        })
        .map_err(|error| match error {
            Error::PayloadTooLarge { size, .. } => Error::PayloadTooLarge {
                what: self.what.clone(),
                size: self.written.saturating_add(size),
                limit: self.limit,
            },
            other => other,
        })?;
        self.written += bytes.len();
        Ok(Arg::Value(bytes))
    }
}

/// Encodes `value` whole ([`flotilla_proto::write_value`]: named
/// MessagePack, bytes as `bin`), for values with no size limit (scattered
/// data, large arguments). `what` names the value in errors.
pub(crate) fn encode<T: Serialize + ?Sized>(
    value: &T,
    what: impl FnOnce() -> String,
) -> Result<Vec<u8>, Error> {
    encode_within(value, usize::MAX, what)
}

/// Encodes `value` ([`flotilla_proto::write_value`]: named MessagePack, bytes
/// as `bin`) in at most `limit` bytes: encoding stops as soon as the limit is
/// passed, so that an oversized value is refused after encoding `limit`
/// bytes rather than all of it. `what` names
/// the value in errors ("the arguments of `add`", "the scattered value").
pub(crate) fn encode_within<T: Serialize + ?Sized>(
    value: &T,
    limit: usize,
    what: impl FnOnce() -> String,
) -> Result<Vec<u8>, Error> {
    match flotilla_proto::value_to_vec_within(value, limit) {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(size)) => Err(Error::PayloadTooLarge {
            what: what(),
            size,
            limit,
        }),
        Err(error) => Err(Error::Encode {
            what: what(),
            message: error.to_string(),
        }),
    }
}

/// A value usable where a task takes a `T`: `T` itself, `TaskFuture<T>`,
/// `&TaskFuture<T>`, and for `Vec<T>` also `Vec<TaskFuture<T>>`/`Vec<&TaskFuture<T>>`.
pub trait IntoArg<T> {
    /// Writes the argument.
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg, Error>;
}

impl<T: Serialize> IntoArg<T> for T {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg, Error> {
        writer.value(&self)
    }
}

impl IntoArg<String> for &str {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg, Error> {
        writer.value(self)
    }
}

impl<T> IntoArg<T> for TaskFuture<T> {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg, Error> {
        Ok(writer.reference(&self))
    }
}

impl<T> IntoArg<T> for &TaskFuture<T> {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg, Error> {
        Ok(writer.reference(self))
    }
}

impl<T> IntoArg<Vec<T>> for Vec<TaskFuture<T>> {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg, Error> {
        Ok(Arg::List(
            self.iter().map(|f| writer.reference(f)).collect(),
        ))
    }
}

impl<T> IntoArg<Vec<T>> for &Vec<TaskFuture<T>> {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg, Error> {
        Ok(Arg::List(
            self.iter().map(|f| writer.reference(f)).collect(),
        ))
    }
}

impl<T> IntoArg<Vec<T>> for &[TaskFuture<T>] {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg, Error> {
        Ok(Arg::List(
            self.iter().map(|f| writer.reference(f)).collect(),
        ))
    }
}

impl<T> IntoArg<Vec<T>> for Vec<&TaskFuture<T>> {
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg, Error> {
        Ok(Arg::List(
            self.iter().map(|f| writer.reference(*f)).collect(),
        ))
    }
}

impl<T> IntoArg<FutureRef<T>> for &TaskFuture<T> {
    /// Passes the future itself, not its value: the task starts without
    /// waiting for it, and the key is held for the task until it ends.
    fn into_arg(self, writer: &mut ArgWriter) -> Result<Arg, Error> {
        if !writer.holds.iter().any(|k| k == self.key()) {
            writer.holds.push(self.key().to_owned());
            writer.keep.push(self.state.clone());
        }
        writer.value(&self.to_ref())
    }
}

/// A tuple of arguments for a task whose parameters are the tuple `A`.
pub trait IntoArgs<A> {
    /// Writes every argument.
    fn into_args(self, writer: &mut ArgWriter) -> Result<Vec<Arg>, Error>;
}

impl IntoArgs<()> for () {
    fn into_args(self, _: &mut ArgWriter) -> Result<Vec<Arg>, Error> {
        Ok(Vec::new())
    }
}

macro_rules! tuple_args {
    ($($value:ident $param:ident),+) => {
        impl<$($value, $param: IntoArg<$value>),+> IntoArgs<($($value,)+)> for ($($param,)+) {
            #[allow(non_snake_case)]
            fn into_args(self, writer: &mut ArgWriter) -> Result<Vec<Arg>, Error> {
                let ($($param,)+) = self;
                Ok(vec![$($param.into_arg(writer)?),+])
            }
        }
    };
}

tuple_args!(A0 X0);
tuple_args!(A0 X0, A1 X1);
tuple_args!(A0 X0, A1 X1, A2 X2);
tuple_args!(A0 X0, A1 X1, A2 X2, A3 X3);
tuple_args!(A0 X0, A1 X1, A2 X2, A3 X3, A4 X4);
tuple_args!(A0 X0, A1 X1, A2 X2, A3 X3, A4 X4, A5 X5);
tuple_args!(A0 X0, A1 X1, A2 X2, A3 X3, A4 X4, A5 X5, A6 X6);
tuple_args!(A0 X0, A1 X1, A2 X2, A3 X3, A4 X4, A5 X5, A6 X6, A7 X7);
tuple_args!(A0 X0, A1 X1, A2 X2, A3 X3, A4 X4, A5 X5, A6 X6, A7 X7, A8 X8);
tuple_args!(A0 X0, A1 X1, A2 X2, A3 X3, A4 X4, A5 X5, A6 X6, A7 X7, A8 X8, A9 X9);
tuple_args!(A0 X0, A1 X1, A2 X2, A3 X3, A4 X4, A5 X5, A6 X6, A7 X7, A8 X8, A9 X9, A10 X10);
tuple_args!(A0 X0, A1 X1, A2 X2, A3 X3, A4 X4, A5 X5, A6 X6, A7 X7, A8 X8, A9 X9, A10 X10, A11 X11);

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A sequence of `len` numbers that counts how many were serialized.
    struct Counted<'a> {
        len: usize,
        serialized: &'a Cell<usize>,
    }

    impl Serialize for Counted<'_> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeSeq;
            let mut seq = serializer.serialize_seq(Some(self.len))?;
            for i in 0..self.len {
                self.serialized.set(self.serialized.get() + 1);
                seq.serialize_element(&(i as u64 | 1 << 40))?;
            }
            seq.end()
        }
    }

    #[test]
    fn encoding_stops_as_soon_as_the_limit_is_passed() {
        let serialized = Cell::new(0);
        let huge = Counted {
            len: 10_000_000,
            serialized: &serialized,
        };
        let error = encode_within(&huge, 4096, || "the arguments of `f`".into()).unwrap_err();
        match error {
            Error::PayloadTooLarge { size, limit, what } => {
                assert_eq!((limit, what.as_str()), (4096, "the arguments of `f`"));
                assert!(size > limit && size <= limit + 16, "{size}");
            }
            other => panic!("expected PayloadTooLarge, got {other:?}"),
        }
        // Each element takes 9 bytes: encoding stopped within the limit's worth.
        assert!(serialized.get() <= 4096 / 9 + 1, "{}", serialized.get());

        let small = encode_within(&(1, "two"), 16, String::new).unwrap();
        assert_eq!(small, rmp_serde::to_vec_named(&(1, "two")).unwrap());
        let exact = encode_within(&(1, "two"), small.len(), String::new).unwrap();
        assert_eq!(exact, small);
        assert!(encode_within(&(1, "two"), small.len() - 1, String::new).is_err());
    }

    #[test]
    fn the_arguments_of_a_submission_share_one_limit() {
        let mut writer = ArgWriter {
            limit: 100,
            what: "the arguments of `f`".into(),
            ..ArgWriter::default()
        };
        writer.value(&vec![0u8; 60]).unwrap();
        match writer.value(&vec![0u8; 60]).unwrap_err() {
            Error::PayloadTooLarge { what, size, limit } => {
                assert_eq!((what.as_str(), limit), ("the arguments of `f`", 100));
                assert!(size > 100, "{size}");
            }
            other => panic!("expected PayloadTooLarge, got {other:?}"),
        }
        assert!(ArgWriter::default().value(&vec![0u8; 1 << 20]).is_ok());
    }

    #[test]
    fn large_arguments_are_scattered_and_passed_by_reference() {
        let mut writer = ArgWriter::within(100, "the arguments of `f`".into());
        let small = writer.value(&vec![1u8; 60]).unwrap();
        assert!(matches!(small, Arg::Value(_)), "{small:?}");
        // Over the submission's limit: passed by reference.
        let second = writer.value(&vec![2u8; 60]).unwrap();
        // Over INLINE_ARG_MAX on its own, twice: one upload, one dependency.
        let big = vec![3u8; INLINE_ARG_MAX];
        let third = writer.value(&big).unwrap();
        let again = writer.value(&big).unwrap();
        let keys: Vec<String> = [second, third, again]
            .into_iter()
            .map(|arg| match arg {
                Arg::Ref(key) => key,
                other => panic!("expected a reference, got {other:?}"),
            })
            .collect();
        assert_eq!(keys[1], keys[2], "keyed by content");
        assert!(keys.iter().all(|key| key.starts_with("arg-")), "{keys:?}");
        assert_eq!(writer.deps, keys[..2]);
        let uploads: Vec<(&str, usize)> = writer
            .uploads
            .iter()
            .map(|(key, bytes)| (key.as_str(), bytes.len()))
            .collect();
        let length = |value: &Vec<u8>| encode(value, String::new).unwrap().len();
        assert_eq!(
            uploads,
            [
                (keys[0].as_str(), length(&vec![2u8; 60])),
                (keys[1].as_str(), length(&big))
            ]
        );
        assert!(length(&big) > INLINE_ARG_MAX);
        assert_eq!(
            writer.written,
            length(&vec![1u8; 60]),
            "only the inline value counts"
        );
    }
}
