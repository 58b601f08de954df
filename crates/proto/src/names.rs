//! Names of queues, exchanges and Redis keys inside a namespace.
//!
//! Every name starts with the namespace, so one broker and one Redis can
//! host many isolated clusters (and every test runs in its own namespace).

use crate::ConfigError;

/// A fresh random id (32 hex digits), for clients, workers and keys.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Checks that a namespace is usable in queue names and Redis keys:
/// 1 to 64 characters from `A-Z a-z 0-9 - _`.
pub fn validate_namespace(namespace: &str) -> Result<(), ConfigError> {
    let ok = !namespace.is_empty()
        && namespace.len() <= 64
        && namespace
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Namespace(namespace.to_owned()))
    }
}

/// The names one namespace uses in RabbitMQ and Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    namespace: String,
}

impl Names {
    /// Names for `namespace` (validate it first with [`validate_namespace`]).
    pub fn new(namespace: &str) -> Self {
        Names {
            namespace: namespace.to_owned(),
        }
    }

    /// The namespace itself.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Shared work queue all workers consume.
    pub fn tasks_queue(&self) -> String {
        format!("{}.tasks", self.namespace)
    }

    /// A worker's own queue, for tasks pinned to it.
    pub fn worker_queue(&self, worker: &str) -> String {
        format!("{}.worker.{worker}", self.namespace)
    }

    /// A worker's actor queue: method calls on the actors it hosts. Exclusive
    /// to the worker's connection, so it vanishes when the worker dies.
    pub fn actors_queue(&self, worker: &str) -> String {
        format!("{}.actors.{worker}", self.namespace)
    }

    /// Queue of client submissions and worker announcements for the scheduler.
    pub fn scheduler_queue(&self) -> String {
        format!("{}.scheduler", self.namespace)
    }

    /// Queue of completion events for the scheduler.
    pub fn scheduler_events_queue(&self) -> String {
        format!("{}.scheduler.events", self.namespace)
    }

    /// A client's queue of completion events.
    pub fn client_queue(&self, client: &str) -> String {
        format!("{}.client.{client}", self.namespace)
    }

