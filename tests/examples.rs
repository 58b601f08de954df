//! The example programs, run as a user would run them: separate processes
//! that connect with `Client::from_env()` to a cluster's namespace.

mod support;

use std::process::Command;
use support::{target_binary, TestCluster};

const EXAMPLES: &[(&str, &str)] = &[
    ("basic_submit", "add(1, 2) = 3"),
    ("multiple_tasks", "results = [0, 2, 4"),
    ("map_over_inputs", "last Some(9801)"),
    ("check_status", "result: 42"),
    ("error_handling", "Task failed: Negative value"),
    ("dependencies", "= 113"),
    ("complex_dependencies", "= 54"),
    ("queue_example", "results = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"),
    ("lock_example", "counter = 10 after 10 updates"),
    ("event_example", "Event occurred"),
    ("variable_example", "reader() = 42"),
    ("working_with_futures", "Result: 7 (from the done-callback)"),
    ("scatter_data", "gathered 100 results"),
    ("fire_and_forget", "logged after"),
    ("memory_management", "after drop: stored = false"),
    ("embarrassingly_parallel", "871 with 178 steps"),
    ("parameter_sweep", "handled 1000 simulations"),
    ("pipeline", "= 332833500"),
    ("iterative_algorithm", "converged after 8 iterations"),
    ("best_practices", "5. handled 100 results"),
    ("dynamic_submission", "= 500500"),
    ("actors", "count = 2"),
    ("wait_example", "all completed: 3 done"),
    ("semaphore_example", "the client holds a permit"),
    ("retries", "not retried on its error: attempt 1 failed"),
    ("priority", "ran after the 5 high-priority ones"),
    ("worker_placement", "ran on the GPU worker: true"),
    ("datasets", "= [0, 1, 4, 9, 16"),
    ("local_cluster", "= 5050"),
    ("time_limits", "over the default: "),
];

#[tokio::test]
async fn every_example_runs_against_a_cluster() {
    // The in-process workers serve the tasks linked into this test binary.
    flotilla_examples::link();
    let t = TestCluster::start("examples", 2).await;
    for (example, expected) in EXAMPLES {
        let path = target_binary(&format!("examples/{example}"));
        assert!(path.exists(), "{} is built by `cargo test`", path.display());
        let output = tokio::task::spawn_blocking({
            let config = t.config.clone();
            move || run_with_timeout(&path, &config, std::time::Duration::from_secs(120))
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{example} failed: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains(expected), "{example} printed {stdout:?}");
    }
    t.stop().await;
}

/// Runs an example against the cluster, killing it if it runs too long.
fn run_with_timeout(
    path: &std::path::Path,
    config: &flotilla::Config,
    limit: std::time::Duration,
) -> std::process::Output {
    let mut child = Command::new(path)
        .env("FLOTILLA_AMQP_URL", &config.amqp_url)
        .env("FLOTILLA_REDIS_URL", &config.redis_url)
        .env("FLOTILLA_NAMESPACE", &config.namespace)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("example starts");
    let started = std::time::Instant::now();
    while child.try_wait().expect("example status").is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("{} ran for more than {limit:?}", path.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().expect("example output")
}
