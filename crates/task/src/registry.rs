//! The registry of task functions compiled into this binary.
//!
//! `#[flotilla::task]` submits one [`TaskRegistration`] per function with
//! `inventory`; the worker looks tasks up here by name and checks the
//! signature fingerprint. Only registered functions ever run: no message can
//! make a worker execute anything else.

use crate::{Arguments, TaskContext};
use flotilla_proto::{Encoded, ErrorKind, TaskError};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;

/// A task's result: its MessagePack-encoded output (with room to seal it),
/// or its error.
pub type TaskOutcome = Result<Encoded, TaskError>;

/// How a task runs, as returned by its registered invoke function.
pub enum Invocation {
    /// Already decided (for instance, the arguments did not decode).
    Ready(TaskOutcome),
    /// A synchronous function, run on a blocking thread.
    Sync(Box<dyn FnOnce() -> TaskOutcome + Send>),
    /// An async function, run on the worker's runtime.
    Async(Pin<Box<dyn Future<Output = TaskOutcome> + Send>>),
}

impl std::fmt::Debug for Invocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Invocation::Ready(_) => "Invocation::Ready",
            Invocation::Sync(_) => "Invocation::Sync",
            Invocation::Async(_) => "Invocation::Async",
        })
    }
}

/// One registered task function.
#[derive(Debug)]
pub struct TaskRegistration {
    name: &'static str,
    fingerprint: u64,
    invoke: fn(TaskContext, Arguments<'_>) -> Invocation,
    module_path: &'static str,
    /// The default time limit in milliseconds; 0 for none.
    timeout_ms: u64,
}

impl TaskRegistration {
    /// A registration; `invoke` decodes the arguments and prepares the call.
    pub const fn new(
        name: &'static str,
        fingerprint: u64,
        invoke: fn(TaskContext, Arguments<'_>) -> Invocation,
    ) -> Self {
        TaskRegistration {
            name,
            fingerprint,
            invoke,
            module_path: "",
            timeout_ms: 0,
        }
    }

    /// The same registration, with a default time limit of `millis`
    /// milliseconds (`#[flotilla::task(timeout = "30s")]`; 0 for none). A
    /// submission's own limit (`Submit::timeout`) overrides it.
    pub const fn with_timeout_ms(mut self, millis: u64) -> Self {
        self.timeout_ms = millis;
        self
    }

    /// The task's default time limit, if it has one.
    pub fn timeout(&self) -> Option<std::time::Duration> {
        (self.timeout_ms > 0).then(|| std::time::Duration::from_millis(self.timeout_ms))
    }

    /// The time limit of one run, given the submission's
    /// [`TaskSpec::timeout_ms`](flotilla_proto::TaskSpec::timeout_ms): the
    /// task's default for 0, none for `NO_TIME_LIMIT`, else that many
    /// milliseconds.
    pub fn limit_for(&self, requested_ms: u64) -> Option<std::time::Duration> {
        match requested_ms {
            0 => self.timeout(),
            flotilla_proto::TaskSpec::NO_TIME_LIMIT => None,
            millis => Some(std::time::Duration::from_millis(millis)),
        }
    }

    /// The same registration, recording the module that defines the task
    /// (`module_path!()` where the function is written). A task's name may
    /// be anything (`name = "net.fetch"`); its module path says which crate
    /// it comes from, so that a worker can check that a task crate is linked.
    pub const fn with_module_path(mut self, module_path: &'static str) -> Self {
        self.module_path = module_path;
        self
    }

    /// The module that defines the task, as given to
    /// [`with_module_path`](Self::with_module_path) (`""` if never given).
    pub fn module_path(&self) -> &'static str {
        self.module_path
    }

    /// The crate that defines the task: the first segment of its module
    /// path, or of its name when no module path was recorded.
    pub fn crate_name(&self) -> &'static str {
        let path = if self.module_path.is_empty() {
            self.name
        } else {
            self.module_path
        };
        path.split("::").next().unwrap_or(path)
    }

