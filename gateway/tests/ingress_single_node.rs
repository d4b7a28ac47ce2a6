//! Device ingress on a real single-node Raft (SQLite log and state machine, real sockets),
//! driven by a small protocol-level test device built on `cairn_protocol::DeviceSession`.
//!
//! Covers: registry over HTTP, Hello/Welcome, batches acked only after apply, the same batch
//! three times stored once, and every kind of bad frame rejected with its code while a good
//! device keeps streaming on another connection.

use std::sync::Arc;
use std::time::Duration;

use cairn_firmware::tokio::read_frame;
use cairn_gateway::config::NodeConfig;
use cairn_gateway::db::Store;
use cairn_gateway::db::schema::{Column, ColumnType, OnMismatch, StreamDef, Undeclared};
use cairn_gateway::metrics::Metrics;
use cairn_gateway::raft::Raft;
use cairn_gateway::raft::network::HttpClient;
use cairn_protocol::{
    BatchEncoder, DeviceSession, ErrorCode, FrameReassembler, HEADER_LEN, MAX_FRAME, Message,
    Record, Value, Welcome,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

struct Node {
    /// Keeps the listeners serving (dropping it stops them).
    _started: cairn_gateway::daemon::Started,
    _dir: tempfile::TempDir,
    raft: Raft,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    device_addr: String,
    http_addr: String,
}

/// One bootstrapped node from the composition root, every listener on a port the OS picks.
async fn start_node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        node_id: 1,
        data_dir: dir.path().to_path_buf(),
        http_addr: "127.0.0.1:0".into(),
        raft_addr: "127.0.0.1:0".into(),
        device_addr: "127.0.0.1:0".into(),
        bootstrap: true,
        stream: vec![StreamDef {
            id: 1,
            table: "climate".into(),
            columns: vec![Column {
                name: "temperature".into(),
                ty: ColumnType::Real,
            }],
            on_mismatch: OnMismatch::DeadLetter,
        }],
        undeclared_streams: Undeclared::Telemetry,
        ..NodeConfig::default()
    };
    let started = cairn_gateway::daemon::start(config).await.unwrap();
    let cluster = started.cluster.clone();
    let raft = cluster.raft().clone();
    raft.wait(Some(Duration::from_secs(10)))
        .state(openraft::ServerState::Leader, "leader")
        .await
        .unwrap();
    Node {
        _started: started,
        _dir: dir,
        raft,
        store: cluster.store().clone(),
        metrics: cluster.metrics().clone(),
        device_addr: cluster.peer().device_addr.clone(),
        http_addr: cluster.peer().http_addr.clone(),
    }
}

async fn add_device(node: &Node, id: u64, key: &[u8; 32]) {
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let body = format!(r#"{{"id": {id}, "key": "{hex}"}}"#);
    let resp = HttpClient::new(None)
        .post_json(&node.http_addr, "/devices", body, Duration::from_secs(10))
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&resp).unwrap();
    assert_eq!(v["device_id"], id);
}

/// A protocol-level device: one boot, reconnecting as needed.
struct TestDevice {
    id: u64,
    session: DeviceSession,
    stream: Option<TcpStream>,
    frames: FrameReassembler,
    next_seq: u64,
}

impl TestDevice {
    fn new(id: u64, key: &[u8; 32]) -> Self {
        TestDevice {
            id,
            session: DeviceSession::new(key, 7 + id as u32, rand::random()),
            stream: None,
            frames: FrameReassembler::new(),
            next_seq: 1,
        }
    }

