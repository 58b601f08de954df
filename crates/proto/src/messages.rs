//! Typed messages, one enum per direction.

use crate::{RetryPolicy, TaskError};
use serde::{Deserialize, Serialize};

/// One argument of a task as it travels on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arg {
    /// A MessagePack-encoded value.
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The result of another task (or scattered data), by key; the worker
    /// substitutes the value.
    Ref(String),
    /// A sequence whose elements may be values or references; arrives at the
    /// task as one `Vec`.
    List(Vec<Arg>),
}

impl Arg {
    /// Calls `f` for every key this argument refers to.
    pub fn for_each_ref<'a>(&'a self, f: &mut impl FnMut(&'a str)) {
        match self {
            Arg::Value(_) => {}
            Arg::Ref(key) => f(key),
            Arg::List(items) => items.iter().for_each(|item| item.for_each_ref(f)),
        }
    }
}

/// A task as submitted by a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The task's key, unique in the namespace.
    pub key: String,
    /// Registered name of the function.
    pub task: String,
    /// Signature fingerprint the client was built with.
    pub fingerprint: u64,
    /// MessagePack of `Vec<Arg>`; opaque to the scheduler.
    #[serde(with = "serde_bytes")]
    pub args: Vec<u8>,
    /// Keys this task waits for (every `Arg::Ref` in `args`, once each).
    #[serde(default)]
    pub deps: Vec<String>,
    /// Keys the task receives as references (`FutureRef`) rather than values:
    /// it doesn't wait for them, but they are held for it until it ends.
    #[serde(default)]
    pub holds: Vec<String>,
    /// Higher runs first.
    #[serde(default)]
    pub priority: i32,
    /// Id of the submitting client, where completion events go.
    pub client: String,
    /// How many times to re-run the task if it fails.
    #[serde(default)]
    pub retries: u32,
    /// Workers (ids or names) the task must run on.
    #[serde(default)]
    pub workers: Vec<String>,
    /// With `workers`: run elsewhere when none of them is alive.
    #[serde(default)]
    pub allow_other_workers: bool,
    /// Abstract resources the task needs while it runs (`("GPU", 1)`);
    /// only workers that advertise them get it.
    #[serde(default)]
    pub resources: Vec<(String, u64)>,
    /// The task's time limit in milliseconds, set per submission: 0 uses
    /// the task's own default (`#[flotilla::task(timeout = "30s")]`),
    /// [`TaskSpec::NO_TIME_LIMIT`] runs it without a limit, any other value
    /// limits it to that many milliseconds.
    #[serde(default)]
    pub timeout_ms: u64,
    /// When and on which errors a failure is retried (with
    /// [`TaskSpec::retries`] left): the default retries at once, on any
    /// error a retry can mend.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// The task does not start before this wall-clock time, in milliseconds
    /// since the Unix epoch (0: as soon as its inputs are done). Absolute,
    /// so that a scheduler that takes the task up from its stored spec
    /// honours it too.
    #[serde(default)]
    pub start_at_ms: u64,
    /// The W3C trace context the task runs in (`00-<trace id>-<parent span
    /// id>-<flags>`, see [`crate::TraceParent`]): the worker records it on
    /// the task's span. Carried in the spec rather than in an AMQP header so
    /// that it survives every hop and a scheduler that takes the task up
    /// from its stored spec. A malformed one is ignored, never a failure.
    #[serde(default)]
    pub traceparent: Option<String>,
}

impl TaskSpec {
    /// The [`TaskSpec::timeout_ms`] of a task run without a time limit, even
    /// if its function has a default.
    pub const NO_TIME_LIMIT: u64 = u64::MAX;

    /// Every key the task holds while it lives: its inputs and its references.
    pub fn held_keys(&self) -> impl Iterator<Item = &String> {
        self.deps.iter().chain(self.holds.iter())
    }

    /// A spec with no options set.
    pub fn new(
        key: String,
        task: String,
        fingerprint: u64,
        args: Vec<u8>,
        deps: Vec<String>,
        client: String,
    ) -> Self {
        TaskSpec {
            key,
            task,
            fingerprint,
            args,
            deps,
            holds: Vec::new(),
            priority: 0,
            client,
            retries: 0,
            workers: Vec::new(),
            allow_other_workers: false,
            resources: Vec::new(),
            timeout_ms: 0,
            retry: RetryPolicy::default(),
            start_at_ms: 0,
            traceparent: None,
        }
    }
}

