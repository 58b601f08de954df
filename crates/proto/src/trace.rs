//! W3C trace context (`traceparent`) carried with each task.
//!
//! A [`TraceParent`] names a trace (16 random bytes) and the span inside it
//! that caused the next step (8 bytes), in the text form of the W3C Trace
//! Context recommendation, version `00`:
//!
//! ```text
//! 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01
//! ^^ ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^ ^^^^^^^^^^^^^^^^ ^^
//! version        trace id             parent span id   flags
//! ```
//!
//! A client sends one in [`TaskSpec::traceparent`](crate::TaskSpec); the
//! worker records its trace id and parent span id on the task's span, and a
//! task submitting tasks passes the trace on with a span id of its own.
//!
//! ```
//! use flotilla_proto::TraceParent;
//!
//! let parent: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
//!     .parse()
//!     .unwrap();
//! let child = parent.child();
//! assert_eq!(child.trace_id(), parent.trace_id());
//! assert_ne!(child.span_id(), parent.span_id());
//! ```

use std::fmt;
use std::str::FromStr;

/// A W3C `traceparent`: trace id, parent span id and flags (version `00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
}

/// Why a `traceparent` string was refused by [`TraceParent::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TraceParentError {
    /// Not four `-`-separated fields of 2, 32, 16 and 2 lowercase hex digits.
    #[error("a traceparent is `00-<32 hex digits>-<16 hex digits>-<2 hex digits>`, got {0:?}")]
    Malformed(String),
    /// A version other than `00` (or the invalid `ff`).
    #[error("traceparent version {0:?} is not supported (only `00`)")]
    Version(String),
    /// An all-zero trace id or span id, which the recommendation forbids.
    #[error("a traceparent's trace id and span id must not be all zeros")]
    Zero,
}

impl TraceParent {
    /// The `sampled` flag (bit 0 of the flags).
    pub const SAMPLED: u8 = 0x01;

    /// A traceparent from its parts; `None` when the trace id or span id is
    /// all zeros (invalid in W3C trace context).
    pub fn new(trace_id: [u8; 16], span_id: [u8; 8], flags: u8) -> Option<Self> {
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The root of a new trace: a random trace id and span id, sampled.
    pub fn generate() -> Self {
        let random = uuid::Uuid::new_v4().into_bytes();
        TraceParent {
            trace_id: random,
            span_id: random_span_id(),
            flags: Self::SAMPLED,
        }
    }

    /// The same trace with a new, random span id: what a step caused by
    /// this one passes on as its own parent.
    pub fn child(&self) -> Self {
        TraceParent {
            span_id: random_span_id(),
            ..*self
        }
    }

    /// The trace id (16 bytes).
    pub fn trace_id(&self) -> [u8; 16] {
        self.trace_id
    }

    /// The parent span id (8 bytes).
    pub fn span_id(&self) -> [u8; 8] {
        self.span_id
    }

    /// The trace flags (see [`TraceParent::SAMPLED`]).
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The parent span id as 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }
}

fn random_span_id() -> [u8; 8] {
    loop {
        let bytes = uuid::Uuid::new_v4().into_bytes();
        let mut span = [0; 8];
        span.copy_from_slice(&bytes[..8]);
        if span != [0; 8] {
            return span;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, byte| {
            let _ = write!(out, "{byte:02x}");
            out
        })
}

/// Fills `out` from lowercase hex digits (W3C forbids uppercase).
fn unhex(text: &str, out: &mut [u8]) -> bool {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    if text.len() != out.len() * 2 {
        return false;
    }
    for (byte, pair) in out.iter_mut().zip(text.as_bytes().chunks(2)) {
        match (digit(pair[0]), digit(pair[1])) {
            (Some(high), Some(low)) => *byte = high << 4 | low,
            _ => return false,
        }
    }
    true
}

impl FromStr for TraceParent {
    type Err = TraceParentError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let malformed = || TraceParentError::Malformed(text.chars().take(80).collect());
        let mut fields = text.trim().split('-');
        let (Some(version), Some(trace), Some(span), Some(flags), None) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return Err(malformed());
        };
        let mut version_byte = [0; 1];
        if !unhex(version, &mut version_byte) {
            return Err(malformed());
        }
        if version_byte[0] != 0 {
            return Err(TraceParentError::Version(version.to_owned()));
        }
        let mut trace_id = [0; 16];
        let mut span_id = [0; 8];
        let mut flag_byte = [0; 1];
        if !(unhex(trace, &mut trace_id)
            && unhex(span, &mut span_id)
            && unhex(flags, &mut flag_byte))
        {
            return Err(malformed());
        }
        TraceParent::new(trace_id, span_id, flag_byte[0]).ok_or(TraceParentError::Zero)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id_hex(),
            self.span_id_hex(),
            self.flags
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_traceparent_parses_and_formats_back() {
        let parsed: TraceParent = EXAMPLE.parse().unwrap();
        assert_eq!(parsed.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parsed.span_id_hex(), "00f067aa0ba902b7");
        assert_eq!(parsed.trace_id()[0], 0x4b);
        assert_eq!(parsed.span_id()[7], 0xb7);
        assert_eq!(parsed.flags(), TraceParent::SAMPLED);
        assert_eq!(parsed.to_string(), EXAMPLE);
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        let refused = |text: &str| text.parse::<TraceParent>().unwrap_err();
        for text in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            assert!(
                matches!(refused(text), TraceParentError::Malformed(_)),
                "{text:?} was not refused as malformed"
            );
        }
        assert_eq!(
            refused("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            TraceParentError::Version("01".into())
        );
        assert_eq!(
            refused("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            TraceParentError::Zero
        );
        assert_eq!(
            refused("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            TraceParentError::Zero
        );
    }

    #[test]
    fn generated_traces_are_valid_and_distinct() {
        let first = TraceParent::generate();
        let second = TraceParent::generate();
        assert_ne!(first.trace_id(), second.trace_id());
        assert_ne!(first.trace_id(), [0; 16]);
        assert_eq!(first.flags(), TraceParent::SAMPLED);
        assert_eq!(first.to_string().parse::<TraceParent>().unwrap(), first);
    }

    #[test]
    fn a_child_keeps_the_trace_and_flags_with_a_new_span() {
        let parent: TraceParent = EXAMPLE.parse().unwrap();
        let child = parent.child();
        assert_eq!(child.trace_id(), parent.trace_id());
        assert_eq!(child.flags(), parent.flags());
        assert_ne!(child.span_id(), parent.span_id());
        assert_ne!(child.span_id(), [0; 8]);
    }

    #[test]
    fn parts_that_are_all_zeros_make_no_traceparent() {
        assert!(TraceParent::new([0; 16], [1; 8], 0).is_none());
        assert!(TraceParent::new([1; 16], [0; 8], 0).is_none());
        assert_eq!(
            TraceParent::new([0xab; 16], [0xcd; 8], 0)
                .unwrap()
                .to_string(),
            format!("00-{}-{}-00", "ab".repeat(16), "cd".repeat(8))
        );
    }
}