    async fn connect(&mut self, addr: &str) -> Result<Welcome, ErrorCode> {
        self.stream = Some(TcpStream::connect(addr).await.unwrap());
        self.frames.reset();
        let mut buf = [0u8; MAX_FRAME];
        let hello = self.session.hello(self.id, 1, 64);
        let n = self
            .session
            .encode(&Message::Hello(hello), &mut buf)
            .unwrap();
        self.send_raw(&buf[..n]).await;
        match self.recv().await? {
            Some(Message::Welcome(w)) => {
                self.next_seq = w.high_water + 1;
                Ok(w)
            }
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream
            .as_mut()
            .unwrap()
            .write_all(bytes)
            .await
            .unwrap();
    }

    /// Encodes a batch of `n` records starting at `first_seq` (stream 1, one f32).
    fn batch_frame(&mut self, first_seq: u64, n: usize) -> Vec<u8> {
        let mut body = [0u8; MAX_FRAME];
        let mut enc = BatchEncoder::new(&mut body, first_seq, 50_000);
        for i in 0..n {
            let v = [Value::F32(first_seq as f32 + i as f32)];
            enc.push(&Record {
                stream: 1,
                uptime_ms: 49_000 + i as u64,
                values: &v,
            })
            .unwrap();
        }
        let view = enc.finish().unwrap();
        let mut frame = [0u8; MAX_FRAME];
        let len = self
            .session
            .encode(&Message::Batch(view), &mut frame)
            .unwrap();
        frame[..len].to_vec()
    }

    /// Reads one frame: `Ok(None)` at end of stream, `Err(code)` for an Error frame.
    async fn recv(&mut self) -> Result<Option<Message<'static>>, ErrorCode> {
        let stream = self.stream.as_mut().unwrap();
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            read_frame(stream, &mut self.frames),
        )
        .await;
        let Ok(Some(frame)) = read.expect("no answer from the gateway") else {
            return Ok(None);
        };
        let len = frame.len();
        let buf: &'static mut [u8] = Box::leak(frame.to_vec().into_boxed_slice());
        // An unsealed Error is read for its code here (a device would only close).
        if let Some(code) = cairn_protocol::unsealed_error_code(&buf[..len]) {
            return Err(code);
        }
        match self.session.decode(&mut buf[..len]).unwrap() {
            Message::Error(e) => Err(e.code),
            m => Ok(Some(m)),
        }
    }

    async fn expect_ack(&mut self) -> u64 {
        match self.recv().await {
            Ok(Some(Message::Ack(a))) => a.through_seq,
            other => panic!("expected Ack, got {other:?}"),
        }
    }

    async fn expect_error(&mut self) -> ErrorCode {
        match self.recv().await {
            Err(code) => {
                // The gateway closes after an Error.
                assert!(
                    matches!(self.recv().await, Ok(None)),
                    "connection left open"
                );
                code
            }
            other => panic!("expected Error, got {other:?}"),
        }
    }

    /// Sends the next batch of `n` records and waits for its ack.
    async fn push(&mut self, n: usize) -> u64 {
        let frame = self.batch_frame(self.next_seq, n);
        self.send_raw(&frame).await;
        self.next_seq += n as u64;
        self.expect_ack().await
    }
}