/// Messages the scheduler consumes from its queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ToScheduler {
    /// New tasks from a client, in submission order.
    Submit {
        /// The tasks.
        tasks: Vec<TaskSpec>,
        /// Keys of `tasks` the client published to the shared task queue
        /// itself: the scheduler counts them as sent (its
        /// `Core::submit_sent`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        sent: Vec<String>,
    },
    /// A worker announces itself (periodically, as a heartbeat).
    Worker(WorkerInfo),
    /// A worker is shutting down cleanly.
    WorkerGone {
        /// The worker's id.
        worker: String,
    },
    /// These keys lost their last holder: cancel them if they haven't run.
    Forget {
        /// The keys.
        keys: Vec<String>,
    },
    /// `client` wants completion events for these keys (it holds them
    /// without having submitted them).
    Watch {
        /// The client.
        client: String,
        /// The keys.
        keys: Vec<String>,
    },
    /// Cancel these tasks and their dependents.
    Cancel {
        /// The keys.
        keys: Vec<String>,
        /// Also stop them if a worker runs them.
        force: bool,
    },
    /// Run these failed tasks (and their failed inputs) again.
    Retry {
        /// The keys.
        keys: Vec<String>,
    },
}

/// What a worker tells the scheduler about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Unique id (also names its own queue).
    pub id: String,
    /// Human-readable name (`--name`, or host and pid).
    pub name: String,
    /// How many tasks it runs at once.
    pub slots: u32,
    /// The tasks it provides: registered name and signature fingerprint.
    pub tasks: Vec<(String, u64)>,
    /// Abstract resources it offers (`("GPU", 1)`).
    #[serde(default)]
    pub resources: Vec<(String, u64)>,
    /// Its resident memory in bytes when it sent this heartbeat (`None`:
    /// not known, on another OS than Linux or from an older worker).
    #[serde(default)]
    pub rss_bytes: Option<u64>,
    /// The CPU time its process used so far, user and system, in
    /// milliseconds (`None`: not known).
    #[serde(default)]
    pub cpu_ms: Option<u64>,
}

/// One task to run, as the scheduler sends it to workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunTask {
    /// The task.
    pub spec: TaskSpec,
    /// Small dependency results the scheduler already holds, by key, so the
    /// worker need not read them from Redis.
    #[serde(default)]
    pub inline: Vec<(String, serde_bytes::ByteBuf)>,
    /// How many times the task ran before (0 on the first run).
    #[serde(default)]
    pub attempt: u32,
}

/// Messages workers consume from the task queues.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ToWorker {
    /// A bundle of ready tasks; acknowledged once every one is stored.
    Run {
        /// The tasks.
        tasks: Vec<RunTask>,
        /// The fencing epoch of the scheduler that sent them (0: unfenced).
        /// Workers drop bundles of an epoch lower than one they have seen:
        /// they come from a deposed scheduler.
        #[serde(default)]
        epoch: u64,
    },
    /// Stop these tasks if they are running here (broadcast to all workers).
    Cancel {
        /// The keys.
        keys: Vec<String>,
    },
    /// These actors lost their last handle: the worker hosting any of them
    /// drops it (broadcast to all workers).
    DropActors {
        /// The actors' keys.
        keys: Vec<String>,
    },
}

/// Where an actor lives: the result of the task that created it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActorInfo {
    /// Id of the hosting worker.
    pub worker: String,
    /// The worker's actor queue, where calls are published.
    pub queue: String,
    /// The worker's data address, where a client may open a direct call
    /// connection instead (none: the worker has no data connection; older
    /// workers do not say).
    #[serde(default)]
    pub addr: Option<String>,
}

/// A method call on an actor, published straight to the hosting worker's
/// actor queue (bypassing the scheduler) with RabbitMQ's direct reply-to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActorCall {
    /// The actor's key.
    pub actor: String,
    /// The method's name.
    pub method: String,
    /// MessagePack of the method's argument tuple; opaque to the worker's
    /// runtime, decoded by the actor.
    #[serde(with = "serde_bytes")]
    pub args: Vec<u8>,
    /// The call's key: its result is stored under it, like a task's.
    pub call: String,
    /// The calling client, which holds the result.
    pub client: String,
}

/// The answer to an [`ActorCall`], sent to the caller's reply-to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActorReply {
    /// The call's key.
    pub call: String,
    /// The method's encoded output, or its error.
    pub outcome: Result<serde_bytes::ByteBuf, TaskError>,
}

