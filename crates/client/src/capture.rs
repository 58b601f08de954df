//! Futures inside values: a [`TaskFuture`](crate::TaskFuture) serializes as
//! its key, and deserializes back into a live future, only while a
//! primitive ([`Variable`](crate::Variable), [`Queue`](crate::Queue))
//! encodes or decodes a value. This is the context that allows it: while a
//! primitive encodes, the futures met are collected (the primitive then
//! holds their keys, see [`crate::sync::held`]); while it decodes, the keys
//! met are handed out as futures of the reader's client, which already
//! holds them. Outside such a scope both are refused.

use crate::inner::ClientInner;
use crate::state::FutureState;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::thread::LocalKey;

/// The newtype-struct name a future serializes under.
pub(crate) const FUTURE_TOKEN: &str = "$flotilla::TaskFuture";

thread_local! {
    /// The futures met while a primitive encodes a value.
    static COLLECTING: RefCell<Option<Vec<Captured>>> = const { RefCell::new(None) };
    /// The futures a primitive's reader now holds, while it decodes a value.
    static RESOLVING: RefCell<Option<Resolver>> = const { RefCell::new(None) };
}

/// A future met in a value, whatever its type: its shared state and client.
pub(crate) struct Captured {
    pub(crate) state: Arc<FutureState>,
    pub(crate) client: Arc<ClientInner>,
}

/// What a primitive's reader hands out the futures of a value from.
pub(crate) struct Resolver {
    /// The reader's client.
    pub(crate) client: Arc<ClientInner>,
    /// The states of the keys the reader now holds.
    pub(crate) states: HashMap<String, Arc<FutureState>>,
    /// The blocking primitive's runtime, if a blocking primitive reads.
    pub(crate) runtime: Option<Arc<tokio::runtime::Runtime>>,
}

/// Runs `encode`, collecting the futures it serializes (each once).
pub(crate) fn collecting<R>(encode: impl FnOnce() -> R) -> (R, Vec<Captured>) {
    let (result, found) = scoped(&COLLECTING, Vec::new(), encode);
    (result, found.unwrap_or_default())
}

/// Runs `decode`, handing out the futures it deserializes from `resolver`.
pub(crate) fn resolving<R>(resolver: Resolver, decode: impl FnOnce() -> R) -> R {
    scoped(&RESOLVING, resolver, decode).0
}

/// Runs `f` with `value` in the thread-local `key`, putting back what was
/// there before, also when `f` panics (so that a future can never be
/// serialized outside a primitive after a panic inside one). Returns what
/// `f` returned and what it left in `key`.
fn scoped<V: 'static, R>(
    key: &'static LocalKey<RefCell<Option<V>>>,
    value: V,
    f: impl FnOnce() -> R,
) -> (R, Option<V>) {
    struct Restore<V: 'static> {
        key: &'static LocalKey<RefCell<Option<V>>>,
        previous: Option<Option<V>>,
    }
    impl<V: 'static> Drop for Restore<V> {
        fn drop(&mut self) {
            if let Some(previous) = self.previous.take() {
                let _ = self.key.try_with(|cell| cell.replace(previous));
            }
        }
    }
    let previous = key.with(|cell| cell.replace(Some(value)));
    let mut restore = Restore {
        key,
        previous: Some(previous),
    };
    let result = f();
    let previous = restore.previous.take().unwrap_or_default();
    let left = key.with(|cell| cell.replace(previous));
    (result, left)
}

/// Records a future being serialized into a primitive's value; `Err` with
/// what to do when no primitive is encoding.
pub(crate) fn record(state: &Arc<FutureState>, client: &Arc<ClientInner>) -> Result<(), String> {
    COLLECTING.with(|collecting| match collecting.borrow_mut().as_mut() {
        Some(found) => {
            if !found.iter().any(|f| f.state.key == state.key) {
                found.push(Captured {
                    state: state.clone(),
                    client: client.clone(),
                });
            }
            Ok(())
        }
        None => Err(format!(
            "future `{}` can only be serialized into a flotilla Variable or Queue, which hold its \
             result; pass it to a task as an argument, or send `TaskFuture::to_ref` and resolve it there",
            state.key
        )),
    })
}

/// The future of `key` (its state and the reader's client) for the reader
/// decoding a primitive's value.
pub(crate) fn resolve(key: &str) -> Result<Captured, String> {
    RESOLVING.with(|resolving| match resolving.borrow().as_ref() {
        Some(resolver) => match resolver.states.get(key) {
            Some(state) => Ok(Captured {
                state: state.clone(),
                client: resolver.client.clone(),
            }),
            None => Err(format!(
                "future `{key}` is not among the keys this value holds; was it written by a Variable or Queue?"
            )),
        },
        None => Err(format!(
            "future `{key}` can only be deserialized from a flotilla Variable or Queue, which hand \
             over a hold on its result"
        )),
    })
}

/// The runtime of the blocking primitive decoding a value, for
/// [`crate::blocking::TaskFuture`]s.
pub(crate) fn resolve_runtime() -> Option<Arc<tokio::runtime::Runtime>> {
    RESOLVING.with(|resolving| {
        resolving
            .borrow()
            .as_ref()
            .and_then(|resolver| resolver.runtime.clone())
    })
}
