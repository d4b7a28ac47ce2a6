//! A thousand clients in one tokio current-thread runtime, the shape of `cairn sim`, with the
//! crate's host time driver (feature `std`): every client keeps a timer armed, far more than
//! embassy-time's generic queue (at most 128) could hold.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration as StdDuration;

use cairn_firmware::tokio::{TokioConnection, read_frame};
use cairn_firmware::{
    BootNonce, Client, Config, GatewayAddr, OverflowPolicy, Transport, TransportError, Value,
};
use cairn_protocol::{
    Ack, BatchView, CHALLENGE_LEN, FrameReassembler, GatewaySession, MAX_FRAME, Message, Pong,
    Welcome,
};
use embassy_sync::blocking_mutex::raw::NoopRawMutex;
use tokio::io::{AsyncWriteExt, DuplexStream};

const DEVICES: u64 = 1000;
const RECORDS: u64 = 20;
const KEY: [u8; 32] = [3; 32];

/// Per device: committed values in order.
type Store = Rc<RefCell<HashMap<u64, Vec<u64>>>>;

struct Fleet {
    store: Store,
}

impl Transport for Fleet {
    type Connection<'a> = TokioConnection<DuplexStream>;
    async fn connect(&mut self, _: GatewayAddr) -> Result<Self::Connection<'_>, TransportError> {
        let (device, gateway) = tokio::io::duplex(4096);
        tokio::task::spawn_local(serve(gateway, self.store.clone()));
        Ok(TokioConnection::new(device))
    }
}

async fn serve(mut s: DuplexStream, store: Store) {
    let mut frames = FrameReassembler::<MAX_FRAME>::new();
    let Ok(Some(hello)) = read_frame(&mut s, &mut frames).await else {
        return;
    };
    let mut session = GatewaySession::accept(&KEY, hello, [3; CHALLENGE_LEN]).expect("hello");
    let device = session.hello().device_id;
    let mut out = [0u8; MAX_FRAME];
    let hw = store.borrow().get(&device).map_or(0, |v| v.len() as u64);
    let welcome = Welcome {
        high_water: hw,
        leader: None,
        credit: 64,
    };
    let n = session
        .encode(&Message::Welcome(welcome), &mut out)
        .unwrap();
    s.write_all(&out[..n]).await.unwrap();
    while let Ok(Some(frame)) = read_frame(&mut s, &mut frames).await {
        let reply = match session.decode(frame).unwrap() {
            Message::Batch(view) => {
                let view = BatchView::parse(view.as_bytes()).unwrap();
                let mut store = store.borrow_mut();
                let rows = store.entry(device).or_default();
                for (i, rec) in view.records().enumerate() {
                    let seq = view.header().first_seq + i as u64;
                    if seq == rows.len() as u64 + 1 {
                        let Some(Value::U64(k)) = rec.unwrap().values().next() else {
                            panic!()
                        };
                        rows.push(k);
                    }
                }
                let through = rows.len() as u64;
                Message::Ack(Ack {
                    through_seq: through,
                    credit: 64,
                    leader: None,
                })
            }
            Message::Ping(p) => Message::Pong(Pong { nonce: p.nonce }),
            other => panic!("unexpected {other}"),
        };
        let n = session.encode(&reply, &mut out).unwrap();
        if s.write_all(&out[..n]).await.is_err() {
            return;
        }
    }
}

#[test]
fn test_thousand_clients_on_one_thread() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, async {
        let store: Store = Rc::default();
        let gateways: &'static [GatewayAddr] =
            Box::leak(Box::new([GatewayAddr::new([127, 0, 0, 1], 4003)]));
        let mut clients = Vec::new();
        let started = std::time::Instant::now();
        for id in 1..=DEVICES {
            let client: &'static Client<NoopRawMutex, 1024> =
                Box::leak(Box::new(Client::new(OverflowPolicy::RejectNewest)));
            let store = store.clone();
            tokio::task::spawn_local(async move {
                let mut config =
                    Config::new(id, KEY, 1, BootNonce::from_rng([id as u8; 12]), gateways);
                config.ping_interval = embassy_time::Duration::from_millis(200);
                client.run(&mut Fleet { store }, &config).await
            });
            clients.push(client);
        }
        for k in 0..RECORDS {
            for c in &clients {
                c.push(1, &[Value::U64(k)]).unwrap();
            }
            tokio::time::sleep(StdDuration::from_millis(10)).await;
        }
        let deadline = std::time::Instant::now() + StdDuration::from_secs(60);
        while clients.iter().any(|c| c.status().acked < RECORDS)
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(StdDuration::from_millis(20)).await;
        }
        let elapsed = started.elapsed();
        // Idle for a few ping intervals: a thousand armed timers must not spin or starve.
        tokio::time::sleep(StdDuration::from_millis(600)).await;
        println!("{DEVICES} clients x {RECORDS} records acked in {elapsed:?}");
        for (i, c) in clients.iter().enumerate() {
            let st = c.status();
            assert_eq!(
                (st.acked, st.retries, st.reconnects),
                (RECORDS, 0, 0),
                "device {}",
                i + 1
            );
        }
        let store = store.borrow();
        assert_eq!(store.len() as u64, DEVICES);
        for rows in store.values() {
            assert_eq!(rows, &(0..RECORDS).collect::<Vec<_>>());
        }
    });
}