/// A change in a task's state, published on the events exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Event {
    /// A worker has been running the task for a while (sent only for tasks
    /// that don't finish at once, to keep events cheap).
    Started {
        /// Task key.
        key: String,
    },
    /// The task finished and its result is stored in Redis.
    Finished {
        /// Task key.
        key: String,
        /// The result's encoded value when small, so no Redis read is needed.
        #[serde(default, with = "serde_bytes")]
        inline: Option<Vec<u8>>,
        /// Size of the stored value in bytes.
        size: u64,
        /// How long the task ran on its worker, in microseconds (0 when
        /// not measured): the scheduler learns each task name's duration
        /// from it to decide what it may bundle.
        #[serde(default)]
        run_us: u64,
    },
    /// The task failed; the error is stored in Redis too.
    Erred {
        /// Task key.
        key: String,
        /// What went wrong.
        error: TaskError,
        /// The task will run again (it has retries left): only the scheduler
        /// acts on this event.
        #[serde(default)]
        retrying: bool,
    },
}

impl Event {
    /// The key of the task this event is about.
    pub fn key(&self) -> &str {
        match self {
            Event::Started { key } | Event::Finished { key, .. } | Event::Erred { key, .. } => key,
        }
    }
}

/// Several events in one message, all for one client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBatch {
    /// Id of the worker that published it (empty when the scheduler did).
    pub worker: String,
    /// The events, in the order they happened.
    pub events: Vec<Event>,
}

/// A result as stored in Redis: the payload, then one tag byte. The tag
/// comes last so that taking it off a large value costs nothing (a
/// `truncate`, not a copy), and `GETRANGE key -1 -1` reads it alone.
#[derive(Debug, Clone, PartialEq)]
pub enum StoredResult {
    /// MessagePack of the task's output.
    Ok(Vec<u8>),
    /// The task's error.
    Err(TaskError),
    /// A large value kept in the memory of the worker that made it, to be
    /// fetched over its data connection (see [`Location`]).
    Kept(Location),
}

/// Where a large value made by a worker is kept (issue 15): stored under
/// the value's result key in place of the value, with the tag
/// [`TAG_KEPT`]. The holders and the release of the key are the same as
/// for a value in Redis; the worker drops its copy once the record is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    /// The id of the worker keeping the value.
    pub worker: String,
    /// The address of its data connection (`host:port`), as it advertises it.
    pub addr: String,
    /// The value's size in bytes (what a reader allocates).
    pub size: u64,
}

/// A stored success as one Redis argument (see [`StoredResult::ok_arg`] and
/// [`crate::seal::Codec::result_ok_arg`]): the value, its signature when
/// results are signed, then the tag.
#[derive(Debug, Clone)]
pub struct StoredOk<'a>(&'a [u8], Option<ring::hmac::Tag>);

impl<'a> StoredOk<'a> {
    pub(crate) fn new(value: &'a [u8], signature: Option<ring::hmac::Tag>) -> Self {
        StoredOk(value, signature)
    }

    /// The stored bytes in three pieces, to be written one after the other
    /// into a single argument: the value, its signature (empty when results
    /// are not signed), then the tag.
    pub fn pieces(&self) -> [&[u8]; 3] {
        let signature = self.1.as_ref().map_or(&[][..], |tag| tag.as_ref());
        [self.0, signature, &[TAG_OK]]
    }
}

/// Tag of a stored value.
pub const TAG_OK: u8 = 0;
/// Tag of a stored error.
pub const TAG_ERR: u8 = 1;
/// Tag of a [`Location`] record: the value is kept by a worker.
pub const TAG_KEPT: u8 = 2;

impl StoredResult {
    /// Encodes a value to store: its bytes, then the tag.
    pub fn encode_ok(value: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(value.len() + 1);
        out.extend_from_slice(value);
        out.push(TAG_OK);
        out
    }

    /// Encodes an error to store.
    pub fn encode_err(error: &TaskError) -> Vec<u8> {
        let mut out = crate::encode(error);
        out.push(TAG_ERR);
        out
    }

    /// Encodes a location record to store (unsigned; see
    /// [`crate::seal::Codec::result_kept`]).
    pub fn encode_kept(location: &Location) -> Vec<u8> {
        let mut out = crate::encode(location);
        out.push(TAG_KEPT);
        out
    }

