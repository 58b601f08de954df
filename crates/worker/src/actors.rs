//! Actors: stateful objects that live on one worker and serve method calls.
//!
//! `#[flotilla::actor]` implements [`Actor`] for a type and registers each of
//! its constructors with an [`ActorRegistration`]. Creating an actor is an
//! ordinary task, [`CREATE_ACTOR`], placed by the scheduler like any other
//! (so `workers=` works); it builds the object on the worker that runs it and
//! returns an [`ActorInfo`] naming that worker's actor queue.
//!
//! Method calls bypass the scheduler. Where the worker has a data
//! connection, a client sends its calls straight to it (a *direct call
//! connection*: the data connection's listener hands over a connection that
//! opens with `"FLA"`; see `serve_direct`) and the answers come back on the
//! same connection; otherwise, or when that connection cannot be made, the
//! client publishes [`ActorCall`]s to the worker's actor queue with
//! RabbitMQ's direct reply-to. Either way a client's calls reach the mailbox
//! in the order it made them (one ordered path per worker). The queue is
//! exclusive to a connection of its own, so it vanishes the moment the
//! worker dies, which is how callers learn their actor is lost. Every actor
//! has a mailbox (one tokio task) that runs its calls one at a time in
//! arrival order. The result is stored in Redis under the call's key first
//! (only while someone holds the key: the caller takes its hold before it
//! sends the call), and the answer then goes to the caller's reply-to, so
//! that the call's future can be passed into tasks like any other, and the
//! caller's release always comes after the store.
//!
//! An actor is dropped when its key has no holders left: promptly when its
//! last client handle goes (the client broadcasts
//! [`ToWorker::DropActors`](flotilla_proto::ToWorker::DropActors)), and
//! otherwise by a periodic sweep (a client that died, a handle held by a
//! task).

use crate::panic::CatchUnwind;
use flotilla_proto::{
    ActorCall, ActorInfo, ActorReply, Codec, Config, ErrorKind, Names, Purpose, ReplayGuard,
    TaskError,
};
use flotilla_runtime::store::Store;
use flotilla_runtime::transport::{self, name};
use flotilla_task::actor::constructors;
pub use flotilla_task::actor::{
    unknown_method, Actor, ActorRegistration, Construct, DynActor, ACTOR_LOST, CREATE_ACTOR,
    CREATE_ACTOR_FINGERPRINT,
};
use flotilla_task::registry::{
    decode_arguments, encode_output, Invocation, TaskOutcome, TaskRegistration,
};
use flotilla_task::{Arguments, TaskContext};
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{debug, info, warn};

/// How often a worker checks that its actors are still referenced.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Most call results stored in one Redis pipeline.
const MAX_STORE_BATCH: usize = 1024;

inventory::submit! {
    TaskRegistration::new(CREATE_ACTOR, CREATE_ACTOR_FINGERPRINT, invoke_create)
        .with_module_path(module_path!())
}

fn invoke_create(ctx: TaskContext, args: Arguments<'_>) -> Invocation {
    let (constructor, constructor_args): (String, serde_bytes::ByteBuf) =
        match decode_arguments(CREATE_ACTOR, args) {
            Ok(decoded) => decoded,
            Err(error) => return Invocation::Ready(Err(error)),
        };
    // Async, so that a panicking constructor is caught like a task's panic.
    Invocation::Async(Box::pin(async move {
        create(&ctx, &constructor, &constructor_args)
    }))
}