    /// Where rejected and undecodable messages end up.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead-letter", self.namespace)
    }

    /// Topic exchange for completion events.
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.namespace)
    }

    /// Fanout exchange of control messages to every worker (cancellation).
    pub fn control_exchange(&self) -> String {
        format!("{}.control", self.namespace)
    }

    /// Fanout exchange that dead-lettered messages go through.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.namespace)
    }

    /// The Redis channel where workers also publish a client's small
    /// completion batches (`<ns>:events:<client>`): one Redis hop, where
    /// the broker's copy takes one RabbitMQ hop.
    pub fn client_events_channel(&self, client: &str) -> String {
        format!("{}:events:{client}", self.namespace)
    }

    /// Routing key of events a worker publishes for `client`.
    pub fn worker_event_route(client: &str) -> String {
        format!("w.{client}")
    }

    /// Routing key of events the scheduler publishes for `client`.
    pub fn scheduler_event_route(client: &str) -> String {
        format!("s.{client}")
    }

    /// Binding key with which a client receives every event for it.
    pub fn client_binding(client: &str) -> String {
        format!("*.{client}")
    }

    /// Binding key with which the scheduler receives every worker event.
    pub const SCHEDULER_BINDING: &'static str = "w.*";

    /// Redis key holding a task's stored result. The task key is the hash
    /// tag, so a key's result and holders share one Redis Cluster slot.
    pub fn result_key(&self, key: &str) -> String {
        format!("{}:r:{{{key}}}", self.namespace)
    }

    /// Redis hash holding the chunks (fields `"0"`..`"n-1"`) of a large
    /// value whose `r:` key holds only a manifest (see
    /// `flotilla_runtime::store`). Same hash tag as the result and holders.
    pub fn chunks_key(&self, key: &str) -> String {
        format!("{}:c:{{{key}}}", self.namespace)
    }

    /// Redis key of a submitted task's spec, kept until the task is done so
    /// that a restarted scheduler can take up every pending task again.
    pub fn spec_key(&self, key: &str) -> String {
        format!("{}:s:{{{key}}}", self.namespace)
    }

    /// Redis hash recording a redelivered task's starts that have not
    /// completed (`n`) and the worker it last started on (`w`): a task
    /// whose worker keeps dying under it errs `WorkerLost`.
    pub fn lost_key(&self, key: &str) -> String {
        format!("{}:a:{{{key}}}", self.namespace)
    }

    /// Pattern matching every stored task spec of the namespace.
    pub fn spec_pattern(&self) -> String {
        format!("{}:s:*", self.namespace)
    }

    /// Redis set of the holders of a key's result (see `flotilla_runtime::store`).
    pub fn holders_key(&self, key: &str) -> String {
        format!("{}:h:{{{key}}}", self.namespace)
    }

    /// The fingerprint of the key the namespace's scheduler signs with
    /// (see `flotilla_runtime::seal::publish_fingerprint`).
    pub fn seal_key(&self) -> String {
        format!("{}:seal", self.namespace)
    }

    /// The leader lease: `<scheduler id>|<epoch>` of the one active
    /// scheduler, with a time to live the active scheduler keeps renewing
    /// (see `flotilla_scheduler::leader`).
    pub fn leader_key(&self) -> String {
        format!("{}:leader", self.namespace)
    }

    /// The last fencing epoch handed to a scheduler that took the leader
    /// lease (it only grows; see `flotilla_scheduler::leader`). Its hash
    /// tag is the leader key's name, so on a Redis Cluster both are in one
    /// slot and one script takes the lease and bumps the epoch. (Before
    /// clusters it was `<ns>:epoch`; a scheduler that finds neither starts
    /// from the time in ms, so epochs still grow across the change.)
    pub fn epoch_key(&self) -> String {
        format!("{}:epoch:{{{}}}", self.namespace, self.leader_key())
    }

    /// A random marker every process reads at start (setting it when
    /// absent) and checks again later: when it is gone or changed, Redis
    /// lost its data (see `flotilla_runtime::incarnation`).
    pub fn incarnation_key(&self) -> String {
        format!("{}:incarnation", self.namespace)
    }

    /// Sorted set of tasks in a worker's custody (acknowledged to the
    /// broker early because they run long) by lease expiry (milliseconds
    /// since the epoch).
    pub fn custody_key(&self) -> String {
        format!("{}:custody", self.namespace)
    }

    /// Sorted set of clients by lease expiry (milliseconds since the epoch).
    pub fn leases_key(&self) -> String {
        format!("{}:leases", self.namespace)
    }

    /// Pattern matching every holders set of the namespace.
    pub fn holders_pattern(&self) -> String {
        format!("{}:h:*", self.namespace)
    }

    /// The task key inside a holders-set name (`<ns>:h:{key}`).
    pub fn key_of_holders(holders: &str) -> Option<&str> {
        let start = holders.find('{')? + 1;
        let end = holders.rfind('}')?;
        (start <= end).then(|| &holders[start..end])
    }

    /// Hash of published datasets: name → MessagePack list of keys.
    pub fn datasets_key(&self) -> String {
        format!("{}:datasets", self.namespace)
    }

    /// Pattern matching every Redis key of the namespace.
    pub fn redis_pattern(&self) -> String {
        format!("{}:*", self.namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_checked() {
        assert!(validate_namespace("flotilla").is_ok());
        assert!(validate_namespace("t-1_a").is_ok());
        for bad in ["", "a.b", "a b", "a:b", "a*", &"x".repeat(65)] {
            assert!(validate_namespace(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_carry_the_namespace() {
        let names = Names::new("ns");
        assert_eq!(names.tasks_queue(), "ns.tasks");
        assert_eq!(names.worker_queue("w1"), "ns.worker.w1");
        assert_eq!(names.actors_queue("w1"), "ns.actors.w1");
        assert_eq!(names.result_key("add-1"), "ns:r:{add-1}");
        assert_eq!(names.holders_key("add-1"), "ns:h:{add-1}");
        assert_eq!(names.chunks_key("add-1"), "ns:c:{add-1}");
        assert_eq!(names.lost_key("add-1"), "ns:a:{add-1}");
        // One hash slot for the lease and its epoch (a Redis Cluster runs
        // the script that takes one and bumps the other on one node).
        assert_eq!(names.leader_key(), "ns:leader");
        assert_eq!(names.epoch_key(), "ns:epoch:{ns:leader}");
        assert_eq!(
            Names::key_of_holders(&names.holders_key("add-1")),
            Some("add-1")
        );
        assert_eq!(Names::worker_event_route("c"), "w.c");
        assert_eq!(new_id().len(), 32);
    }
}
