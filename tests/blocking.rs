//! The blocking client, from a plain synchronous test, as a script would use it.

mod support;

use flotilla::Status;
use flotilla_examples::features::{fail_first, started_at};
use flotilla_examples::{add, might_fail, slow_identity, total};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[test]
fn the_blocking_client_submits_maps_gathers_and_chains() {
    let config = support::fresh_config("blocking");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cluster = runtime.block_on(async {
        flotilla::LocalCluster::builder()
            .config(config.clone())
            .workers(2)
            .purge_on_shutdown(true)
            .start()
            .await
            .unwrap()
    });

    let client = flotilla::blocking::Client::connect(config).unwrap();
    let future = client.submit(add, (1, 2));
    assert_eq!(future.result().unwrap(), 3);
    assert_eq!(future.status(), Status::Finished);
    let chained = client.submit(add, (&future, 10));
    assert_eq!(chained.result().unwrap(), 13);
    let parts = client.map(add, (0..10).map(|i| (i, 1)));
    assert_eq!(
        client.gather(&parts).unwrap(),
        (1..=10).collect::<Vec<i64>>()
    );
    assert_eq!(client.submit(total, (&parts,)).result().unwrap(), 55);
    let failed = client.submit(might_fail, (-1,));
    assert!(failed.result().is_err());
    assert!(failed.exception().is_some() && failed.traceback().is_some());
    // A time limit, as on the async client.
    let late = client
        .submit_with(slow_identity, (1, 600_000))
        .timeout(Duration::from_millis(300))
        .submit();
    match late.result() {
        Err(flotilla::Error::Task(error)) => {
            assert_eq!(error.kind(), flotilla::ErrorKind::TimedOut, "{error}")
        }
        other => panic!("expected TimedOut, got {other:?}"),
    }
    // Retries that wait, and a start time, as on the async client.
    let began = std::time::Instant::now();
    let attempt = client
        .submit_with(fail_first, ("blocking-delayed".to_string(), 1))
        .retries(2)
        .retry_delay(Duration::from_millis(300))
        .backoff(2.0)
        .max_retry_delay(Duration::from_secs(1))
        .retry_jitter(false)
        .retry_on(["String"])
        .submit()
        .result()
        .unwrap();
    assert_eq!(attempt, 2);
    assert!(began.elapsed() >= Duration::from_millis(300));
    let asked = SystemTime::now();
    let started = client
        .submit_with(started_at, ("blocking-later".to_string(),))
        .after(Duration::from_millis(400))
        .submit()
        .result()
        .unwrap();
    let asked_ms = asked.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    assert!(
        started >= asked_ms + 400,
        "started {} ms later",
        started - asked_ms.min(started)
    );
    let at = SystemTime::now() + Duration::from_millis(200);
    let started = client
        .submit_with(started_at, ("blocking-at".to_string(),))
        .at(at)
        .submit()
        .result()
        .unwrap();
    assert!(started >= at.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64);
    drop(client);

    runtime.block_on(cluster.shutdown()).unwrap();
}
