//! Actors: a stateful object placed on one worker, called through a typed
//! proxy (Dask's `submit(Counter, actor=True)`).
//!
//! `#[flotilla::actor]` on an `impl` block generates the proxy; each method
//! call returns an [`ActorFuture`], which is an ordinary [`TaskFuture`]: await
//! it, `gather` it, put it in `as_completed`, or pass it into a task.
//!
//! ```no_run
//! use flotilla::prelude::*;
//!
//! pub struct Counter { count: i64 }
//!
//! #[flotilla::actor]
//! impl Counter {
//!     pub fn new() -> Self { Counter { count: 0 } }
//!     pub fn increment(&mut self) -> i64 { self.count += 1; self.count }
//!     pub async fn get_count(&self) -> i64 { self.count }
//! }
//!
//! # async fn demo(client: Client) -> flotilla::Result<()> {
//! let counter = client.submit_actor(Counter::new, ()).await?; // a CounterProxy
//! let first = counter.increment();                           // ActorFuture<i64>
//! let second = counter.increment();
//! assert_eq!(counter.get_count().await?, 2);
//! # Ok(()) }
//! ```
//!
//! Creating an actor is a task the scheduler places (so
//! [`SubmitActor::workers`] pins it); calls then go straight to the hosting
//! worker's actor queue and answers come back on RabbitMQ's direct
//! reply-to, one round trip per call. Calls on one actor run one at a time,
//! in the order they were made. The actor lives while any proxy of it lives
//! in any client. If its worker dies, pending and later calls fail with
//! [`Error::ActorLost`] (never hang); create a new actor to carry on. If
//! the client's own connection to RabbitMQ for calls is lost, the calls
//! waiting for an answer through the broker fail with [`Error::Amqp`] (they
//! may or may not have run), and the client connects again, with growing
//! pauses, for the next calls.

use crate::client::Client;
use crate::error::{Error, Result};
use crate::future::TaskFuture;
use crate::inner::ClientInner;
use crate::outbox::Op;
use crate::state::FutureState;
use flotilla_proto::{
    ActorCall, ActorInfo, ActorReply, Codec, Names, Purpose, ReplayGuard, Task, TaskError, ToWorker,
};
use flotilla_runtime::supervise::AbortOnDropHandle;
use flotilla_runtime::transport::{self, name};
use flotilla_task::actor::{ACTOR_LOST, CREATE_ACTOR, CREATE_ACTOR_FINGERPRINT};
use flotilla_task::Actor;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// The future of an actor method call: a [`TaskFuture`] like any task's.
pub type ActorFuture<T> = TaskFuture<T>;

/// RabbitMQ's pseudo-queue for direct replies.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// How often pending calls check that their actor's worker is alive.
const WATCHDOG_EVERY: Duration = Duration::from_millis(500);
/// How long opening a direct call connection may take before the calls go
/// through the broker instead.
const DIRECT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The typed proxy `#[flotilla::actor]` generates (`CounterProxy`), built
/// around an [`ActorHandle`].
pub trait ActorProxy: Sized {
    /// The proxy for [`crate::blocking`] (`CounterBlockingProxy`).
    type Blocking;
    /// Wraps a handle.
    fn from_handle(handle: ActorHandle) -> Self;
    /// The handle inside.
    fn handle(&self) -> &ActorHandle;
    /// The blocking proxy of the same actor.
    fn into_blocking(self, runtime: BlockingRuntime) -> Self::Blocking;
}

/// The runtime a blocking actor proxy waits on; used by the code
/// `#[flotilla::actor]` generates. Not a public API. Its calls' futures are
/// made blocking by `BlockingRuntime::wrap` (in [`crate::blocking`]).
#[doc(hidden)]
#[derive(Clone, Debug)]
pub struct BlockingRuntime(pub(crate) Arc<tokio::runtime::Runtime>);

/// An actor constructor: an associated function of an `#[flotilla::actor]`
/// type that returns the type (`Counter::new`), taking the argument tuple
/// `Args`. Implemented for every such function.
pub trait Constructor<Args>: Copy + Send + Sync + 'static {
    /// The actor type it builds.
    type Actor: Actor;
}

