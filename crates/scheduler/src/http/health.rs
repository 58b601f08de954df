//! `GET /health` and `GET /ready`: the probes of a process supervisor
//! (Kubernetes' liveness and readiness probes, `deploy/` in the repository).
//!
//! - `/health` (liveness) answers `200 {"status": "ok"}` whenever the HTTP
//!   server answers at all: the process and its runtime are alive. It does
//!   not look at RabbitMQ or Redis: a scheduler that lost them reconnects by
//!   itself (with growing pauses), and restarting it would not bring them
//!   back.
//! - `/ready` (readiness) answers `200` while the scheduler is connected to
//!   RabbitMQ and Redis, and `503` with the reason otherwise. Connected
//!   means a scheduler snapshot came within [`FRESH`]: the active
//!   scheduler publishes one every second from its loop, a standby one
//!   every leader poll (250 ms) after asking Redis for the lease, and
//!   neither publishes while it reconnects. A scheduler whose loop waits
//!   out a broker alarm (RabbitMQ blocks publishers) publishes none either,
//!   but is connected: it stays ready, so that its dashboard shows the
//!   alarm.
//!
//! **A standby is ready.** Readiness is "connected", not "holds the leader
//! lease", for two reasons. A rolling update of the two-replica scheduler
//! Deployment waits for each new pod to be ready before it stops an old
//! one, and a new pod starts as a standby while an old one holds the lease:
//! with "ready = active" the rollout would stall. And a standby's endpoint
//! is useful behind the Service: its dashboard and `/api/status` say
//! `standby` and name the active scheduler, and its `/metrics` report no
//! tasks, so Prometheus sums over both pods correctly. The answer names
//! the role: `{"status": "ready", "role": "standby", "leader": "<id>|<epoch>"}`.

use super::{json_response, Shared};
use crate::broker::BrokerStatus;
use crate::server::{Role, Snapshot};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How recent the last scheduler snapshot must be for `/ready` (the
/// dashboard calls an older one `stale` too).
pub(super) const FRESH: Duration = Duration::from_secs(5);

/// `GET /health`: the HTTP server answers.
pub(super) async fn health() -> Response {
    json_response(StatusCode::OK, &json!({ "status": "ok" }))
}

/// `GET /ready`: `200` while connected to RabbitMQ and Redis (active or
/// standby), `503` otherwise; see [`readiness`].
pub(super) async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    let snapshot = shared.snapshot();
    let verdict = {
        let monitor = shared.monitor();
        readiness(
            &snapshot,
            monitor.last_snapshot,
            &monitor.broker,
            Instant::now(),
        )
    };
    let role = snapshot.role.as_str();
    match verdict {
        Ok(()) => json_response(
            StatusCode::OK,
            &json!({ "status": "ready", "role": role, "leader": snapshot.leader }),
        ),
        Err(reason) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "status": "not ready", "role": role, "reason": reason }),
        ),
    }
}

/// Whether a scheduler whose last snapshot is `snapshot`, seen at
/// `last_seen`, is connected at `now`: the snapshot is at most [`FRESH`]
/// old and says `active` or `standby`, or the broker blocks publishers
/// (the loop waits out the alarm, connected). `Err` says why not.
pub(super) fn readiness(
    snapshot: &Snapshot,
    last_seen: Option<Instant>,
    broker: &BrokerStatus,
    now: Instant,
) -> Result<(), String> {
    let Some(seen) = last_seen else {
        return Err("starting: not yet connected to RabbitMQ and Redis".to_owned());
    };
    if snapshot.role == Role::Starting {
        return Err("starting: not yet connected to RabbitMQ and Redis".to_owned());
    }
    let age = now.saturating_duration_since(seen);
    if age <= FRESH || broker.blocked {
        return Ok(());
    }
    Err(format!(
        "no word from the scheduler for {:.1} s: it is reconnecting to RabbitMQ or Redis",
        age.as_secs_f64()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_means_a_fresh_snapshot_of_an_active_or_standby_scheduler() {
        let now = Instant::now();
        let clear = BrokerStatus::default();
        let active = Snapshot::empty("ns", Role::Active);
        let standby = Snapshot::empty("ns", Role::Standby);
        let starting = Snapshot::empty("ns", Role::Starting);
        assert!(readiness(&active, None, &clear, now).is_err());
        assert!(readiness(&starting, Some(now), &clear, now).is_err());
        assert_eq!(readiness(&active, Some(now), &clear, now), Ok(()));
        assert_eq!(readiness(&standby, Some(now), &clear, now), Ok(()));
        let old = now + FRESH + Duration::from_millis(100);
        let stale = readiness(&active, Some(now), &clear, old).unwrap_err();
        assert!(stale.contains("reconnecting"), "{stale}");
        let blocked = BrokerStatus {
            blocked: true,
            ..BrokerStatus::default()
        };
        assert_eq!(readiness(&active, Some(now), &blocked, old), Ok(()));
    }
}
