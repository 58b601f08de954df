//! TLS to both services: a cluster over `amqps://` and `rediss://`, with
//! certificates from a CA of our own, trusted through `SSL_CERT_FILE`
//! (read by the system trust store loader both connections use). Its own
//! test binary: the variable is process-wide.

mod support;

use flotilla::prelude::*;
use flotilla::{Config, Secret};
use flotilla_examples::add;
use support::services::{wait_for_port, PrivateRabbit, PrivateRedis, TestCa};
use support::{fresh_namespace, TestCluster};

#[tokio::test(flavor = "multi_thread")]
async fn a_signed_cluster_runs_over_amqps_and_rediss() {
    let ca = TestCa::new();
    std::env::set_var("SSL_CERT_FILE", ca.ca_file());
    let redis = PrivateRedis::start_tls(&ca);
    let (tls_port, rabbit) = PrivateRabbit::start_with_port(|port| ca.rabbit_conf(port), "[].");
    wait_for_port(tls_port, Duration::from_secs(30), "the TLS listener");
    let namespace = fresh_namespace("tls");
    let config = Config {
        amqp_url: format!("amqps://guest:guest@localhost:{tls_port}/%2f"),
        redis_url: redis.tls_url(),
        secret: Some(Secret::new(&namespace)),
        namespace,
        ..Config::default()
    };

    // The plain protocols are refused by the TLS ports.
    let plain = Config {
        redis_url: format!("redis://localhost:{}/0", redis.port),
        ..config.clone()
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(20), Client::connect(plain))
            .await
            .map_or(true, |connected| connected.is_err()),
        "plain Redis must not work on the TLS port"
    );

    let run = async {
        let t = TestCluster::start_with(config, 1, 2).await;
        let a = t.client.submit(add, (1, 2));
        let b = t.client.submit(add, (&a, 10));
        let data = t.client.scatter(&vec![7u8; 1 << 20]).await.unwrap();
        assert_eq!(b.result_timeout(Duration::from_secs(60)).await.unwrap(), 13);
        let back: Vec<u8> = data.result_timeout(Duration::from_secs(60)).await.unwrap();
        assert_eq!(back.len(), 1 << 20);
        println!("tls: tasks, dependencies and a 1 MiB scatter over amqps:// and rediss://");
        drop((a, b, data));
        t.stop().await;
    };
    // Never a hang: the private services go with the test either way.
    tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the cluster over TLS finishes within 3 minutes");
    drop(rabbit);
}
