//! Hostile input for every decoder of network bytes: random byte strings
//! and mutations (bit flips, truncations, splices, extensions) of valid
//! messages. Every decoder must return an error or a value — never panic,
//! never allocate without bound. A bounded number of cases runs with the
//! unit tests; `FLOTILLA_FUZZ_CASES` raises it for a long run.

#![cfg(test)]

use crate::{
    decode, encode, Arg, ErrorKind, Event, EventBatch, RunTask, StoredResult, TaskError, TaskSpec,
    ToScheduler, ToWorker, WorkerInfo,
};

/// xorshift64*: a small deterministic generator, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn cases() -> usize {
    std::env::var("FLOTILLA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn seeds() -> Vec<Vec<u8>> {
    let spec = TaskSpec::new(
        "add-1".into(),
        "demo::add".into(),
        7,
        rmp_serde::to_vec(&vec![
            Arg::Value(vec![1, 2]),
            Arg::List(vec![Arg::Ref("k".into())]),
        ])
        .unwrap(),
        vec!["k".into()],
        "client".into(),
    );
    let error = TaskError::new(ErrorKind::Panic, "panic", "boom").at("add-1", "demo::add");
    vec![
        encode(&ToScheduler::Submit {
            tasks: vec![spec.clone()],
            sent: vec![],
        }),
        encode(&ToScheduler::Worker(WorkerInfo {
            id: "w".into(),
            name: "n".into(),
            slots: 2,
            tasks: vec![("t".into(), 1)],
            resources: vec![("GPU".into(), 1)],
            rss_bytes: Some(1 << 20),
            cpu_ms: Some(10),
        })),
        encode(&ToScheduler::Forget {
            keys: vec!["a".into()],
        }),
        encode(&ToWorker::Run {
            epoch: 0,
            tasks: vec![RunTask {
                spec,
                inline: vec![("k".into(), serde_bytes::ByteBuf::from(vec![3]))],
                attempt: 0,
            }],
        }),
        encode(&EventBatch {
            worker: "w".into(),
            events: vec![
                Event::Finished {
                    key: "a".into(),
                    inline: Some(vec![1]),
                    size: 1,
                    run_us: 0,
                },
                Event::Erred {
                    key: "b".into(),
                    error: error.clone(),
                    retrying: false,
                },
            ],
        }),
        StoredResult::encode_err(&error),
        StoredResult::encode_ok(&[0x92, 1, 2]),
    ]
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(5) {
            0 if !bytes.is_empty() => {
                let at = rng.below(bytes.len());
                bytes[at] ^= 1 << rng.below(8);
            }
            1 => bytes.truncate(rng.below(bytes.len() + 1)),
            2 if !bytes.is_empty() => {
                let at = rng.below(bytes.len());
                bytes[at] = rng.next() as u8;
            }
            3 => {
                // Huge length prefixes (array, map, bin, str of 2^32-1).
                let marker = [0xdd, 0xdf, 0xc6, 0xdb][rng.below(4)];
                let at = rng.below(bytes.len() + 1);
                bytes.splice(at..at, [marker, 0xff, 0xff, 0xff, 0xff]);
            }
            _ => bytes.extend((0..rng.below(16)).map(|_| rng.next() as u8)),
        }
    }
    bytes
}

fn sealed() -> crate::Codec {
    crate::Codec::new(&crate::Config {
        secret: Some(crate::Secret::new("fuzz")),
        ..crate::Config::default()
    })
}

/// Every signed decoder, as each consumer calls it.
fn open_everything(codec: &crate::Codec, bytes: &[u8]) -> bool {
    use crate::{Purpose, ReplayGuard};
    let limit = 1 << 20;
    let guard = ReplayGuard::new();
    [
        codec
            .open::<ToScheduler>(Purpose::ToScheduler, bytes, false, &guard, limit)
            .is_ok(),
        codec
            .open_aged::<ToWorker>(Purpose::ToWorker, bytes, true, &guard, limit)
            .is_ok(),
        codec
            .open::<EventBatch>(Purpose::Events, bytes, false, &guard, limit)
            .is_ok(),
        codec
            .decode::<TaskSpec>(Purpose::Spec, bytes, limit)
            .is_ok(),
        codec.open_result("k", bytes.to_vec()).is_ok(),
    ]
    .contains(&true)
}

fn decode_everything(bytes: &[u8]) {
    let limit = 1 << 20;
    let _ = open_everything(&sealed(), bytes);
    let _ = decode::<ToScheduler>(bytes, limit);
    let _ = decode::<ToWorker>(bytes, limit);
    let _ = decode::<EventBatch>(bytes, limit);
    let _ = decode::<TaskError>(bytes, limit);
    let _ = StoredResult::decode(bytes.to_vec());
    let _ = rmp_serde::from_slice::<Vec<Arg>>(bytes);
}

#[test]
fn random_bytes_never_crash_a_decoder() {
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    for _ in 0..cases() {
        let len = rng.below(64);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        decode_everything(&bytes);
        let mut versioned = vec![crate::WIRE_VERSION];
        versioned.extend(&bytes);
        decode_everything(&versioned);
    }
}

#[test]
fn mutated_messages_never_crash_a_decoder() {
    let mut rng = Rng(0x0dd_ba11_cafe_f00d);
    let seeds = seeds();
    for seed in &seeds {
        decode_everything(seed);
    }
    for _ in 0..cases() {
        let seed = &seeds[rng.below(seeds.len())];
        decode_everything(&mutate(&mut rng, seed));
    }
}

#[test]
fn altered_signed_messages_are_always_refused() {
    let codec = sealed();
    let mut rng = Rng(0x5191_eed0_feed_0001);
    let seeds: Vec<Vec<u8>> = seeds()
        .into_iter()
        .filter(|seed| seed.first() == Some(&crate::WIRE_VERSION))
        .map(|seed| {
            // Re-sealed: the same message as its signed envelope.
            let message: ToScheduler = match crate::decode(&seed, usize::MAX) {
                Ok(message) => message,
                Err(_) => ToScheduler::Forget { keys: vec![] },
            };
            codec.encode(crate::Purpose::ToScheduler, &message)
        })
        .collect();
    let mut refused = 0;
    for _ in 0..cases() {
        let seed = &seeds[rng.below(seeds.len())];
        let altered = mutate(&mut rng, seed);
        if altered != *seed {
            assert!(
                !open_everything(&codec, &altered),
                "an altered signed message was accepted"
            );
            refused += 1;
        }
    }
    assert!(refused > cases() / 2);
}

#[test]
fn oversized_messages_are_refused_before_decoding() {
    let big = vec![crate::WIRE_VERSION; 2 << 20];
    assert!(matches!(
        decode::<ToScheduler>(&big, 1 << 20),
        Err(crate::DecodeError::TooLarge { .. })
    ));
}
