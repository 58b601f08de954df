//! The worker's health file, for a process supervisor's liveness check
//! (Kubernetes' exec probe, `deploy/` in the repository).
//!
//! With [`WorkerOptions::health_file`](crate::WorkerOptions::health_file)
//! set (`flotilla-worker --health-file PATH`, `FLOTILLA_HEALTH_FILE`), the
//! worker writes that file after every heartbeat it published (every
//! [`HEARTBEAT`](crate::HEARTBEAT), 2 s), and before each attempt to
//! reconnect after losing RabbitMQ or Redis. Its modification time so says
//! when the worker last showed it is working or trying to: a worker that
//! is reconnecting is alive (restarting it would not bring the broker
//! back, and would lose the large results it keeps), while one whose
//! heartbeat has stalled for long is what the scheduler, too, counts as
//! gone.
//!
//! `flotilla-worker --check-health MAX_AGE` ([`check`]) is the probe: it
//! exits 0 when the file was written within `MAX_AGE`, and 1 otherwise,
//! saying why. It needs no shell, so it works in any image that has the
//! worker binary.
//!
//! ```no_run
//! # fn demo() -> Result<(), String> {
//! use std::time::Duration;
//! let age = flotilla_worker::health::check(
//!     std::path::Path::new("/tmp/flotilla-worker.health"),
//!     Duration::from_secs(60),
//! )?;
//! println!("last heartbeat {:.1} s ago", age.as_secs_f64());
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::warn;

/// Where a worker notes its heartbeats; nothing when `None`.
#[derive(Debug, Clone, Default)]
pub(crate) struct HealthFile(Option<PathBuf>);

impl HealthFile {
    /// The health file at `path`, or none.
    pub(crate) fn new(path: Option<PathBuf>) -> Self {
        HealthFile(path)
    }

    /// Writes the file now (its content: the time, in seconds since the
    /// Unix epoch, for people looking at it). A failure is logged, not
    /// returned: the probe then sees an old file and says so.
    pub(crate) fn touch(&self) {
        let Some(path) = &self.0 else { return };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        if let Err(error) = std::fs::write(path, format!("{}\n", now.as_secs())) {
            warn!(%error, path = %path.display(), "cannot write the health file");
        }
    }
}

/// How long ago the health file at `path` was written, if within
/// `max_age`; `Err` says why the worker is not healthy (no file, or too
/// old).
pub fn check(path: &Path, max_age: Duration) -> Result<Duration, String> {
    let modified = std::fs::metadata(path)
        .and_then(|meta| meta.modified())
        .map_err(|error| {
            format!(
                "no heartbeat noted in {}: {error} (is the worker started with --health-file {0}?)",
                path.display()
            )
        })?;
    // A file from the future (a clock step back) counts as fresh.
    let age = SystemTime::now()
        .duration_since(modified)
        .unwrap_or_default();
    if age > max_age {
        return Err(format!(
            "last heartbeat {:.1} s ago (more than {:.1} s): the worker is stuck or cannot reach RabbitMQ",
            age.as_secs_f64(),
            max_age.as_secs_f64()
        ));
    }
    Ok(age)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temporary(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "flotilla-health-{name}-{}",
            flotilla_proto::new_id()
        ));
        let _ = std::fs::remove_file(&path);
        path
    }

    #[test]
    fn a_touched_file_is_healthy_until_it_is_too_old() {
        let path = temporary("touched");
        let minute = Duration::from_secs(60);
        let missing = check(&path, minute).unwrap_err();
        assert!(missing.contains("--health-file"), "{missing}");

        HealthFile::new(Some(path.clone())).touch();
        let age = check(&path, minute).expect("just written");
        assert!(age < minute);
        let written: u64 = std::fs::read_to_string(&path)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            written > 1_600_000_000,
            "seconds since the epoch: {written}"
        );

        // Two minutes old: a stalled heartbeat.
        let old = SystemTime::now() - Duration::from_secs(120);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let stale = check(&path, minute).unwrap_err();
        assert!(stale.contains("last heartbeat 1"), "{stale}");
        assert!(check(&path, Duration::from_secs(600)).is_ok());

        // The next heartbeat makes it fresh again.
        HealthFile::new(Some(path.clone())).touch();
        assert!(check(&path, minute).is_ok());
        std::fs::remove_file(&path).unwrap();
    }
}