/// Builds the actor `ctx.key()` on this worker (once: a redelivered
/// creation finds it there) and says where it lives.
fn create(ctx: &TaskContext, constructor: &str, args: &[u8]) -> TaskOutcome {
    let host = hosts()
        .get(ctx.worker_id())
        .and_then(Weak::upgrade)
        .ok_or_else(|| {
            TaskError::new(
                ErrorKind::Internal,
                "flotilla::NoActorHost",
                format!("worker {} does not host actors", ctx.worker_id()),
            )
        })?;
    let info = ActorInfo {
        worker: host.worker.clone(),
        queue: host.names.actors_queue(&host.worker),
        addr: host.addr.clone(),
    };
    if host.table().contains_key(ctx.key()) {
        return encode_output(&info);
    }
    let registration = constructors().get(constructor).ok_or_else(|| {
        TaskError::new(
            ErrorKind::UnknownTask,
            "flotilla::UnknownActor",
            format!(
                "worker {} does not provide actor constructor `{constructor}` (it provides {}): \
                 link the actor's crate into the worker binary",
                host.worker,
                constructors().len()
            ),
        )
    })?;
    let actor = registration.construct(args)?;
    host.spawn_mailbox(ctx.key(), constructor, actor);
    encode_output(&info)
}

/// The worker's actors, reachable from the creation task by worker id (a
/// process may run several workers, as `LocalCluster` does).
fn hosts() -> std::sync::MutexGuard<'static, HashMap<String, Weak<ActorHost>>> {
    static HOSTS: OnceLock<Mutex<HashMap<String, Weak<ActorHost>>>> = OnceLock::new();
    HOSTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Drops the actors `keys` if worker `worker` hosts them; calls already in
/// their mailboxes still run.
pub(crate) fn drop_actors(worker: &str, keys: &[String]) {
    let host = hosts().get(worker).and_then(Weak::upgrade);
    if let Some(host) = host {
        let mut table = host.table();
        for key in keys {
            if table.remove(key).is_some() {
                info!(actor = %key, "actor dropped: no handle is left");
            }
        }
    }
}

/// One call waiting in a mailbox.
struct Job {
    call: ActorCall,
    reply_to: Option<ReplyTo>,
}

/// Where a call's answer goes.
enum ReplyTo {
    /// The caller's direct reply-to, on the broker.
    Broker(ShortString),
    /// The caller's direct call connection: the encoded answer is written
    /// to it.
    Direct(mpsc::UnboundedSender<Vec<u8>>),
}

/// An actor in the table: its mailbox.
struct Mailbox {
    sender: mpsc::UnboundedSender<Job>,
    task: AbortHandle,
}

/// What mailboxes need to answer calls.
struct Replier {
    channel: Channel,
    codec: Codec,
    stores: mpsc::UnboundedSender<Answer>,
}

/// A call's result to store, and the answer to send once it is stored.
struct Answer {
    call: String,
    stored: Vec<u8>,
    reply: Option<(ReplyTo, Vec<u8>)>,
}

/// A worker's actors, their queue and their connection.
pub(crate) struct ActorHost {
    worker: String,
    names: Names,
    /// The worker's advertised data address, where clients open direct
    /// call connections (none: calls go through the broker only).
    addr: Option<String>,
    codec: Codec,
    /// Largest call taken, in bytes.
    limit: usize,
    /// Replays of calls, through the queue or direct connections.
    guard: ReplayGuard,
    actors: Mutex<HashMap<String, Mailbox>>,
    replier: Arc<Replier>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    // Kept so the queue lives exactly as long as the host.
    _connection: Connection,
}

/// Owns a worker's [`ActorHost`]: dropping it (the worker stopping or being
/// killed) stops every actor and closes the actor connection, which deletes
/// the actor queue.
pub(crate) struct ActorHostGuard(Arc<ActorHost>);