macro_rules! constructors {
    ($($arg:ident),*) => {
        impl<F, A: Actor, $($arg),*> Constructor<($($arg,)*)> for F
        where
            F: Fn($($arg),*) -> A + Copy + Send + Sync + 'static,
        {
            type Actor = A;
        }
    };
}

constructors!();
constructors!(A0);
constructors!(A0, A1);
constructors!(A0, A1, A2);
constructors!(A0, A1, A2, A3);
constructors!(A0, A1, A2, A3, A4);
constructors!(A0, A1, A2, A3, A4, A5);
constructors!(A0, A1, A2, A3, A4, A5, A6);
constructors!(A0, A1, A2, A3, A4, A5, A6, A7);

/// The task that creates an actor on the worker that runs it.
#[derive(Debug, Clone, Copy)]
struct CreateActor;

impl Task for CreateActor {
    // The worker reads the bytes as a `serde_bytes::ByteBuf`, which accepts
    // this sequence too.
    type Args = (String, Vec<u8>);
    type Output = ActorInfo;
    const NAME: &'static str = CREATE_ACTOR;
    const FINGERPRINT: u64 = CREATE_ACTOR_FINGERPRINT;
}

/// Options for creating an actor; see [`Client::submit_actor_with`].
#[must_use = "the actor is created by calling .submit()"]
pub struct SubmitActor<'c, C, Args> {
    client: &'c Client,
    constructor: C,
    args: Args,
    workers: Vec<String>,
    allow_other_workers: bool,
}

impl<C, Args> std::fmt::Debug for SubmitActor<'_, C, Args> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubmitActor")
            .field("constructor", &std::any::type_name::<C>())
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

impl<C, Args> SubmitActor<'_, C, Args>
where
    C: Constructor<Args>,
    Args: Serialize,
    <C::Actor as Actor>::Proxy: ActorProxy,
{
    /// Places the actor on one of these workers (ids or `--name`s).
    pub fn workers<S: Into<String>>(mut self, workers: impl IntoIterator<Item = S>) -> Self {
        self.workers = workers.into_iter().map(Into::into).collect();
        self
    }

    /// With [`SubmitActor::workers`]: place it elsewhere when none of them
    /// is alive.
    pub fn allow_other_workers(mut self, allow: bool) -> Self {
        self.allow_other_workers = allow;
        self
    }

    /// Creates the actor and returns its proxy once it exists.
    pub async fn submit(self) -> Result<<C::Actor as Actor>::Proxy> {
        let _ = self.constructor;
        let constructor = std::any::type_name::<C>();
        let args = flotilla_proto::value_to_vec(&self.args).map_err(|e| Error::Encode {
            what: format!("the arguments of `{constructor}`"),
            message: e.to_string(),
        })?;
        let type_name = <C::Actor as Actor>::NAME;
        let short = type_name.rsplit("::").next().unwrap_or(type_name);
        let key = format!("{short}-{}", flotilla_proto::new_id());
        let mut submit = self
            .client
            .submit_with(CreateActor, (constructor.to_owned(), args))
            .key(key);
        if !self.workers.is_empty() {
            submit = submit
                .workers(self.workers)
                .allow_other_workers(self.allow_other_workers);
        }
        let creation = submit.submit();
        let (info, caller) = tokio::join!(creation.result(), Caller::of(self.client));
        let (info, caller) = (info?, caller?);
        let handle = ActorHandle {
            inner: Arc::new(HandleInner {
                key: creation.key().to_owned(),
                name: type_name,
                info,
                creation: Some(creation),
                caller,
                client: self.client.inner.clone(),
                runtime: tokio::runtime::Handle::current(),
            }),
        };
        Ok(<C::Actor as Actor>::Proxy::from_handle(handle))
    }
}

impl Client {
    /// Creates an actor by calling `constructor` (`Counter::new`, an
    /// associated function of an `#[flotilla::actor]` type) with `args` (a
    /// tuple of values) on a worker the scheduler picks, and returns its
    /// proxy once it exists.
    pub async fn submit_actor<C, Args>(
        &self,
        constructor: C,
        args: Args,
    ) -> Result<<C::Actor as Actor>::Proxy>
    where
        C: Constructor<Args>,
        Args: Serialize,
        <C::Actor as Actor>::Proxy: ActorProxy,
    {
        self.submit_actor_with(constructor, args).submit().await
    }

