//! Shared per-worker state: values a worker builds once at start (a
//! connection pool, a model, a configuration) and lends to every task that
//! asks for them, like apalis' `Data<T>`.
//!
//! A worker holds a [`WorkerState`], a map from a type to one shared value of
//! that type. A task reads a value through its context,
//! [`TaskContext::state`](crate::TaskContext::state), or by taking a
//! [`State<T>`] parameter, which `#[flotilla::task]` fills from the worker's
//! state instead of from the task's arguments. When the worker has no value
//! of the type, the task fails with a [`TaskError`] of type
//! [`MISSING_STATE`] whose message names the type; it neither panics nor
//! waits.
//!
//! ```
//! use flotilla_task::{State, TaskContext, WorkerState};
//! use std::sync::atomic::{AtomicU64, Ordering};
//!
//! let state = WorkerState::new().with(AtomicU64::new(0));
//! let ctx = TaskContext::new("k", "t", "w", Default::default()).with_state(state.into());
//!
//! let counter: State<AtomicU64> = ctx.state().unwrap();
//! counter.fetch_add(1, Ordering::Relaxed);
//! assert_eq!(ctx.state::<AtomicU64>().unwrap().load(Ordering::Relaxed), 1);
//! assert!(ctx.state::<String>().is_err());
//! ```

use flotilla_proto::{ErrorKind, TaskError};
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// The [`TaskError::type_name`] of a task that asked for state its worker
/// does not have.
pub const MISSING_STATE: &str = "flotilla::MissingState";

/// One stored value and its type's name (for messages).
#[derive(Clone)]
struct Entry {
    type_name: &'static str,
    value: Arc<dyn Any + Send + Sync>,
}

/// The values a worker lends to its tasks, at most one per type.
///
/// Built once, before the worker starts, and shared read-only by every task
/// (cloning it clones the references, not the values). A value that tasks
/// update must do so itself, through atomics or a lock.
///
/// ```
/// use flotilla_task::WorkerState;
/// use std::sync::Arc;
///
/// struct Model { name: String }
///
/// let state = WorkerState::new()
///     .with(Model { name: "small".into() })
///     .with(42_u32);
/// assert_eq!(state.get::<Model>().unwrap().name, "small");
/// assert_eq!(*state.get::<u32>().unwrap(), 42);
/// assert!(state.get::<String>().is_none());
/// ```
#[derive(Clone, Default)]
pub struct WorkerState {
    values: HashMap<TypeId, Entry>,
}

impl WorkerState {
    /// No state.
    pub fn new() -> Self {
        Self::default()
    }

    /// The same state, with `value` as the value of type `T` (replacing any
    /// earlier one).
    pub fn with<T: Send + Sync + 'static>(mut self, value: T) -> Self {
        self.insert(value);
        self
    }

    /// Adds `value` as the value of type `T`; returns the value it replaced.
    pub fn insert<T: Send + Sync + 'static>(&mut self, value: T) -> Option<Arc<T>> {
        self.insert_arc(Arc::new(value))
    }

    /// Adds a value already shared elsewhere (the caller keeps its own
    /// reference, e.g. to look at a counter from outside the worker);
    /// returns the value it replaced.
    ///
    /// ```
    /// use flotilla_task::WorkerState;
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use std::sync::Arc;
    ///
    /// let counter = Arc::new(AtomicU64::new(0));
    /// let mut state = WorkerState::new();
    /// state.insert_arc(counter.clone());
    /// state.get::<AtomicU64>().unwrap().fetch_add(5, Ordering::Relaxed);
    /// assert_eq!(counter.load(Ordering::Relaxed), 5);
    /// ```
    pub fn insert_arc<T: Send + Sync + 'static>(&mut self, value: Arc<T>) -> Option<Arc<T>> {
        let entry = Entry {
            type_name: std::any::type_name::<T>(),
            value,
        };
        self.values
            .insert(TypeId::of::<T>(), entry)
            .and_then(|old| old.value.downcast::<T>().ok())
    }

    /// The value of type `T`, if there is one.
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<Arc<T>> {
        self.values
            .get(&TypeId::of::<T>())
            .and_then(|entry| entry.value.clone().downcast::<T>().ok())
    }

    /// How many values there are.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The names of the values' types, sorted.
    pub fn type_names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.values.values().map(|entry| entry.type_name).collect();
        names.sort_unstable();
        names
    }

    /// The value of type `T`, or an error naming `T` and what there is.
    pub(crate) fn require<T: Send + Sync + 'static>(&self) -> Result<State<T>, MissingState> {
        self.get::<T>().map(State).ok_or_else(|| MissingState {
            wanted: std::any::type_name::<T>(),
            available: self.type_names(),
        })
    }
}

