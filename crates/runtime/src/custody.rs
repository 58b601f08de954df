//! Custody of long-running tasks.
//!
//! RabbitMQ closes a consumer's channel when a delivery stays
//! unacknowledged longer than its `consumer_timeout`, and hands the
//! delivery to another consumer: a long task would be killed or run twice.
//! So a worker acknowledges a delivery that has been running (or waiting)
//! longer than [`Config::long_task_ms`](flotilla_proto::Config::long_task_ms), and
//! keeps its unfinished tasks in *custody* instead: a sorted set
//! (`<ns>:custody`, task key → lease expiry in Redis's clock) whose leases
//! the worker renews while it lives and removes as each task completes.
//! When a lease lapses (the worker died), the scheduler takes the task back
//! and hands it out again, as the broker would have redelivered it.
//!
//! The scripts run through [`crate::store::Store::renew_custody`] and
//! [`crate::store::Store::lapsed_custody`]; completions leave custody with
//! [`crate::store::Batch::leave_custody`].

use std::sync::LazyLock;

/// Puts task keys in custody, or renews their leases, until Redis's clock
/// plus `ARGV[1]` milliseconds. KEYS: custody set. ARGV: lease, keys...
pub(crate) static RENEW: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], expiry, ARGV[i])
end
return #ARGV - 1
"#,
    )
});

/// Takes (removes and returns) up to 1000 task keys whose custody lapsed.
/// KEYS: custody set.
pub(crate) static LAPSED: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1000)
if #due > 0 then
  redis.call('ZREM', KEYS[1], unpack(due))
end
return due
"#,
    )
});