    /// Like [`Client::submit_actor`], with options:
    /// `client.submit_actor_with(Counter::new, ()).workers(["w1"]).submit().await`.
    pub fn submit_actor_with<C, Args>(&self, constructor: C, args: Args) -> SubmitActor<'_, C, Args>
    where
        C: Constructor<Args>,
        Args: Serialize,
    {
        SubmitActor {
            client: self,
            constructor,
            args,
            workers: Vec::new(),
            allow_other_workers: false,
        }
    }
}

/// A live actor: its key, where it lives, and the way calls reach it.
/// Cloning is cheap; the actor is dropped once the last handle in every
/// client is gone.
#[derive(Clone)]
pub struct ActorHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    key: String,
    name: &'static str,
    info: ActorInfo,
    /// Holds the actor's key while any handle lives.
    creation: Option<TaskFuture<ActorInfo>>,
    caller: Arc<Caller>,
    client: Arc<ClientInner>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for ActorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActorHandle")
            .field("actor", &self.inner.name)
            .field("key", &self.inner.key)
            .field("worker", &self.inner.info.worker)
            .finish()
    }
}

impl ActorHandle {
    /// The actor's key.
    pub fn key(&self) -> &str {
        &self.inner.key
    }

    /// Id of the worker hosting it.
    pub fn worker(&self) -> &str {
        &self.inner.info.worker
    }

    /// Calls `method` with the argument tuple `args`; the generated proxy
    /// methods call this.
    pub fn call<T, A: Serialize>(&self, method: &str, args: &A) -> ActorFuture<T> {
        let inner = &self.inner;
        let key = format!("{method}-{}", flotilla_proto::new_id());
        let (state, _) = inner.client.register(&key);
        let future = TaskFuture::from_state(state.clone(), inner.client.clone());
        let limit = inner.client.config.max_payload;
        let args = match crate::args::encode_within(args, limit, || {
            format!("the arguments of `{}::{method}`", inner.name)
        }) {
            Ok(args) => args,
            Err(error) => {
                state.set_failed(error);
                return future;
            }
        };
        // The client holds the call's key before the call leaves, through
        // its ordered outbox like every other hold: the worker stores the
        // result only while someone holds it, and the client's release
        // (when the handles are gone, or at `close`) always comes after.
        inner.client.send(Op::HoldQuietly(key.clone()));
        let (done, held) = tokio::sync::oneshot::channel();
        inner.client.send(Op::Barrier(done));
        let call = ActorCall {
            actor: inner.key.clone(),
            method: method.to_owned(),
            args,
            call: key,
            client: inner.client.id.clone(),
        };
        inner.caller.send(call, &inner.info, state, held);
        future
    }
}

impl Drop for HandleInner {
    fn drop(&mut self) {
        // Releasing the key goes through the client's outbox; once that is
        // flushed, an actor nobody holds any more is dropped by its worker.
        drop(self.creation.take());
        let client = Client {
            inner: self.client.clone(),
            trace: None,
        };
        let caller = self.caller.clone();
        let key = self.key.clone();
        self.runtime.spawn(async move {
            let _ = client.flush().await;
            let held = client.inner.store.held(std::slice::from_ref(&key)).await;
            if matches!(held.as_deref(), Ok([false])) {
                // Wait for the publish: dropping the last handle on the
                // caller stops its publisher.
                let (sent, published) = tokio::sync::oneshot::channel();
                if caller
                    .outgoing
                    .send(Outgoing::DropActors(vec![key], sent))
                    .is_ok()
                {
                    let _ = published.await;
                }
            }
        });
    }
}

/// A call waiting for its answer.
struct Pending {
    state: Arc<FutureState>,
    actor: String,
    worker: String,
    /// The direct call connection it was sent on (none: the broker).
    via: Option<String>,
}

enum Outgoing {
    Call {
        call: ActorCall,
        queue: String,
        /// The worker (for its direct call connection).
        worker: String,
        /// The worker's data address, where its direct call connection is
        /// opened (none: the broker only).
        addr: Option<String>,
        /// Answers once the client holds the call's key in Redis.
        held: tokio::sync::oneshot::Receiver<()>,
    },
    /// Drop notices, and who waits until they are published.
    DropActors(Vec<String>, tokio::sync::oneshot::Sender<()>),
}

