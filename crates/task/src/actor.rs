//! The actor side of the registry: what `#[flotilla::actor]` implements
//! ([`Actor`]) and registers ([`ActorRegistration`], one per constructor).
//! The worker hosts the actors; this module only names and builds them.

use crate::registry::TaskOutcome;
use flotilla_proto::{ErrorKind, TaskError};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;

/// Registered name of the task that creates an actor. Its arguments are the
/// constructor's name and the MessagePack of the constructor's arguments;
/// its output is an [`ActorInfo`](flotilla_proto::ActorInfo).
pub const CREATE_ACTOR: &str = "flotilla::actor::create";
/// Signature fingerprint of [`CREATE_ACTOR`].
pub const CREATE_ACTOR_FINGERPRINT: u64 = 0x666c_6f74_6163_7401;
/// Type name of the error of a call whose actor is gone.
pub const ACTOR_LOST: &str = "flotilla::ActorLost";

/// A type whose values can live on a worker as actors; implemented by
/// `#[flotilla::actor]`.
pub trait Actor: Send + 'static {
    /// The type's path (`my_crate::Counter`), for messages.
    const NAME: &'static str;
    /// The client-side proxy type the macro generates (`CounterProxy`).
    type Proxy;

    /// Runs the method called `method` with the MessagePack-encoded argument
    /// tuple `args`, and encodes its output.
    fn dispatch<'a>(
        &'a mut self,
        method: &'a str,
        args: &'a [u8],
    ) -> Pin<Box<dyn Future<Output = TaskOutcome> + Send + 'a>>;
}

/// The object-safe side of [`Actor`], for the worker's actor table.
pub trait DynActor: Send {
    /// See [`Actor::dispatch`].
    fn dispatch_dyn<'a>(
        &'a mut self,
        method: &'a str,
        args: &'a [u8],
    ) -> Pin<Box<dyn Future<Output = TaskOutcome> + Send + 'a>>;
}

impl<A: Actor> DynActor for A {
    fn dispatch_dyn<'a>(
        &'a mut self,
        method: &'a str,
        args: &'a [u8],
    ) -> Pin<Box<dyn Future<Output = TaskOutcome> + Send + 'a>> {
        self.dispatch(method, args)
    }
}

/// The error of a call to a method the actor does not have (a client built
/// from other code than the worker).
pub fn unknown_method(actor: &str, method: &str) -> TaskError {
    TaskError::new(
        ErrorKind::UnknownTask,
        "flotilla::UnknownMethod",
        format!("actor `{actor}` has no method `{method}`: rebuild the client and workers from the same code"),
    )
}

/// Decodes a constructor's argument tuple and builds the actor.
pub type Construct = fn(&[u8]) -> Result<Box<dyn DynActor>, TaskError>;

/// One registered actor constructor (`Counter::new`).
#[derive(Debug)]
pub struct ActorRegistration {
    name: fn() -> &'static str,
    construct: Construct,
}

impl ActorRegistration {
    /// Builds the actor from the MessagePack of its constructor's
    /// arguments.
    pub fn construct(&self, args: &[u8]) -> Result<Box<dyn DynActor>, TaskError> {
        (self.construct)(args)
    }

    /// A registration. `name` returns the constructor's
    /// `std::any::type_name` (the client names it the same way);
    /// `construct` decodes the argument tuple and builds the actor.
    pub const fn new(name: fn() -> &'static str, construct: Construct) -> Self {
        ActorRegistration { name, construct }
    }
}

inventory::collect!(ActorRegistration);

/// Every actor constructor registered in this binary, by name.
pub fn constructors() -> &'static HashMap<&'static str, &'static ActorRegistration> {
    static CONSTRUCTORS: OnceLock<HashMap<&'static str, &'static ActorRegistration>> =
        OnceLock::new();
    CONSTRUCTORS.get_or_init(|| {
        inventory::iter::<ActorRegistration>
            .into_iter()
            .map(|registration| ((registration.name)(), registration))
            .collect()
    })
}

/// The names (`std::any::type_name`) of every actor constructor registered
/// in this binary, e.g. `my_tasks::Counter::new`.
pub fn constructor_names() -> impl Iterator<Item = &'static str> {
    constructors().keys().copied()
}
