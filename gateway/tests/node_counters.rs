//! Counters belong to one node: two gateways started in one process (as `cairn dev` runs
//! three) each count only their own requests and connections.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use cairn_gateway::config::NodeConfig;
use cairn_gateway::daemon::{self, Started};
use cairn_gateway::raft::network::HttpClient;

async fn start(id: u64, dir: &std::path::Path) -> Started {
    let started = daemon::start(NodeConfig {
        node_id: id,
        data_dir: dir.join(format!("node{id}")),
        http_addr: "127.0.0.1:0".into(),
        raft_addr: "127.0.0.1:0".into(),
        device_addr: "127.0.0.1:0".into(),
        bootstrap: true,
        ..NodeConfig::default()
    })
    .await
    .unwrap();
    started
        .cluster
        .raft()
        .wait(Some(Duration::from_secs(10)))
        .state(openraft::ServerState::Leader, "leader")
        .await
        .unwrap();
    started
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_two_nodes_in_one_process_count_apart() {
    let dir = tempfile::tempdir().unwrap();
    let a = start(1, dir.path()).await;
    let b = start(2, dir.path()).await;
    let http = HttpClient::new(None);
    for sql in [
        r#"["CREATE TABLE t (x INTEGER)"]"#,
        r#"["INSERT INTO t VALUES (1)"]"#,
    ] {
        http.post_json(
            &a.cluster.peer().http_addr,
            "/db/execute",
            sql,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    }
    let device = tokio::net::TcpStream::connect(&a.cluster.peer().device_addr)
        .await
        .unwrap();
    let (ma, mb) = (a.cluster.metrics(), b.cluster.metrics());
    // The connection is counted when its task starts.
    for _ in 0..500 {
        if ma.connections_accepted.load(Relaxed) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ma.http_requests.load(Relaxed), 2);
    assert_eq!(mb.http_requests.load(Relaxed), 0);
    assert_eq!(ma.connections_accepted.load(Relaxed), 1);
    assert_eq!(mb.connections_accepted.load(Relaxed), 0);
    assert!(ma.writes_proposed.load(Relaxed) >= 2);
    drop(device);
    a.stop().await;
    b.stop().await;
}