/// A client's side of actor calls: a connection of its own with one
/// channel that publishes calls and consumes the direct replies, connected
/// again (by [`link_loop`]) when it is lost.
pub(crate) struct Caller {
    names: Names,
    /// The connection of the current connected life, if any (the
    /// watchdog's passive declares use it).
    connection: Mutex<Option<Arc<Connection>>>,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    pending: Mutex<HashMap<String, Pending>>,
    /// Workers whose actor queue is gone: calls to them fail at once.
    lost: Mutex<HashSet<String>>,
    watching: AtomicBool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Where the watchdog runs: calls may be made outside any runtime (the
    /// blocking proxies).
    runtime: tokio::runtime::Handle,
    /// Largest answer taken, in bytes.
    reply_limit: usize,
}

impl Drop for Caller {
    fn drop(&mut self) {
        for task in self.tasks.get_mut().map(std::mem::take).unwrap_or_default() {
            task.abort();
        }
    }
}

fn callers() -> &'static tokio::sync::Mutex<HashMap<String, Weak<Caller>>> {
    static CALLERS: OnceLock<tokio::sync::Mutex<HashMap<String, Weak<Caller>>>> = OnceLock::new();
    CALLERS.get_or_init(Default::default)
}

impl Caller {
    /// The caller of `client`, connected on first use and shared by all its
    /// actor handles.
    async fn of(client: &Client) -> Result<Arc<Caller>> {
        let mut callers = callers().lock().await;
        callers.retain(|_, caller| caller.strong_count() > 0);
        if let Some(caller) = callers.get(client.id()).and_then(Weak::upgrade) {
            return Ok(caller);
        }
        let caller = Caller::connect(client).await?;
        callers.insert(client.id().to_owned(), Arc::downgrade(&caller));
        Ok(caller)
    }

