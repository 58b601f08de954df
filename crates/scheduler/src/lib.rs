//! The Flotilla scheduler.
//!
//! [`core`] is the scheduling state machine, free of I/O; [`server`] wires it
//! to RabbitMQ (submissions and completion events in, ready tasks out) and
//! Redis (stored errors, lookups of inputs it does not hold); [`http`] serves
//! metrics, a status API and a dashboard through the server's [`Hooks`];
//! [`broker`] follows RabbitMQ's resource alarms (blocked publishers);
//! [`tally`] counts tasks by name and outcome, with their run times;
//! [`failures`] keeps the last task errors.

pub mod admission;
pub mod broker;
pub mod core;
pub mod failures;
pub mod http;
pub mod leader;
pub mod server;
pub mod tally;

pub use http::HttpServer;
pub use server::{
    run, run_with_hooks, Hooks, Role, SchedulerError, SchedulerHandle, Snapshot, TaskQuery,
};