impl Drop for ActorHostGuard {
    fn drop(&mut self) {
        hosts().remove(&self.0.worker);
        for (_, mailbox) in self.0.table().drain() {
            mailbox.task.abort();
        }
        for task in self
            .0
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

impl ActorHost {
    /// Opens the actor connection, declares and consumes worker `worker`'s
    /// actor queue, and makes the host reachable by the creation task and
    /// by direct call connections to `addr` (the worker's advertised data
    /// address, if it has one).
    pub(crate) async fn start(
        config: &Config,
        worker: &str,
        store: Store,
        addr: Option<String>,
    ) -> lapin::Result<ActorHostGuard> {
        let names = config.names();
        let connection = transport::connect_amqp(
            &config.amqp_url,
            &format!("flotilla-worker {worker} actors ({})", names.namespace()),
        )
        .await?;
        let consume = connection.create_channel().await?;
        let queue = names.actors_queue(worker);
        consume
            .queue_declare(
                name(&queue),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let consumer = consume
            .basic_consume(
                name(&queue),
                name(&format!("{worker}.actors")),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let (stores, store_rx) = mpsc::unbounded_channel();
        let codec = Codec::new(config);
        let replier = Arc::new(Replier {
            channel: connection.create_channel().await?,
            codec: codec.clone(),
            stores,
        });
        let host = Arc::new(ActorHost {
            worker: worker.to_owned(),
            names: names.clone(),
            addr,
            codec: codec.clone(),
            limit: config.max_payload.saturating_mul(2),
            guard: ReplayGuard::new(),
            actors: Mutex::new(HashMap::new()),
            replier,
            tasks: Mutex::new(Vec::new()),
            _connection: connection,
        });
        let tasks = vec![
            tokio::spawn(serve(Arc::downgrade(&host), consumer)),
            tokio::spawn(store_loop(
                store_rx,
                store.clone(),
                host.replier.channel.clone(),
            )),
            tokio::spawn(sweep(Arc::downgrade(&host), store)),
        ];
        *host.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        hosts().insert(worker.to_owned(), Arc::downgrade(&host));
        Ok(ActorHostGuard(host))
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Mailbox>> {
        self.actors.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spawn_mailbox(&self, key: &str, constructor: &str, actor: Box<dyn DynActor>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let span = tracing::info_span!("actor", actor = %key, worker = %self.worker);
        let task = tokio::spawn(tracing::Instrument::instrument(
            mailbox(actor, receiver, self.replier.clone()),
            span,
        ));
        debug!(actor = %key, %constructor, "actor created");
        self.table().insert(
            key.to_owned(),
            Mailbox {
                sender,
                task: task.abort_handle(),
            },
        );
    }

    /// Sends an undecodable call to the namespace's dead-letter exchange,
    /// like the other consumers' rejections. The actor queue is consumed
    /// without acknowledgements (calls are cheap, the queue dies with its
    /// worker), so the broker cannot dead-letter it by itself.
    async fn dead_letter(&self, bytes: &[u8], reason: &str) {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("x-flotilla-queue"),
            AMQPValue::LongString(self.names.actors_queue(&self.worker).into()),
        );
        headers.insert(
            ShortString::from("x-flotilla-reason"),
            AMQPValue::LongString(reason.into()),
        );
        let published = self
            .replier
            .channel
            .basic_publish(
                name(&self.names.dead_letter_exchange()),
                name(""),
                BasicPublishOptions::default(),
                bytes,
                transport::transient().with_headers(headers),
            )
            .await;
        if let Err(error) = published {
            warn!(%error, "could not dead-letter an actor call");
        }
    }

    /// Hands a call to its actor's mailbox, or answers that the actor is gone.
    async fn route(&self, job: Job) {
        let job = {
            let table = self.table();
            match table.get(&job.call.actor) {
                Some(mailbox) => match mailbox.sender.send(job) {
                    Ok(()) => return,
                    Err(mpsc::error::SendError(job)) => job,
                },
                None => job,
            }
        };
        let error = TaskError::new(
            ErrorKind::WorkerLost,
            ACTOR_LOST,
            format!(
                "actor `{}` is not on worker {} (it was dropped, or its worker restarted)",
                job.call.actor, self.worker
            ),
        )
        .at(&job.call.call, &job.call.method);
        self.replier.answer(job, Err(error), false).await;
    }
}

impl Replier {
    /// With `store`, has the outcome stored in Redis and then sent to the
    /// caller; otherwise sends it at once.
    async fn answer(&self, job: Job, outcome: TaskOutcome, store: bool) {
        let Job { call, reply_to } = job;
        let stored = store.then(|| match &outcome {
            Ok(bytes) => self.codec.result_ok(&call.call, bytes),
            Err(error) => self.codec.result_err(&call.call, error),
        });
        let reply = reply_to.map(|reply_to: ReplyTo| {
            let reply = ActorReply {
                call: call.call.clone(),
                outcome: outcome.map(|encoded| serde_bytes::ByteBuf::from(encoded.into_vec())),
            };
            (reply_to, self.codec.encode(Purpose::ActorReply, &reply))
        });
        match stored {
            Some(stored) => {
                let answer = Answer {
                    call: call.call,
                    stored,
                    reply,
                };
                if let Err(mpsc::error::SendError(answer)) = self.stores.send(answer) {
                    // The store loop is gone (the host is stopping).
                    if let Some((reply_to, bytes)) = answer.reply {
                        send_reply(&self.channel, &answer.call, reply_to, bytes).await;
                    }
                }
            }
            None => {
                if let Some((reply_to, bytes)) = reply {
                    send_reply(&self.channel, &call.call, reply_to, bytes).await;
                }
            }
        }
    }
}

/// Sends an encoded [`ActorReply`] to its caller: published to its direct
/// reply-to, or written to its direct call connection.
async fn send_reply(channel: &Channel, call: &str, reply_to: ReplyTo, bytes: Vec<u8>) {
    let reply_to = match reply_to {
        ReplyTo::Broker(reply_to) => reply_to,
        ReplyTo::Direct(connection) => {
            if connection.send(bytes).is_err() {
                debug!(%call, "the caller's direct connection closed before its answer");
            }
            return;
        }
    };
    let properties = BasicProperties::default()
        .with_correlation_id(ShortString::from(call))
        .with_delivery_mode(1);
    if let Err(error) = channel
        .basic_publish(
            name(""),
            reply_to,
            BasicPublishOptions::default(),
            &bytes,
            properties,
        )
        .await
    {
        warn!(%error, %call, "could not answer an actor call");
    }
}

/// Takes calls off the actor queue and routes them to mailboxes.
async fn serve(host: Weak<ActorHost>, mut consumer: lapin::Consumer) {
    // The host's guard sees every call, from this queue (its one consumer
    // for the host's life) and from direct call connections alike.
    while let Some(delivery) = transport::next_delivery(&mut consumer).await {
        let Ok(delivery) = delivery else { break };
        let Some(host) = host.upgrade() else { break };
        let opened = host.codec.open::<ActorCall>(
            Purpose::ActorCall,
            &delivery.data,
            delivery.redelivered,
            &host.guard,
            host.limit,
        );
        match opened {
            Ok(call) => {
                let reply_to = delivery.properties.reply_to().clone();
                let reply_to = reply_to.map(ReplyTo::Broker);
                host.route(Job { call, reply_to }).await;
            }
            Err(error) => {
                warn!(%error, bytes = delivery.data.len(), "undecodable actor call dead-lettered");
                host.dead_letter(&delivery.data, &error.to_string()).await;
            }
        }
    }
}

/// Takes a direct call connection the data connection's listener handed
/// over: its header's length is that of the worker id that follows (the
/// worker's id changes when it reconnects; the listener stays), then
/// [`serve_direct`].
pub(crate) async fn accept_direct(
    mut stream: tokio::net::TcpStream,
    header: [u8; flotilla_runtime::data::REQUEST_HEADER],
) {
    use tokio::io::AsyncReadExt;
    let length = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if header[3] != flotilla_runtime::data::DIRECT_CALLS_VERSION || length > 1024 {
        debug!(
            version = header[3],
            length, "a direct call connection refused"
        );
        return;
    }
    let mut worker = vec![0u8; length];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut worker)).await;
    match (read, String::from_utf8(worker)) {
        (Ok(Ok(_)), Ok(worker)) => serve_direct(worker, stream).await,
        _ => debug!("a direct call connection sent no worker id"),
    }
}

/// Serves a direct call connection to worker `worker`'s actors (handed over
/// by the data connection's listener after its `"FLA"` header): frames
/// `length: u32 BE | envelope` both ways, calls in (an [`ActorCall`] sealed
/// like one sent through the broker) and answers out (an [`ActorReply`]),
/// the calls routed to their mailboxes in the order they arrive. Ends when
/// the caller closes, sends something that does not open, or the host is
/// gone; answers still due are written first.
async fn serve_direct(worker: String, stream: tokio::net::TcpStream) {
    use flotilla_runtime::data::{read_frame, write_frame};
    let host = hosts().get(&worker).and_then(Weak::upgrade);
    let Some(host) = host else {
        debug!(%worker, "a direct call connection for a worker without actors here");
        return;
    };
    let (codec, limit) = (host.codec.clone(), host.limit);
    let host = Arc::downgrade(&host);
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    info!(?peer, "a client opened a direct actor call connection");
    let (mut read, mut write) = stream.into_split();
    let (answers, mut outgoing) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = async move {
        while let Some(bytes) = outgoing.recv().await {
            if write_frame(&mut write, &bytes).await.is_err() {
                return;
            }
        }
    };
    let reader = async move {
        let mut bytes = Vec::new();
        loop {
            if let Err(error) = read_frame(&mut read, limit, &mut bytes).await {
                if error.kind() != std::io::ErrorKind::UnexpectedEof {
                    warn!(%error, "a direct actor call connection closed");
                }
                return;
            }
            let Some(host) = host.upgrade() else { return };
            match codec.open::<ActorCall>(Purpose::ActorCall, &bytes, false, &host.guard, limit) {
                Ok(call) => {
                    let reply_to = Some(ReplyTo::Direct(answers.clone()));
                    host.route(Job { call, reply_to }).await;
                }
                Err(error) => {
                    warn!(%error, "a direct actor call did not open: connection closed");
                    return;
                }
            }
        }
    };
    // The writer ends once the reader and every call it routed have
    // dropped their senders: every answer due is written.
    tokio::join!(reader, writer);
}

/// Runs one actor's calls, one at a time, in arrival order.
async fn mailbox(
    mut actor: Box<dyn DynActor>,
    mut calls: mpsc::UnboundedReceiver<Job>,
    replier: Arc<Replier>,
) {
    while let Some(job) = calls.recv().await {
        let outcome = CatchUnwind::new(actor.dispatch_dyn(&job.call.method, &job.call.args)).await;
        let outcome = outcome.map_err(|error| error.at(&job.call.call, &job.call.method));
        replier.answer(job, outcome, true).await;
    }
}

/// Stores call results in batches, each only while its key is held (the
/// caller holds it from before the call until its handles are gone), then
/// answers the callers: a caller hears of a result only once it is stored,
/// and its release can never come before the store and leave it behind.
async fn store_loop(mut rx: mpsc::UnboundedReceiver<Answer>, store: Store, channel: Channel) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, MAX_STORE_BATCH).await > 0 {
        let mut writes = store.batch();
        for answer in &batch {
            writes.store_result(&answer.call, &answer.stored);
        }
        if let Err(error) = writes.exec().await {
            warn!(%error, "storing actor call results failed");
        }
        for answer in batch.drain(..) {
            if let Some((reply_to, bytes)) = answer.reply {
                send_reply(&channel, &answer.call, reply_to, bytes).await;
            }
        }
    }
}

/// Drops actors whose key nobody holds any more (their clients died, or
/// released them without telling).
async fn sweep(host: Weak<ActorHost>, store: Store) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(host) = host.upgrade() else { return };
        let keys: Vec<String> = host.table().keys().cloned().collect();
        if keys.is_empty() {
            continue;
        }
        let Ok(held) = store.held(&keys).await else {
            continue;
        };
        let gone: Vec<String> = keys
            .into_iter()
            .zip(held)
            .filter(|(_, held)| !*held)
            .map(|(key, _)| key)
            .collect();
        if !gone.is_empty() {
            drop_actors(&host.worker, &gone);
        }
    }
}

/// Keys of the actors worker `worker` hosts in this process (for tests and
/// diagnostics of in-process workers).
pub fn hosted_actors(worker: &str) -> Vec<String> {
    let host = hosts().get(worker).and_then(Weak::upgrade);
    host.map(|host| host.table().keys().cloned().collect())
        .unwrap_or_default()
}
