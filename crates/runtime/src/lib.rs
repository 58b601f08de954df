//! Flotilla's shared I/O kit: what the client, the worker and the scheduler
//! all need to talk to RabbitMQ and Redis.
//!
//! - [`transport`]: connections, topology, publishing and consuming;
//! - [`supervise`]: reconnection with backoff;
//! - [`redis_conn`]: the [`Redis`] connection, one server or a Redis Cluster;
//! - [`blocked`]: RabbitMQ's blocked-connection notices during resource alarms;
//! - `refs` (private): the holders scripts that keep results alive, run by the store;
//! - [`custody`]: leases on long tasks (the store runs their scripts);
//! - [`store`]: the task-life keys and scripts (results, holders, specs, custody, leases);
//! - [`seal`]: signing's Redis side (key fingerprint, signed results);
//! - [`data`]: the direct data connection that serves kept values over TCP;
//! - [`shm`]: large values in shared memory, mapped by readers on the same host;
//! - [`cli`]: the connection flags, logging and signals of the binaries;
//! - `testing` (feature `testing`): test support, not product API: a local
//!   Redis Cluster of child processes for the tests.
//!
//! The wire contract itself (messages, codec, names, config) is
//! `flotilla-proto`, which depends on none of tokio, lapin or redis.

pub mod blocked;
pub mod cli;
pub mod custody;
pub mod data;
pub mod incarnation;
pub mod redis_conn;
mod refs;
pub mod seal;
pub mod shm;
pub mod store;
pub mod supervise;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod transport;
pub mod values;

pub use redis_conn::Redis;
