//! A task's arguments as a worker holds them, decoded without first being
//! assembled into one buffer.
//!
//! A task spec's arguments are a list of [`Arg`]s: encoded values, references
//! to other tasks' results (the worker's inputs), and lists of both. Rather
//! than copying every input into one MessagePack array and decoding that,
//! [`Arguments::parts`] presents the list to the task's argument tuple as a
//! sequence whose elements are decoded where they lie, and under
//! [`decode_sharing`](flotilla_proto::decode_sharing): a
//! [`flotilla_proto::Bytes`] argument shares the input's buffer.

use flotilla_proto::Arg;
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use std::collections::HashMap;

/// The error type of decoding arguments (MessagePack's).
type Error = rmp_serde::decode::Error;

/// A task's arguments, ready to be decoded into its parameter tuple.
#[derive(Debug, Clone, Copy)]
pub struct Arguments<'a>(Repr<'a>);

#[derive(Debug, Clone, Copy)]
enum Repr<'a> {
    Encoded(&'a [u8]),
    Parts {
        items: &'a [Arg],
        inputs: &'a HashMap<String, bytes::Bytes>,
    },
}

impl<'a> Arguments<'a> {
    /// Arguments already encoded as one MessagePack array.
    pub fn encoded(bytes: &'a [u8]) -> Self {
        Arguments(Repr::Encoded(bytes))
    }

    /// Arguments as a spec lists them, each [`Arg::Ref`] read from
    /// `inputs` (the encoded results of the task's inputs).
    pub fn parts(items: &'a [Arg], inputs: &'a HashMap<String, bytes::Bytes>) -> Self {
        Arguments(Repr::Parts { items, inputs })
    }

    /// Decodes the arguments as `A`.
    pub(crate) fn decode<A: de::DeserializeOwned>(self) -> Result<A, Error> {
        match self.0 {
            Repr::Encoded(bytes) => match rmp_serde::from_slice(bytes) {
                // A task without parameters takes `()`, which MessagePack
                // spells nil, not the empty array `[0x90]` (the parts form
                // handles it in `List::deserialize_unit`).
                Err(_) if bytes == [0x90] => rmp_serde::from_slice(&[0xc0]),
                other => other,
            },
            Repr::Parts { items, inputs } => {
                flotilla_proto::decode_sharing(inputs.values().cloned(), || {
                    A::deserialize(List { items, inputs })
                })
            }
        }
    }
}

/// A list of arguments, decoded as a sequence (a tuple, a `Vec`, ...).
#[derive(Clone, Copy)]
struct List<'a> {
    items: &'a [Arg],
    inputs: &'a HashMap<String, bytes::Bytes>,
}

impl<'a> List<'a> {
    fn visit<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error>
    where
        'a: 'de,
    {
        let mut seq = Items {
            items: self.items.iter(),
            inputs: self.inputs,
        };
        let value = visitor.visit_seq(&mut seq)?;
        match seq.items.len() {
            0 => Ok(value),
            left => Err(de::Error::invalid_length(
                self.items.len(),
                &format!("{} arguments", self.items.len() - left).as_str(),
            )),
        }
    }
}

impl<'de, 'a: 'de> Deserializer<'de> for List<'a> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.visit(visitor)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        // A task without parameters takes `()`.
        if self.items.is_empty() {
            visitor.visit_unit()
        } else {
            self.visit(visitor)
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

/// The elements of a [`List`], one at a time.
struct Items<'a> {
    items: std::slice::Iter<'a, Arg>,
    inputs: &'a HashMap<String, bytes::Bytes>,
}

impl<'de, 'a: 'de> SeqAccess<'de> for Items<'a> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        let Some(item) = self.items.next() else {
            return Ok(None);
        };
        let encoded: &'a [u8] = match item {
            Arg::Value(bytes) => bytes,
            Arg::Ref(key) => match self.inputs.get(key) {
                Some(bytes) => bytes,
                None => {
                    return Err(de::Error::custom(format!(
                        "input `{key}` has no stored result"
                    )))
                }
            },
            Arg::List(items) => {
                return seed
                    .deserialize(List {
                        items,
                        inputs: self.inputs,
                    })
                    .map(Some)
            }
        };
        seed.deserialize(&mut rmp_serde::Deserializer::from_read_ref(encoded))
            .map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::Bytes;

    fn value<T: serde::Serialize>(v: &T) -> Arg {
        Arg::Value(flotilla_proto::value_to_vec(v).unwrap())
    }

    fn inputs(pairs: &[(&str, bytes::Bytes)]) -> HashMap<String, bytes::Bytes> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn values_refs_and_lists_decode_into_the_tuple() {
        let seven = bytes::Bytes::from(flotilla_proto::value_to_vec(&7i64).unwrap());
        let inputs = inputs(&[("a", seven)]);
        let items = vec![
            value(&1i64),
            Arg::Ref("a".into()),
            Arg::List(vec![Arg::Ref("a".into()), value(&5i64)]),
            value(&Some("x".to_string())),
        ];
        let decoded: (i64, i64, Vec<i64>, Option<String>) =
            Arguments::parts(&items, &inputs).decode().unwrap();
        assert_eq!(decoded, (1, 7, vec![7, 5], Some("x".into())));
        // The same list, assembled into one array, decodes alike.
        let unit: () = Arguments::parts(&[], &inputs).decode().unwrap();
        assert_eq!(unit, ());
    }

    #[test]
    fn a_bytes_input_is_shared_not_copied() {
        let data = bytes::Bytes::from(
            flotilla_proto::value_to_vec(&Bytes::from(vec![3u8; 1 << 20])).unwrap(),
        );
        let range = data.as_ptr_range();
        let inputs = inputs(&[("d", data)]);
        let items = vec![Arg::Ref("d".into()), Arg::Ref("d".into())];
        let (one, two): (Bytes, Vec<u8>) = Arguments::parts(&items, &inputs).decode().unwrap();
        assert_eq!(one.len(), 1 << 20);
        assert!(
            range.contains(&one.as_ptr()),
            "the Bytes argument shares the input"
        );
        assert_eq!(two, vec![3u8; 1 << 20]);
    }

    #[test]
    fn wrong_counts_and_missing_inputs_are_errors() {
        let inputs = inputs(&[]);
        let items = vec![value(&1i64), value(&2i64)];
        assert!(Arguments::parts(&items, &inputs)
            .decode::<(i64,)>()
            .is_err());
        assert!(Arguments::parts(&items, &inputs)
            .decode::<(i64, i64, i64)>()
            .is_err());
        assert!(Arguments::parts(&items, &inputs).decode::<()>().is_err());
        let missing = vec![Arg::Ref("gone".into())];
        let error = Arguments::parts(&missing, &inputs)
            .decode::<(i64,)>()
            .unwrap_err();
        assert!(error.to_string().contains("gone"), "{error}");
    }
}