fn count(store: &Store, sql: &str) -> i64 {
    store
        .read(|c| c.query_row(sql, [], |r| r.get(0)).unwrap())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_same_batch_three_times_stored_once() {
    let node = start_node().await;
    let key = [3u8; 32];
    add_device(&node, 11, &key).await;
    let mut dev = TestDevice::new(11, &key);
    let w = dev.connect(&node.device_addr).await.unwrap();
    assert_eq!((w.high_water, w.leader), (0, None));
    assert!(w.credit > 0);
    let frame = dev.batch_frame(1, 5);
    dev.send_raw(&frame).await;
    assert_eq!(dev.expect_ack().await, 5);
    // The same records again in a new frame on this connection, then on a new connection.
    let again = dev.batch_frame(1, 5);
    dev.send_raw(&again).await;
    assert_eq!(dev.expect_ack().await, 5);
    let w = dev.connect(&node.device_addr).await.unwrap();
    assert_eq!(w.high_water, 5);
    let third = dev.batch_frame(1, 5);
    dev.send_raw(&third).await;
    assert_eq!(dev.expect_ack().await, 5);
    assert_eq!(
        count(
            &node.store,
            "SELECT count(*) FROM climate WHERE device_id = 11"
        ),
        5
    );
    assert_eq!(
        count(
            &node.store,
            "SELECT count(DISTINCT seq) FROM climate WHERE device_id = 11"
        ),
        5
    );
    // Next records continue after the high-water; a gap is refused.
    assert_eq!(dev.push(3).await, 8);
    let gap = dev.batch_frame(20, 1);
    dev.send_raw(&gap).await;
    assert_eq!(dev.recv().await.unwrap_err(), ErrorCode::SeqGap);
    // SeqGap keeps the connection (SPEC §7.6): the next batch in order is stored.
    assert_eq!(dev.push(2).await, 10);
    assert_eq!(
        count(
            &node.store,
            "SELECT count(*) FROM climate WHERE device_id = 11"
        ),
        10
    );
    node.raft.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_bad_frames_rejected_while_good_device_streams() {
    let node = start_node().await;
    let key = [5u8; 32];
    add_device(&node, 21, &key).await;
    add_device(&node, 22, &key).await;

    // The good device streams in the background the whole time.
    let mut good = TestDevice::new(22, &key);
    good.connect(&node.device_addr).await.unwrap();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let streaming = tokio::spawn(async move {
        loop {
            let acked = good.push(10).await;
            if stop_rx.try_recv().is_ok() {
                return acked;
            }
        }
    });

    let rejects = |code| node.metrics.rejects.get(code);

    // Unknown device: unsealed UnknownDevice.
    let before = rejects(ErrorCode::UnknownDevice);
    let mut stranger = TestDevice::new(999, &key);
    assert_eq!(
        stranger.connect(&node.device_addr).await.unwrap_err(),
        ErrorCode::UnknownDevice
    );
    assert!(rejects(ErrorCode::UnknownDevice) > before);

    // Wrong key: the Hello does not authenticate.
    let mut forger = TestDevice::new(21, &[9u8; 32]);
    assert_eq!(
        forger.connect(&node.device_addr).await.unwrap_err(),
        ErrorCode::BadAuth
    );

    // Tampered batch.
    let mut dev = TestDevice::new(21, &key);
    dev.connect(&node.device_addr).await.unwrap();
    let mut frame = dev.batch_frame(1, 3);
    frame[HEADER_LEN + 2] ^= 0x40;
    let before = rejects(ErrorCode::BadAuth);
    dev.send_raw(&frame).await;
    assert_eq!(dev.expect_error().await, ErrorCode::BadAuth);
    assert!(rejects(ErrorCode::BadAuth) > before);

    // Replayed batch frame on the same connection.
    dev.connect(&node.device_addr).await.unwrap();
    let frame = dev.batch_frame(1, 3);
    dev.send_raw(&frame).await;
    assert_eq!(dev.expect_ack().await, 3);
    dev.send_raw(&frame).await;
    assert_eq!(dev.expect_error().await, ErrorCode::Replay);

    // A recorded connection, replayed (SPEC §5.7): the Hello is welcomed, under a fresh
    // challenge, so the recorded batch does not open and nothing more is stored.
    let mut hello = [0u8; MAX_FRAME];
    let h = dev.session.hello(21, 1, 64);
    let n = dev.session.encode(&Message::Hello(h), &mut hello).unwrap();
    let after_hello = dev.session.clone();
    dev.stream = Some(TcpStream::connect(&node.device_addr).await.unwrap());
    dev.send_raw(&hello[..n]).await;
    assert!(matches!(dev.recv().await, Ok(Some(Message::Welcome(_)))));
    let recorded = dev.batch_frame(4, 3);
    dev.send_raw(&recorded).await;
    assert_eq!(dev.expect_ack().await, 6);
    let before = rejects(ErrorCode::BadAuth);
    dev.stream = Some(TcpStream::connect(&node.device_addr).await.unwrap());
    dev.send_raw(&hello[..n]).await;
    // (The test reads the replies with the device's own session; an eavesdropper could not.)
    dev.session = after_hello;
    assert!(matches!(dev.recv().await, Ok(Some(Message::Welcome(_)))));
    dev.send_raw(&recorded).await;
    assert_eq!(dev.expect_error().await, ErrorCode::BadAuth);
    assert!(rejects(ErrorCode::BadAuth) > before);

    // Truncated: half a frame, then the device stops sending.
    dev.connect(&node.device_addr).await.unwrap();
    let frame = dev.batch_frame(7, 3);
    dev.send_raw(&frame[..frame.len() / 2]).await;
    dev.stream.as_mut().unwrap().shutdown().await.unwrap();
    assert_eq!(dev.expect_error().await, ErrorCode::Malformed);

    // Oversized: a header declaring more than MAX_FRAME.
    dev.connect(&node.device_addr).await.unwrap();
    let mut frame = dev.batch_frame(7, 3);
    frame[4..6].copy_from_slice(&(MAX_FRAME as u16).to_le_bytes());
    dev.send_raw(&frame).await;
    assert_eq!(dev.expect_error().await, ErrorCode::TooLarge);

    // Malformed: garbage instead of a frame.
    dev.connect(&node.device_addr).await.unwrap();
    dev.send_raw(&[0x55; 40]).await;
    assert_eq!(dev.expect_error().await, ErrorCode::Malformed);

    // Nothing of the bad frames was applied: device 21 has exactly its two good batches.
    assert_eq!(
        count(
            &node.store,
            "SELECT count(*) FROM climate WHERE device_id = 21"
        ),
        6
    );
    let _ = stop_tx.send(());
    let acked = streaming.await.unwrap();
    assert!(acked >= 10);
    assert_eq!(
        count(
            &node.store,
            "SELECT count(*) FROM climate WHERE device_id = 22"
        ),
        acked as i64
    );
    node.raft.shutdown().await.unwrap();
}