    /// The stable name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The signature fingerprint.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Prepares a call with `args`, encoded as one MessagePack array.
    pub fn invoke(&self, ctx: TaskContext, args: &[u8]) -> Invocation {
        (self.invoke)(ctx, Arguments::encoded(args))
    }

    /// Prepares a call with `args` as a worker holds them (see [`Arguments`]).
    pub fn invoke_with(&self, ctx: TaskContext, args: Arguments<'_>) -> Invocation {
        (self.invoke)(ctx, args)
    }
}

inventory::collect!(TaskRegistration);

/// Every task registered in this binary, by name.
pub fn registry() -> &'static HashMap<&'static str, &'static TaskRegistration> {
    static REGISTRY: OnceLock<HashMap<&'static str, &'static TaskRegistration>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut map = HashMap::new();
        for registration in inventory::iter::<TaskRegistration> {
            if let Some(previous) = map.insert(registration.name, registration) {
                tracing::warn!(
                    name = previous.name,
                    "two tasks are registered under one name; the last one wins: give one a `name = \"...\"`"
                );
            }
        }
        map
    })
}

/// Decodes a task's (or an actor method's) argument tuple from one
/// MessagePack array, or explains why it doesn't fit.
pub fn decode_args<A: DeserializeOwned>(task: &str, bytes: &[u8]) -> Result<A, TaskError> {
    decode_arguments(task, Arguments::encoded(bytes))
}

/// Decodes a task's argument tuple, or explains why it doesn't fit.
pub fn decode_arguments<A: DeserializeOwned>(
    task: &str,
    args: Arguments<'_>,
) -> Result<A, TaskError> {
    args.decode().map_err(|error| {
        TaskError::new(
            ErrorKind::BadArguments,
            "flotilla::BadArguments",
            format!("arguments for task `{task}` do not match its parameters: {error}"),
        )
    })
}

/// Encodes a task's output.
pub fn encode_output<T: Serialize + ?Sized>(value: &T) -> TaskOutcome {
    Encoded::encode(value, flotilla_proto::seal::SEAL_ROOM).map_err(|error| {
        TaskError::new(
            ErrorKind::Internal,
            "flotilla::EncodeError",
            format!("the task's result could not be encoded: {error}"),
        )
    })
}

/// Builds the error of a task that returned `Err`; used by [`user_error!`](crate::user_error).
pub fn user_error(
    type_name: &str,
    message: String,
    detail: Option<String>,
    payload: Option<Vec<u8>>,
) -> TaskError {
    let error = TaskError::new(ErrorKind::User, type_name, message).with_payload(payload);
    match detail {
        Some(detail) => error.with_traceback(detail),
        None => error,
    }
}

/// Turns an error value into a [`TaskError`], keeping whatever the concrete
/// type offers: its `Display` (or `Debug`) message, its `Error::source`
/// chain and `Debug` form as the traceback, and its serde encoding as a
/// payload the client can decode back into the type.
#[macro_export]
macro_rules! user_error {
    ($error:expr) => {{
        #[allow(unused_imports)]
        use $crate::__probe::{
            ProbeDebug as _, ProbeDetail as _, ProbeDisplay as _, ProbeNoDetail as _,
            ProbeNoPayload as _, ProbePayload as _,
        };
        let error = $error;
        let probe = $crate::__probe::Probe(&error);
        $crate::__private_user_error(
            ::core::any::type_name_of_val(&error),
            (&probe).probe_message(),
            (&probe).probe_detail(),
            (&probe).probe_payload(),
        )
    }};
}

/// Probes used by [`user_error!`]: each pair picks the first method when the
/// error type has the capability, the second otherwise.
#[doc(hidden)]
pub mod probe {
    use serde::Serialize;
    use std::fmt::{Debug, Display};

