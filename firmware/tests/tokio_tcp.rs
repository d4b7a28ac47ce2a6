//! The client over real loopback TCP on a tokio current-thread runtime with the crate's host
//! adapter (`cairn_firmware::tokio`, feature `tokio`): the shape `cairn sim` uses.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration as StdDuration;

use cairn_firmware::tokio::{TcpTransport, read_frame};
use cairn_firmware::{BootNonce, Client, Config, GatewayAddr, OverflowPolicy, Value};
use cairn_protocol::{
    Ack, BatchView, CHALLENGE_LEN, FrameReassembler, GatewaySession, MAX_FRAME, Message, Pong,
    Welcome,
};
use embassy_sync::blocking_mutex::raw::NoopRawMutex;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

const KEY: [u8; 32] = [9; 32];

#[derive(Default)]
struct Gateway {
    hw: u64,
    values: Vec<u64>,
    connections: u32,
}

/// A minimal gateway: real sessions, commits immediately, closes the first connection after
/// 500 records to make the device reconnect.
async fn gateway(listener: TcpListener, state: Rc<RefCell<Gateway>>) {
    loop {
        let (mut s, _) = listener.accept().await.unwrap();
        state.borrow_mut().connections += 1;
        let mut frames = FrameReassembler::<MAX_FRAME>::new();
        let hello = read_frame(&mut s, &mut frames).await.unwrap().unwrap();
        let mut session = GatewaySession::accept(&KEY, hello, [3; CHALLENGE_LEN]).unwrap();
        let mut out = [0u8; MAX_FRAME];
        let hw = state.borrow().hw;
        let n = session
            .encode(
                &Message::Welcome(Welcome {
                    high_water: hw,
                    leader: None,
                    credit: 128,
                }),
                &mut out,
            )
            .unwrap();
        s.write_all(&out[..n]).await.unwrap();
        while let Ok(Some(frame)) = read_frame(&mut s, &mut frames).await {
            let reply = match session.decode(frame).unwrap() {
                Message::Batch(view) => {
                    let view = BatchView::parse(view.as_bytes()).unwrap();
                    let mut g = state.borrow_mut();
                    for (i, rec) in view.records().enumerate() {
                        let seq = view.header().first_seq + i as u64;
                        if seq == g.hw + 1 {
                            g.hw = seq;
                            match rec.unwrap().values().next() {
                                Some(Value::U64(k)) => g.values.push(k),
                                other => panic!("unexpected value {other:?}"),
                            }
                        }
                        assert!(seq <= g.hw, "gap at {seq}");
                    }
                    Message::Ack(Ack {
                        through_seq: g.hw,
                        credit: 128,
                        leader: None,
                    })
                }
                Message::Ping(p) => Message::Pong(Pong { nonce: p.nonce }),
                other => panic!("unexpected {other}"),
            };
            let n = session.encode(&reply, &mut out).unwrap();
            s.write_all(&out[..n]).await.unwrap();
            if state.borrow().connections == 1 && state.borrow().hw >= 500 {
                break;
            }
        }
    }
}

#[test]
fn test_client_over_loopback_tcp_on_tokio_local_set() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Rc::new(RefCell::new(Gateway::default()));
        tokio::task::spawn_local(gateway(listener, state.clone()));

        // One client per simulated device; NoopRawMutex is enough on one thread.
        let client: &'static Client<NoopRawMutex, 16384> =
            Box::leak(Box::new(Client::new(OverflowPolicy::RejectNewest)));
        let gateways: &'static [GatewayAddr] =
            Box::leak(Box::new([GatewayAddr::new([127, 0, 0, 1], port)]));
        let runner = tokio::task::spawn_local(async move {
            let mut config = Config::new(7, KEY, 1, BootNonce::from_rng([7; 12]), gateways);
            config.backoff_floor = embassy_time::Duration::from_millis(1);
            config.backoff_base = embassy_time::Duration::from_millis(5);
            client.run(&mut TcpTransport::new(), &config).await
        });

        let started = std::time::Instant::now();
        for k in 0..2000u64 {
            while client.push(1, &[Value::U64(k)]).is_err() {
                tokio::time::sleep(StdDuration::from_millis(1)).await;
            }
            if k % 100 == 99 {
                tokio::task::yield_now().await;
            }
        }
        let emptied = tokio::time::timeout(StdDuration::from_secs(20), client.wait_empty()).await;
        let st = client.status();
        assert!(emptied.is_ok(), "wait_empty did not return: {st:?}");
        println!(
            "2000 records acked over loopback TCP in {:?}: {st:?}",
            started.elapsed()
        );
        runner.abort();
        assert_eq!(st.acked, 2000, "{st:?}");
        assert_eq!(st.reconnects, 1, "{st:?}");
        let g = state.borrow();
        assert_eq!(g.values, (0..2000).collect::<Vec<_>>());
        assert_eq!(g.connections, 2);
    });
}

/// `read_frame`'s ends: a clean end between frames, a stream cut inside a frame, a bad header.
#[test]
fn read_frame_ends() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        // Ping header, length 17 (1 body byte + tag), then body and tag.
        let mut frame = vec![0x43, 0x52, 0x01, 0x07, 0x11, 0, 0, 0, 1, 0, 0, 0];
        frame.resize(29, 0);
        let mut frames = FrameReassembler::<MAX_FRAME>::new();

        let two = [&frame[..], &frame[..]].concat();
        let mut input = &two[..];
        for _ in 0..2 {
            let got = read_frame(&mut input, &mut frames).await.unwrap().unwrap();
            assert_eq!(got, &frame[..]);
        }
        assert!(read_frame(&mut input, &mut frames).await.unwrap().is_none());

        frames.reset();
        let mut cut = &frame[..20];
        let e = read_frame(&mut cut, &mut frames).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);

        frames.reset();
        let mut bad = frame.clone();
        bad[2] = 9;
        let e = read_frame(&mut &bad[..], &mut frames).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert_eq!(
            e.get_ref()
                .unwrap()
                .downcast_ref::<cairn_protocol::FrameError>(),
            Some(&cairn_protocol::FrameError::UnsupportedVersion)
        );
    });
}
