//! The embedding API on real nodes in this process: the three-node example
//! (`examples/embedded.rs`) run as it is, then a device pushing records through a follower
//! while every node's subscription must see each stored record exactly once; and a subscriber
//! that falls behind is told so instead of holding apply up.

use std::time::Duration;

use cairn_firmware::tokio::read_frame;
use cairn_gateway::embed::{CommittedBatch, Error, FeedError, Level, Node, NodeConfig, Value};
use cairn_gateway::raft::network::HttpClient;
use cairn_protocol::{
    BatchEncoder, DeviceSession, FrameReassembler, MAX_FRAME, Message, Record, Value as Reading,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[path = "../examples/embedded.rs"]
#[allow(dead_code)] // its `main`
mod example;

/// A bound on waits that should end at once; hitting it means the test failed, not that it
/// was slow.
const HANG: Duration = Duration::from_secs(60);

/// Registers device `id` with `key` through a node's device admin API.
async fn add_device(node: &Node, id: u64, key: &[u8; 32]) {
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let resp = HttpClient::new(None)
        .post_json(
            &node.peer().http_addr,
            "/devices",
            format!(r#"{{"id": {id}, "key": "{hex}"}}"#),
            HANG,
        )
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&resp).unwrap();
    assert_eq!(v["device_id"], id, "{v}");
}

/// A device at the protocol level: one session over one TCP connection.
struct Device {
    id: u64,
    session: DeviceSession,
    stream: TcpStream,
    frames: FrameReassembler,
}

impl Device {
    async fn connect(id: u64, key: &[u8; 32], addr: &str) -> Device {
        let mut dev = Device {
            id,
            session: DeviceSession::new(key, 1, rand::random()),
            stream: TcpStream::connect(addr).await.unwrap(),
            frames: FrameReassembler::new(),
        };
        let hello = dev.session.hello(dev.id, 1, 64);
        dev.send(&Message::Hello(hello)).await;
        match dev.recv().await {
            Message::Welcome(w) => assert_eq!(w.high_water, 0),
            other => panic!("expected Welcome, got {other:?}"),
        }
        dev
    }

    async fn send(&mut self, msg: &Message<'_>) {
        let mut buf = [0u8; MAX_FRAME];
        let n = self.session.encode(msg, &mut buf).unwrap();
        self.stream.write_all(&buf[..n]).await.unwrap();
    }

    /// The next message (with its borrowed parts cut off: only Welcome and Ack matter here).
    async fn recv(&mut self) -> Message<'static> {
        let frame = tokio::time::timeout(HANG, read_frame(&mut self.stream, &mut self.frames))
            .await
            .expect("no answer from the gateway")
            .unwrap()
            .expect("the gateway closed the connection");
        match self.session.decode(frame).unwrap() {
            Message::Welcome(w) => Message::Welcome(w),
            Message::Ack(a) => Message::Ack(a),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Sends records `first..first + n` of stream 1 (temperature `seq / 2`) and returns the
    /// acknowledged seq.
    async fn push(&mut self, first: u64, n: u64) -> u64 {
        let mut body = [0u8; MAX_FRAME];
        let mut enc = BatchEncoder::new(&mut body, first, 10_000);
        for seq in first..first + n {
            let v = [Reading::F32(seq as f32 / 2.0)];
            enc.push(&Record {
                stream: 1,
                uptime_ms: 9_000 + seq,
                values: &v,
            })
            .unwrap();
        }
        let batch = enc.finish().unwrap();
        self.send(&Message::Batch(batch)).await;
        match self.recv().await {
            Message::Ack(a) => a.through_seq,
            other => panic!("expected Ack, got {other:?}"),
        }
    }
}

/// The next batch of a subscription, failing the test on anything else.
async fn next(sub: &mut cairn_gateway::embed::Subscription) -> std::sync::Arc<CommittedBatch> {
    tokio::time::timeout(HANG, sub.recv())
        .await
        .expect("no committed batch")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_three_embedded_nodes_serve_sql_and_publish_records_once() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = example::start_cluster(dir.path()).await.unwrap();

    // The example itself.
    let seen = example::demo(&nodes).await.unwrap();
    assert!(seen.rolled_back[0].error.is_none());
    assert!(
        seen.rolled_back[1]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("no_such_table")),
        "{:?}",
        seen.rolled_back
    );
    let levels: Vec<Level> = seen.reads.iter().map(|(l, _)| *l).collect();
    assert_eq!(
        levels,
        [Level::None, Level::Weak, Level::Linearizable, Level::Strong]
    );
    for (level, rows) in &seen.reads {
        assert_eq!(
            rows,
            &vec![vec![Value::Text("from a follower".into())]],
            "at {level:?}"
        );
    }
    // A strong read that would write is refused before it reaches the log.
    let follower = nodes.iter().find(|n| !n.is_leader()).unwrap();
    let refused = follower
        .query(["INSERT INTO notes(text) VALUES('no')"], Level::Strong)
        .await;
    assert!(matches!(refused, Err(Error::BadRequest(_))), "{refused:?}");

    // A device pushes through a follower; every replica publishes what it stores.
    let mut subs: Vec<_> = nodes.iter().map(Node::subscribe).collect();
    let key = [5u8; 32];
    add_device(&nodes[0], 42, &key).await;
    let mut dev = Device::connect(42, &key, &follower.peer().device_addr).await;
    assert_eq!(dev.push(1, 4).await, 4);
    assert_eq!(dev.push(5, 4).await, 8);
    // Already stored: acknowledged, not stored again, not published again.
    assert_eq!(dev.push(1, 4).await, 8);
    // Overlapping: only 9 and 10 are new.
    assert_eq!(dev.push(7, 4).await, 10);

    for (node, sub) in nodes.iter().zip(&mut subs) {
        let mut seqs = Vec::new();
        let mut last_index = 0;
        while seqs.last() != Some(&10) {
            let batch = next(sub).await;
            assert_eq!(batch.device_id, 42);
            assert!(
                batch.log_index > last_index,
                "log order on node {}",
                node.id()
            );
            last_index = batch.log_index;
            for r in batch.records() {
                assert_eq!((r.device_id, r.stream), (42, 1));
                let values: Vec<Reading<'_>> = r.values().collect();
                assert_eq!(values, [Reading::F32(r.seq as f32 / 2.0)]);
                seqs.push(r.seq);
            }
        }
        assert_eq!(seqs, (1..=10).collect::<Vec<u64>>(), "node {}", node.id());
        // What the feed said is what the table holds.
        let rows = node
            .query(
                ["SELECT count(*), count(DISTINCT seq) FROM climate WHERE device_id = 42"],
                Level::None,
            )
            .await
            .unwrap();
        assert_eq!(
            rows[0].values,
            vec![vec![Value::Integer(10), Value::Integer(10)]]
        );
    }
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_lagging_subscriber_is_told_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(NodeConfig {
        bootstrap: true,
        feed_capacity: 2,
        ..example::config(dir.path(), 1)
    })
    .await
    .unwrap();
    node.wait_ready(1, HANG).await.unwrap();
    let key = [6u8; 32];
    add_device(&node, 7, &key).await;
    let mut sub = node.subscribe();
    let mut dev = Device::connect(7, &key, &node.peer().device_addr).await;
    // Five batches acknowledged (applied here) while the subscriber reads nothing: the feed
    // keeps the last two and apply did not wait.
    for seq in 1..=5 {
        assert_eq!(dev.push(seq, 1).await, seq);
    }
    let lagged = tokio::time::timeout(HANG, sub.recv()).await.unwrap();
    assert_eq!(lagged.unwrap_err(), FeedError::Lagged(3));
    for seq in [4, 5] {
        let batch = next(&mut sub).await;
        let seqs: Vec<u64> = batch.records().map(|r| r.seq).collect();
        assert_eq!(seqs, [seq]);
    }
    node.shutdown().await;
}