    /// Wraps a reference to the error being probed.
    pub struct Probe<'a, E>(pub &'a E);

    /// Message from `Display`.
    pub trait ProbeDisplay {
        /// The message.
        fn probe_message(&self) -> String;
    }
    impl<E: Display> ProbeDisplay for Probe<'_, E> {
        fn probe_message(&self) -> String {
            self.0.to_string()
        }
    }
    /// Message from `Debug` when there is no `Display`.
    pub trait ProbeDebug {
        /// The message.
        fn probe_message(&self) -> String;
    }
    impl<E: Debug> ProbeDebug for &Probe<'_, E> {
        fn probe_message(&self) -> String {
            format!("{:?}", self.0)
        }
    }

    /// Traceback from the source chain and `Debug` form.
    pub trait ProbeDetail {
        /// The traceback text.
        fn probe_detail(&self) -> Option<String>;
    }
    impl<E: std::error::Error> ProbeDetail for Probe<'_, E> {
        fn probe_detail(&self) -> Option<String> {
            let mut text = format!("{:?}", self.0);
            let mut source = self.0.source();
            while let Some(cause) = source {
                text.push_str(&format!("\ncaused by: {cause}"));
                source = cause.source();
            }
            Some(text)
        }
    }
    /// Traceback from `Debug` only.
    pub trait ProbeNoDetail {
        /// The traceback text.
        fn probe_detail(&self) -> Option<String>;
    }
    impl<E: Debug> ProbeNoDetail for &Probe<'_, E> {
        fn probe_detail(&self) -> Option<String> {
            Some(format!("{:?}", self.0))
        }
    }

    /// Payload when the error is serializable.
    pub trait ProbePayload {
        /// The encoded error.
        fn probe_payload(&self) -> Option<Vec<u8>>;
    }
    impl<E: Serialize> ProbePayload for Probe<'_, E> {
        fn probe_payload(&self) -> Option<Vec<u8>> {
            flotilla_proto::value_to_vec(self.0).ok()
        }
    }
    /// No payload otherwise.
    pub trait ProbeNoPayload {
        /// Always `None`.
        fn probe_payload(&self) -> Option<Vec<u8>>;
    }
    impl<E> ProbeNoPayload for &Probe<'_, E> {
        fn probe_payload(&self) -> Option<Vec<u8>> {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
    enum MyError {
        Bad(u8),
    }
    impl std::fmt::Display for MyError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "bad thing")
        }
    }

    #[test]
    fn user_errors_keep_what_the_type_offers() {
        let error = crate::user_error!(MyError::Bad(3));
        assert_eq!(error.message(), "bad thing");
        assert!(error.type_name().ends_with("MyError"));
        let back: MyError = rmp_serde::from_slice(error.payload().unwrap()).unwrap();
        assert_eq!(back, MyError::Bad(3));

        let io = crate::user_error!(std::io::Error::other("disk"));
        assert_eq!(io.message(), "disk");
        assert!(io.payload().is_none());

        let text = crate::user_error!(String::from("Negative value"));
        assert_eq!(text.message(), "Negative value");
        assert_eq!(text.type_name(), "alloc::string::String");
    }

    fn noop(_: TaskContext, _: Arguments<'_>) -> Invocation {
        Invocation::Ready(Ok(Encoded::from_vec(Vec::new())))
    }

    #[test]
    fn a_submissions_limit_overrides_the_tasks_default() {
        use std::time::Duration;
        let plain = TaskRegistration::new("demo::plain", 1, noop);
        assert_eq!(plain.timeout(), None);
        assert_eq!(plain.limit_for(0), None);
        assert_eq!(plain.limit_for(u64::MAX), None);
        assert_eq!(plain.limit_for(250), Some(Duration::from_millis(250)));

        let limited = TaskRegistration::new("demo::limited", 1, noop).with_timeout_ms(30_000);
        assert_eq!(limited.timeout(), Some(Duration::from_secs(30)));
        assert_eq!(limited.limit_for(0), Some(Duration::from_secs(30)));
        assert_eq!(limited.limit_for(u64::MAX), None, "lifts the default");
        assert_eq!(limited.limit_for(100), Some(Duration::from_millis(100)));
    }

    #[test]
    fn arguments_that_do_not_fit_are_explained() {
        let bytes = rmp_serde::to_vec(&("x",)).unwrap();
        let error = decode_args::<(i64,)>("demo::f", &bytes).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::BadArguments);
        assert!(error.message().contains("demo::f"));
    }
}