    /// A value to store as one Redis argument: its bytes, then the tag,
    /// written straight into the command. Same bytes as
    /// [`StoredResult::encode_ok`], without the intermediate copy (a large
    /// result otherwise costs one more allocation and copy of its size).
    pub fn ok_arg(value: &[u8]) -> StoredOk<'_> {
        StoredOk(value, None)
    }

    /// Decodes a stored result.
    pub fn decode(mut bytes: Vec<u8>) -> Result<Self, crate::DecodeError> {
        match bytes.pop() {
            Some(TAG_OK) => Ok(StoredResult::Ok(bytes)),
            Some(TAG_ERR) => Ok(StoredResult::Err(crate::decode(&bytes, usize::MAX)?)),
            Some(TAG_KEPT) => Ok(StoredResult::Kept(crate::decode(&bytes, usize::MAX)?)),
            Some(found) => Err(crate::DecodeError::Version { found }),
            None => Err(crate::DecodeError::Empty),
        }
    }

    /// Borrows the value bytes of a stored success without copying, or
    /// `None` when the bytes hold an error.
    pub fn ok_slice(bytes: &[u8]) -> Option<&[u8]> {
        match bytes.split_last() {
            Some((&TAG_OK, rest)) => Some(rest),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode, ErrorKind};

    fn spec() -> TaskSpec {
        TaskSpec {
            key: "add-1".into(),
            task: "demo::add".into(),
            fingerprint: 7,
            args: encode(&vec![
                Arg::Value(vec![1]),
                Arg::List(vec![Arg::Ref("x".into())]),
            ]),
            deps: vec!["x".into()],
            holds: vec!["y".into()],
            priority: -3,
            client: "c1".into(),
            retries: 2,
            workers: vec!["w".into()],
            allow_other_workers: true,
            resources: vec![("GPU".into(), 1)],
            timeout_ms: 1500,
            retry: RetryPolicy {
                delay_ms: 250,
                backoff: 2.0,
                max_delay_ms: 4000,
                jitter: true,
                on: vec![ErrorKind::Panic.into(), "io::Error".into()],
            },
            start_at_ms: 1_765_000_000_000,
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        }
    }

    #[test]
    fn a_spec_from_before_retry_policies_decodes_with_the_defaults() {
        // The fields a client of an earlier version sent.
        #[derive(Serialize)]
        struct Older<'a> {
            key: &'a str,
            task: &'a str,
            fingerprint: u64,
            #[serde(with = "serde_bytes")]
            args: &'a [u8],
            client: &'a str,
            retries: u32,
            timeout_ms: u64,
        }
        let older = Older {
            key: "k",
            task: "demo::add",
            fingerprint: 7,
            args: &[0x90],
            client: "c",
            retries: 2,
            timeout_ms: 10,
        };
        let spec = decode::<TaskSpec>(&encode(&older), usize::MAX).unwrap();
        let mut expected = TaskSpec::new(
            "k".into(),
            "demo::add".into(),
            7,
            vec![0x90],
            vec![],
            "c".into(),
        );
        expected.retries = 2;
        expected.timeout_ms = 10;
        assert_eq!(spec, expected);
        assert_eq!(spec.retry, RetryPolicy::default());
        assert_eq!(spec.start_at_ms, 0);
        assert_eq!(spec.traceparent, None);
    }

    #[test]
    fn messages_round_trip() {
        let submit = ToScheduler::Submit {
            tasks: vec![spec()],
            sent: vec![],
        };
        assert_eq!(
            decode::<ToScheduler>(&encode(&submit), usize::MAX).unwrap(),
            submit
        );
        let submit = ToScheduler::Submit {
            tasks: vec![spec()],
            sent: vec!["k".into()],
        };
        assert_eq!(
            decode::<ToScheduler>(&encode(&submit), usize::MAX).unwrap(),
            submit
        );
        let run = ToWorker::Run {
            epoch: 3,
            tasks: vec![RunTask {
                spec: spec(),
                inline: vec![("x".into(), serde_bytes::ByteBuf::from(vec![9]))],
                attempt: 1,
            }],
        };
        assert_eq!(decode::<ToWorker>(&encode(&run), usize::MAX).unwrap(), run);
        let batch = EventBatch {
            worker: "w".into(),
            events: vec![
                Event::Finished {
                    key: "k".into(),
                    inline: Some(vec![1, 2]),
                    size: 2,
                    run_us: 0,
                },
                Event::Erred {
                    key: "e".into(),
                    error: TaskError::new(ErrorKind::User, "T", "m"),
                    retrying: true,
                },
            ],
        };
        assert_eq!(
            decode::<EventBatch>(&encode(&batch), usize::MAX).unwrap(),
            batch
        );
    }

    #[test]
    fn a_heartbeat_carries_memory_and_cpu_and_an_older_one_decodes() {
        let info = WorkerInfo {
            id: "w".into(),
            name: "n".into(),
            slots: 2,
            tasks: vec![("t".into(), 1)],
            resources: vec![],
            rss_bytes: Some(50 << 20),
            cpu_ms: Some(1_250),
        };
        let beat = ToScheduler::Worker(info.clone());
        assert_eq!(
            decode::<ToScheduler>(&encode(&beat), usize::MAX).unwrap(),
            beat
        );
        // A worker from before these fields: a map without them.
        #[derive(Serialize)]
        struct Older {
            id: &'static str,
            name: &'static str,
            slots: u32,
            tasks: Vec<(String, u64)>,
            resources: Vec<(String, u64)>,
        }
        let older = decode::<WorkerInfo>(
            &encode(&Older {
                id: "w",
                name: "n",
                slots: 2,
                tasks: vec![("t".into(), 1)],
                resources: vec![],
            }),
            usize::MAX,
        )
        .unwrap();
        assert_eq!(
            older,
            WorkerInfo {
                rss_bytes: None,
                cpu_ms: None,
                ..info
            }
        );
    }

    #[test]
    fn actor_messages_round_trip() {
        let call = ActorCall {
            actor: "Counter-1".into(),
            method: "increment".into(),
            args: vec![0x90],
            call: "increment-2".into(),
            client: "c".into(),
        };
        assert_eq!(
            decode::<ActorCall>(&encode(&call), usize::MAX).unwrap(),
            call
        );
        for outcome in [
            Ok(serde_bytes::ByteBuf::from(vec![1])),
            Err(TaskError::new(ErrorKind::User, "T", "m")),
        ] {
            let reply = ActorReply {
                call: "k".into(),
                outcome,
            };
            assert_eq!(
                decode::<ActorReply>(&encode(&reply), usize::MAX).unwrap(),
                reply
            );
        }
        let info = ActorInfo {
            worker: "w".into(),
            queue: "ns.actors.w".into(),
            addr: Some("127.0.0.1:7070".into()),
        };
        assert_eq!(
            decode::<ActorInfo>(&encode(&info), usize::MAX).unwrap(),
            info
        );
        // From a worker before direct calls: no address.
        let older = decode::<ActorInfo>(&encode(&("w", "ns.actors.w")), usize::MAX).unwrap();
        assert_eq!(older.addr, None);
        let drop = ToWorker::DropActors {
            keys: vec!["a".into()],
        };
        assert_eq!(
            decode::<ToWorker>(&encode(&drop), usize::MAX).unwrap(),
            drop
        );
    }

    #[test]
    fn refs_are_found_inside_lists() {
        let arg = Arg::List(vec![
            Arg::Ref("a".into()),
            Arg::Value(vec![]),
            Arg::List(vec![Arg::Ref("b".into())]),
        ]);
        let mut seen = vec![];
        arg.for_each_ref(&mut |k| seen.push(k.to_owned()));
        assert_eq!(seen, ["a", "b"]);
    }

    #[test]
    fn stored_results_round_trip() {
        let ok = StoredResult::encode_ok(&[5, 6]);
        assert_eq!(StoredResult::ok_slice(&ok), Some(&[5u8, 6][..]));
        assert_eq!(
            StoredResult::decode(ok).unwrap(),
            StoredResult::Ok(vec![5, 6])
        );
        let err = TaskError::new(ErrorKind::Panic, "panic", "boom");
        let bytes = StoredResult::encode_err(&err);
        assert_eq!(StoredResult::ok_slice(&bytes), None);
        assert_eq!(StoredResult::decode(bytes).unwrap(), StoredResult::Err(err));
    }

    #[test]
    fn a_stored_ok_argument_is_the_encoded_value() {
        let value: Vec<u8> = (0..=255).collect();
        assert_eq!(
            StoredResult::ok_arg(&value).pieces().concat(),
            StoredResult::encode_ok(&value)
        );
        assert_eq!(StoredResult::ok_arg(&[]).pieces().concat(), vec![TAG_OK]);
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        assert!(decode::<ToScheduler>(&[], 10).is_err());
        assert!(decode::<ToScheduler>(&[9, 1, 2], 10).is_err());
        assert!(decode::<ToScheduler>(&[1, 0xc1], 10).is_err());
        assert!(matches!(
            decode::<ToScheduler>(&[1; 11], 10),
            Err(crate::DecodeError::TooLarge { .. })
        ));
        assert!(StoredResult::decode(vec![7]).is_err());
    }
}