    async fn connect(client: &Client) -> Result<Arc<Caller>> {
        let config = client.config().clone();
        let names = config.names();
        let label = format!(
            "flotilla-client {} actors ({})",
            client.id(),
            names.namespace()
        );
        // The first connection is tried once: a client that cannot reach
        // RabbitMQ for its first call says so.
        let first = open_life(&config.amqp_url, &label).await?;
        let (outgoing, outgoing_rx) = mpsc::unbounded_channel();
        let codec = Codec::new(&config);
        let caller = Arc::new(Caller {
            names: names.clone(),
            connection: Mutex::new(None),
            outgoing,
            pending: Mutex::new(HashMap::new()),
            lost: Mutex::new(HashSet::new()),
            watching: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
            runtime: tokio::runtime::Handle::current(),
            reply_limit: config.max_payload + (1 << 20),
        });
        let link = tokio::spawn(link_loop(
            Arc::downgrade(&caller),
            first,
            config.amqp_url.clone(),
            label,
            codec,
            outgoing_rx,
        ));
        *caller.tasks.lock().unwrap_or_else(|p| p.into_inner()) = vec![link];
        Ok(caller)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the pending calls that `matches` picks (to be failed).
    fn take_pending(&self, matches: impl Fn(&Pending) -> bool) -> Vec<Pending> {
        let mut pending = self.pending();
        let keys: Vec<String> = pending
            .iter()
            .filter(|(_, p)| matches(p))
            .map(|(k, _)| k.clone())
            .collect();
        keys.iter().filter_map(|k| pending.remove(k)).collect()
    }

    fn is_lost(&self, worker: &str) -> bool {
        self.lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(worker)
    }

    /// Sends a call once `held` says the client holds its key; the state
    /// stays here until the answer, which the worker sends only after it
    /// stored the result, so the call's key is released only after that.
    fn send(
        self: &Arc<Self>,
        call: ActorCall,
        info: &ActorInfo,
        state: Arc<FutureState>,
        held: tokio::sync::oneshot::Receiver<()>,
    ) {
        if self.is_lost(&info.worker) {
            state.set_failed(lost_error(&call.actor, &info.worker));
            return;
        }
        self.pending().insert(
            call.call.clone(),
            Pending {
                state,
                actor: call.actor.clone(),
                worker: info.worker.clone(),
                via: None,
            },
        );
        self.watch();
        let outgoing = Outgoing::Call {
            call,
            queue: info.queue.clone(),
            worker: info.worker.clone(),
            addr: info.addr.clone(),
            held,
        };
        if let Err(mpsc::error::SendError(Outgoing::Call { call, .. })) =
            self.outgoing.send(outgoing)
        {
            self.finish(&call.call, Err(Error::Closed));
        }
    }

    /// Opens an encoded [`ActorReply`] (from the broker or a direct call
    /// connection) and settles its call.
    fn answered(
        &self,
        codec: &Codec,
        bytes: &[u8],
        guard: &ReplayGuard,
        limit: usize,
    ) -> std::result::Result<(), flotilla_proto::DecodeError> {
        let reply = codec.open::<ActorReply>(Purpose::ActorReply, bytes, false, guard, limit)?;
        let outcome = reply
            .outcome
            .map(|bytes| bytes.into_vec())
            .map_err(call_error);
        self.finish(&reply.call, outcome);
        Ok(())
    }

    /// Settles a pending call.
    fn finish(&self, call: &str, outcome: Result<Vec<u8>>) {
        let Some(pending) = self.pending().remove(call) else {
            return;
        };
        match outcome {
            Ok(bytes) => pending.state.set_finished(Some(bytes)),
            Err(error) => pending.state.set_failed(error),
        }
    }

    /// Fails every pending call to `worker` and every later one.
    fn worker_lost(&self, worker: &str) {
        self.lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(worker.to_owned());
        for pending in self.take_pending(|p| p.worker == worker) {
            pending
                .state
                .set_failed(lost_error(&pending.actor, &pending.worker));
        }
    }

    /// Notes that `call` goes out on the direct call connection to `addr`
    /// (false: it is settled already).
    fn sent_via(&self, call: &str, addr: &str) -> bool {
        match self.pending().get_mut(call) {
            Some(pending) => {
                pending.via = Some(addr.to_owned());
                true
            }
            None => false,
        }
    }

    /// Fails every call still waiting for an answer on the direct call
    /// connection to `addr`, which closed: whether it ran is unknown, and
    /// its worker is most likely gone.
    fn direct_closed(&self, addr: &str, worker: &str) {
        for pending in self.take_pending(|p| p.via.as_deref() == Some(addr)) {
            pending.state.set_failed(Error::ActorLost {
                actor: pending.actor,
                reason: format!(
                    "the call connection to its worker {worker} at {addr} closed before the answer"
                ),
            });
        }
    }

    /// Fails every call waiting for an answer through the broker: the
    /// connection it was published and answered on is lost (`reason`), so
    /// whether it ran is unknown and its answer cannot arrive. Calls on a
    /// direct call connection go on.
    fn connection_lost(&self, reason: &str) {
        for pending in self.take_pending(|p| p.via.is_none()) {
            let error = std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                format!(
                    "the client's connection for actor calls was lost before the answer of a call \
                     to actor `{}` ({reason}): it may or may not have run",
                    pending.actor
                ),
            );
            pending
                .state
                .set_failed(Error::Amqp(Arc::new(lapin::Error::from(error))));
        }
    }