impl fmt::Debug for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.type_names()).finish()
    }
}

/// A shared reference to the worker's value of type `T`: a task parameter
/// that `#[flotilla::task]` fills from the worker's [`WorkerState`] (it is
/// not one of the task's arguments, and does not change its signature as
/// clients see it). Dereferences to `T`.
///
/// ```
/// use flotilla_task::{State, WorkerState};
///
/// struct Greeting(String);
///
/// // A task would be `fn greet(greeting: State<Greeting>, name: String) -> String`.
/// fn greet(greeting: State<Greeting>, name: String) -> String {
///     format!("{}, {name}", greeting.0)
/// }
/// let state = WorkerState::new().with(Greeting("hello".into()));
/// let greeting = State::from(state.get::<Greeting>().unwrap());
/// assert_eq!(greet(greeting, "ada".into()), "hello, ada");
/// ```
pub struct State<T: ?Sized>(Arc<T>);

impl<T: ?Sized> State<T> {
    /// The shared reference itself.
    pub fn into_arc(self) -> Arc<T> {
        self.0
    }
}

impl<T: ?Sized> From<Arc<T>> for State<T> {
    fn from(value: Arc<T>) -> Self {
        State(value)
    }
}

impl<T: ?Sized> Clone for State<T> {
    fn clone(&self) -> Self {
        State(self.0.clone())
    }
}

impl<T: ?Sized> Deref for State<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for State<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("State").field(&self.0).finish()
    }
}

/// A task asked for state of a type its worker does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MissingState {
    /// The name of the type asked for.
    pub wanted: &'static str,
    /// The names of the types the worker has.
    pub available: Vec<&'static str>,
}

impl fmt::Display for MissingState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "this worker has no state of type `{}` (it has {}); start the worker with it: \
             `flotilla::worker_main!(my_tasks; state = my_tasks::init)` or \
             `WorkerOptions::state`",
            self.wanted,
            if self.available.is_empty() {
                "none".to_owned()
            } else {
                self.available
                    .iter()
                    .map(|name| format!("`{name}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )
    }
}

impl std::error::Error for MissingState {}

impl From<MissingState> for TaskError {
    fn from(missing: MissingState) -> Self {
        TaskError::new(ErrorKind::Internal, MISSING_STATE, missing.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_value_per_type_shared_not_copied() {
        let mut state = WorkerState::new().with(1_u32).with(String::from("a"));
        assert_eq!(state.len(), 2);
        let first = state.get::<u32>().unwrap();
        let again = state.get::<u32>().unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(state.insert(2_u32).as_deref(), Some(&1));
        assert_eq!(*state.get::<u32>().unwrap(), 2);
        assert_eq!(state.len(), 2);
        // A clone shares the values.
        let clone = state.clone();
        assert!(Arc::ptr_eq(
            &state.get::<String>().unwrap(),
            &clone.get::<String>().unwrap()
        ));
        assert!(state.get::<u64>().is_none());
    }

    #[test]
    fn missing_state_names_the_type_and_what_there_is() {
        let state = WorkerState::new().with(1_u32).with(String::new());
        let missing = state.require::<u64>().unwrap_err();
        assert_eq!(missing.wanted, "u64");
        assert_eq!(missing.available, ["alloc::string::String", "u32"]);
        let message = missing.to_string();
        assert!(message.contains("no state of type `u64`"), "{message}");
        assert!(message.contains("`u32`"), "{message}");
        let error = TaskError::from(missing);
        assert_eq!(error.type_name(), MISSING_STATE);
        assert_eq!(error.kind(), ErrorKind::Internal);

        let none = WorkerState::new().require::<u64>().unwrap_err();
        assert!(none.to_string().contains("(it has none)"));
        assert_eq!(format!("{state:?}"), r#"{"alloc::string::String", "u32"}"#);
    }
}