    /// The connection of the current connected life.
    fn current(&self) -> Option<Arc<Connection>> {
        self.connection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts the watchdog unless it runs.
    fn watch(self: &Arc<Self>) {
        if !self.watching.swap(true, Ordering::AcqRel) {
            let caller = Arc::downgrade(self);
            let watchdog = self.runtime.spawn(watchdog(caller));
            let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
            tasks.retain(|task| !task.is_finished());
            tasks.push(watchdog);
        }
    }
}

fn lost_error(actor: &str, worker: &str) -> Error {
    Error::ActorLost {
        actor: actor.to_owned(),
        reason: format!("its worker {worker} is gone"),
    }
}

/// One connected life of a caller: its connection, the channel that
/// publishes calls (with confirms) and the consumer of their direct
/// replies.
struct Life {
    connection: Arc<Connection>,
    channel: Channel,
    replies: lapin::Consumer,
}

/// Connects a caller's life to RabbitMQ at `url` (a cluster's nodes, see
/// [`transport::connect_amqp`]), named `label`.
async fn open_life(url: &str, label: &str) -> Result<Life> {
    let connection = transport::connect_amqp(url, label).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    // Direct reply-to: consume before the first publish, without acks.
    let replies = channel
        .basic_consume(
            name(DIRECT_REPLY_TO),
            name("actor-replies"),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(Life {
        connection: Arc::new(connection),
        channel,
        replies,
    })
}

/// Runs a caller's connected lives, from `first`: publishes its calls and
/// settles their answers until the connection is lost, then fails the calls
/// waiting for an answer through the broker, and connects again (paced by
/// [`Backoff`](flotilla_runtime::supervise::Backoff)); calls made meanwhile
/// wait in `outgoing` for the next life. Direct call connections outlive
/// broker lives.
async fn link_loop(
    caller: Weak<Caller>,
    first: Life,
    url: String,
    label: String,
    codec: Codec,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
) {
    // Direct call connections by data address; `None`: it could not be
    // opened, so this worker's calls go through the broker from then on.
    let mut direct: HashMap<String, Option<mpsc::UnboundedSender<Vec<u8>>>> = HashMap::new();
    let mut backoff = flotilla_runtime::supervise::Backoff::default();
    let mut life = Some(first);
    loop {
        let Some(Life {
            connection,
            channel,
            replies,
        }) = life.take()
        else {
            tokio::time::sleep(backoff.next_pause()).await;
            match open_life(&url, &label).await {
                Ok(next) => {
                    debug!("actor calls: connected to RabbitMQ again");
                    backoff = Default::default();
                    life = Some(next);
                }
                Err(error) => warn!(%error, "actor calls: RabbitMQ unreachable; retrying"),
            }
            continue;
        };
        let Some(me) = caller.upgrade() else { return };
        *me.connection.lock().unwrap_or_else(|p| p.into_inner()) = Some(connection.clone());
        let (names, limit) = (me.names.clone(), me.reply_limit);
        drop(me);
        let (confirms, confirms_rx) = mpsc::unbounded_channel();
        let confirming =
            AbortOnDropHandle::new(tokio::spawn(confirm_loop(caller.clone(), confirms_rx)));
        let reason = tokio::select! {
            ended = publish_loop(&caller, &channel, &names, &codec, &mut outgoing, &mut direct, confirms) => match ended {
                PublishEnd::Closed => return,
                PublishEnd::Failed(reason) => reason,
            },
            () = reply_loop(caller.clone(), replies, codec.clone(), limit) => {
                "its reply consumer ended".to_owned()
            }
        };
        drop(confirming);
        let Some(me) = caller.upgrade() else { return };
        warn!(
            reason,
            "actor calls: the connection to RabbitMQ is lost; connecting again"
        );
        me.connection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        me.connection_lost(&reason);
        drop(me);
        transport::close(&connection, "actor calls: connection lost").await;
    }
}

/// How a [`publish_loop`] ended.
enum PublishEnd {
    /// Every sender is gone: the caller is dropped.
    Closed,
    /// A publish failed: the connection is lost (why).
    Failed(String),
}

/// Publishes calls in the order they were made, and drop notices, on
/// `channel` until it fails.
async fn publish_loop(
    caller: &Weak<Caller>,
    channel: &Channel,
    names: &Names,
    codec: &Codec,
    outgoing: &mut mpsc::UnboundedReceiver<Outgoing>,
    direct: &mut HashMap<String, Option<mpsc::UnboundedSender<Vec<u8>>>>,
    confirms: mpsc::UnboundedSender<(String, PublisherConfirm)>,
) -> PublishEnd {
    while let Some(message) = outgoing.recv().await {
        match message {
            Outgoing::Call {
                call,
                queue,
                worker,
                addr,
                held,
            } => {
                if held.await.is_err() {
                    // The client's outbox is gone: the client closed.
                    if let Some(caller) = caller.upgrade() {
                        caller.finish(&call.call, Err(Error::Closed));
                    }
                    continue;
                }
                if let Some(addr) = addr {
                    let sent = send_direct(caller, direct, codec, &addr, &worker, &call).await;
                    if sent {
                        continue;
                    }
                }
                let properties = BasicProperties::default()
                    .with_reply_to(ShortString::from(DIRECT_REPLY_TO))
                    .with_correlation_id(ShortString::from(call.call.clone()))
                    .with_delivery_mode(1);
                let published = channel
                    .basic_publish(
                        name(""),
                        name(&queue),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &codec.encode(Purpose::ActorCall, &call),
                        properties,
                    )
                    .await;
                match published {
                    Ok(confirm) => {
                        let _ = confirms.send((call.call, confirm));
                    }
                    Err(error) => {
                        // The call is pending: it fails with the others.
                        return PublishEnd::Failed(format!("publishing a call failed: {error}"));
                    }
                }
            }
            Outgoing::DropActors(keys, published) => {
                debug!(?keys, "dropping unreferenced actors");
                let confirm = channel
                    .basic_publish(
                        name(&names.control_exchange()),
                        name(""),
                        BasicPublishOptions::default(),
                        &codec.encode(Purpose::ToWorker, &ToWorker::DropActors { keys }),
                        transport::transient(),
                    )
                    .await;
                if let Ok(confirm) = confirm {
                    let _ = confirm.await;
                }
                let _ = published.send(());
            }
        }
    }
    PublishEnd::Closed
}

/// Sends `call` on the direct call connection to `addr`, opening it first
/// if needed (once: an address that refused stays on the broker); whether
/// it went.
async fn send_direct(
    caller: &Weak<Caller>,
    direct: &mut HashMap<String, Option<mpsc::UnboundedSender<Vec<u8>>>>,
    codec: &Codec,
    addr: &str,
    worker: &str,
    call: &ActorCall,
) -> bool {
    let Some(me) = caller.upgrade() else {
        return false;
    };
    let connection = match direct.get(addr) {
        Some(None) => return false,
        Some(Some(connection)) if !connection.is_closed() => connection.clone(),
        // New, or closed since (a new one serves later calls).
        _ => match open_direct(caller.clone(), codec.clone(), addr, worker).await {
            Ok(connection) => {
                direct.insert(addr.to_owned(), Some(connection.clone()));
                connection
            }
            Err(error) => {
                debug!(%addr, %worker, %error, "no direct call connection: calls go through the broker");
                direct.insert(addr.to_owned(), None);
                return false;
            }
        },
    };
    if !me.sent_via(&call.call, addr) {
        return true; // settled meanwhile (the client closed)
    }
    if connection
        .send(codec.encode(Purpose::ActorCall, call))
        .is_err()
    {
        // Closed just now: the call fails with the others on it.
        me.direct_closed(addr, worker);
    }
    true
}

/// Opens a direct call connection to worker `worker` at `addr` (its data
/// connection's listener, which hands it to the worker's actors) and starts
/// its task: frames of encoded calls out, of encoded answers in. When the
/// connection ends, the calls still waiting on it fail.
async fn open_direct(
    caller: Weak<Caller>,
    codec: Codec,
    addr: &str,
    worker: &str,
) -> std::io::Result<mpsc::UnboundedSender<Vec<u8>>> {
    use flotilla_runtime::data::{read_frame, write_frame};
    use tokio::io::AsyncWriteExt;
    let connect = tokio::net::TcpStream::connect(addr);
    let mut stream = tokio::time::timeout(DIRECT_CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting"))??;
    stream.set_nodelay(true)?;
    let mut hello = Vec::with_capacity(8 + worker.len());
    hello.extend_from_slice(flotilla_runtime::data::HANDOVER_MAGIC);
    hello.push(flotilla_runtime::data::DIRECT_CALLS_VERSION);
    hello.extend_from_slice(&(worker.len() as u32).to_be_bytes());
    hello.extend_from_slice(worker.as_bytes());
    stream.write_all(&hello).await?;
    let (mut read, mut write) = stream.into_split();
    let (frames, mut outgoing) = mpsc::unbounded_channel::<Vec<u8>>();
    let (addr, worker) = (addr.to_owned(), worker.to_owned());
    let limit = caller.upgrade().map_or(1 << 20, |c| c.reply_limit);
    let registry = caller.clone();
    let task = async move {
        let writer = async {
            while let Some(bytes) = outgoing.recv().await {
                if write_frame(&mut write, &bytes).await.is_err() {
                    return;
                }
            }
        };
        let reader = async {
            let guard = ReplayGuard::new();
            let mut bytes = Vec::new();
            loop {
                if let Err(error) = read_frame(&mut read, limit, &mut bytes).await {
                    debug!(%addr, %error, "a direct actor call connection closed");
                    return;
                }
                let Some(caller) = caller.upgrade() else {
                    return;
                };
                if let Err(error) = caller.answered(&codec, &bytes, &guard, limit) {
                    warn!(%addr, %error, "an undecodable actor answer: connection closed");
                    return;
                }
            }
        };
        // Either side ending ends the connection.
        tokio::select! {
            () = writer => {}
            () = reader => {}
        }
        if let Some(caller) = caller.upgrade() {
            caller.direct_closed(&addr, &worker);
        }
    };
    let spawned = tokio::spawn(task);
    if let Some(caller) = registry.upgrade() {
        let mut tasks = caller.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|task| !task.is_finished());
        tasks.push(spawned);
    }
    Ok(frames)
}

/// A call the broker could not route (the actor queue is gone) is lost.
async fn confirm_loop(
    caller: Weak<Caller>,
    mut confirms: mpsc::UnboundedReceiver<(String, PublisherConfirm)>,
) {
    while let Some((call, confirm)) = confirms.recv().await {
        let returned = match confirm.await {
            Ok(Confirmation::Ack(returned)) => returned.is_some(),
            Ok(Confirmation::NotRequested) => false,
            Ok(Confirmation::Nack(_)) | Err(_) => true,
        };
        if returned {
            let Some(caller) = caller.upgrade() else {
                return;
            };
            let worker = caller
                .pending()
                .get(&call)
                .map(|p| p.worker.clone())
                .unwrap_or_default();
            if worker.is_empty() {
                continue;
            }
            caller.worker_lost(&worker);
        }
    }
}

/// Settles calls as their answers arrive.
async fn reply_loop(
    caller: Weak<Caller>,
    mut replies: lapin::Consumer,
    codec: Codec,
    limit: usize,
) {
    let guard = ReplayGuard::new();
    while let Some(delivery) = transport::next_delivery(&mut replies).await {
        let Ok(delivery) = delivery else { break };
        let Some(caller) = caller.upgrade() else {
            break;
        };
        if let Err(error) = caller.answered(&codec, &delivery.data, &guard, limit) {
            warn!(%error, "undecodable actor reply dropped");
        }
    }
}

fn call_error(error: TaskError) -> Error {
    if error.type_name() == ACTOR_LOST {
        Error::ActorLost {
            actor: error.key().to_owned(),
            reason: error.message().to_owned(),
        }
    } else {
        Error::Task(error)
    }
}

/// While calls are pending, checks that their workers' actor queues still
/// exist (a dead worker's exclusive queue is deleted with its connection)
/// and fails the calls of the workers that are gone.
async fn watchdog(caller: Weak<Caller>) {
    loop {
        tokio::time::sleep(WATCHDOG_EVERY).await;
        let Some(caller) = caller.upgrade() else {
            return;
        };
        let workers: HashSet<String> = caller
            .pending()
            .values()
            .map(|p| p.worker.clone())
            .collect();
        if workers.is_empty() {
            caller.watching.store(false, Ordering::Release);
            // A call may have slipped in after the check.
            if caller.pending().is_empty() || caller.watching.swap(true, Ordering::AcqRel) {
                return;
            }
            continue;
        }
        for worker in workers {
            if !actor_queue_exists(&caller, &worker).await {
                warn!(%worker, "actor worker is gone; failing its calls");
                caller.worker_lost(&worker);
            }
        }
    }
}

/// Passive declare on a throwaway channel: a missing queue closes it (404);
/// an exclusive queue of another connection answers 405, which means alive.
async fn actor_queue_exists(caller: &Caller, worker: &str) -> bool {
    // Between connected lives nothing is known; the calls waiting through
    // the broker failed with the lost connection anyway.
    let Some(connection) = caller.current() else {
        return true;
    };
    let Ok(channel) = connection.create_channel().await else {
        return true;
    };
    let declared = channel
        .queue_declare(
            name(&caller.names.actors_queue(worker)),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(_) => {
            let _ = channel.close(200, name("checked")).await;
            true
        }
        Err(error) => !matches!(
            error.kind(),
            lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404
        ),
    }
}
