//! The real client against a simulated gateway cluster (see `common/mod.rs`), on a tokio
//! current-thread runtime with embassy-time's std driver.

mod common;

use std::time::Duration as StdDuration;

use cairn_firmware::{Client, ConnectionState, ErrorCode, OverflowPolicy, PushError, Value};
use cairn_protocol::{Ack, Message, Welcome};
use common::*;
use embassy_sync::blocking_mutex::raw::CriticalSectionRawMutex;

type TestClient<const N: usize> = Client<CriticalSectionRawMutex, N>;

fn leak<const N: usize>(policy: OverflowPolicy) -> &'static TestClient<N> {
    Box::leak(Box::new(TestClient::<N>::new(policy)))
}

/// Run `body` next to the client's run loop on a LocalSet; the run loop is dropped after.
async fn with_client<const N: usize, F: std::future::Future<Output = ()>>(
    client: &'static TestClient<N>,
    cluster: &ClusterRef,
    gateways: &'static [cairn_firmware::GatewayAddr],
    boot: u32,
    body: F,
) {
    let cluster2 = cluster.clone();
    let runner = tokio::task::spawn_local(async move {
        let mut transport = SimTransport { cluster: cluster2 };
        let config = fast_config(gateways, boot);
        client.run(&mut transport, &config).await
    });
    body.await;
    runner.abort();
    let _ = runner.await;
}

fn gateways(n: usize) -> &'static [cairn_firmware::GatewayAddr] {
    Box::leak(
        (0..n)
            .map(gateway_addr)
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    )
}

fn local() -> (tokio::runtime::Runtime, tokio::task::LocalSet) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (rt, tokio::task::LocalSet::new())
}

/// Push `n` records `[U64(k)]` on stream 1 from two tasks, interleaved.
async fn push_many<const N: usize>(client: &'static TestClient<N>, from: u64, n: u64) {
    let half = n / 2;
    let a = tokio::task::spawn_local(async move {
        for k in from..from + half {
            push_retrying(client, k).await;
        }
    });
    a.await.unwrap();
    let b = tokio::task::spawn_local(async move {
        for k in from + half..from + n {
            push_retrying(client, k).await;
        }
    });
    b.await.unwrap();
}

async fn push_retrying<const N: usize>(client: &TestClient<N>, k: u64) {
    loop {
        match client.push(1, &[Value::U64(k)]) {
            Ok(_) => break,
            Err(PushError::Full) => tokio::time::sleep(StdDuration::from_millis(2)).await,
            Err(e) => panic!("push: {e}"),
        }
        if k.is_multiple_of(64) {
            tokio::task::yield_now().await;
        }
    }
}

fn assert_exactly_once_in_order(cluster: &ClusterRef, expected: std::ops::Range<u64>) {
    let c = cluster.borrow();
    assert!(c.violations.is_empty(), "violations: {:?}", c.violations);
    let got = c.payloads();
    let want: Vec<u64> = expected.collect();
    assert_eq!(got.len(), want.len(), "row count");
    assert_eq!(
        got, want,
        "rows must be every pushed record, once, in order"
    );
    for (i, (seq, _)) in c.rows.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1, "seqs are dense from 1");
    }
}

#[test]
fn test_every_record_acked_exactly_once_in_order_under_faults() {
    let (rt, local) = local();
    local.block_on(&rt, async {
        let faults = Faults {
            kill_per_mille: 30,
            drop_ack_per_mille: 30,
            ack_delay_min_ms: 0,
            ack_delay_max_ms: 15,
            late_commit_per_mille: 500,
            credit: 64,
            follower: FollowerMode::Forward,
        };
        let cluster = cluster(3, faults, 1);
        let client = leak::<8192>(OverflowPolicy::RejectNewest);
        let gws = gateways(3);
        let c2 = cluster.clone();
        with_client(client, &cluster, gws, 1, async move {
            // A gateway outage and a leader change in the middle of the stream.
            let flapper = {
                let c = c2.clone();
                tokio::task::spawn_local(async move {
                    for round in 0..6 {
                        tokio::time::sleep(StdDuration::from_millis(60)).await;
                        let mut c = c.borrow_mut();
                        let i = round % 3;
                        c.down[i] = !c.down[i];
                        c.leader = (c.leader + 1) % 3;
                    }
                    let mut c = c.borrow_mut();
                    c.down = vec![false; 3];
                })
            };
            push_many(client, 0, 3000).await;
            flapper.await.unwrap();
            let done =
                wait_until(StdDuration::from_secs(30), || client.status().acked == 3000).await;
            let st = client.status();
            assert!(done, "not all acked: {st:?}");
            assert_eq!(st.pushed, 3000);
            assert_eq!(st.queued, 0);
            assert_eq!((st.dropped, st.acked_through), (0, 3000));
            assert!(
                st.retries > 0 && st.reconnects > 0,
                "faults must have happened: {st:?}"
            );
        })
        .await;
        assert_exactly_once_in_order(&cluster, 0..3000);
        assert_eq!(cluster.borrow().gaps, 0);
    });
}

#[test]
fn test_drop_oldest_counts_drops_and_sends_no_gap() {
    let (rt, local) = local();
    local.block_on(&rt, async {
        let cluster = cluster(1, Faults::default(), 2);
        cluster.borrow_mut().down[0] = true;
        let client = leak::<512>(OverflowPolicy::DropOldest);
        let gws = gateways(1);
        let c2 = cluster.clone();
        with_client(client, &cluster, gws, 1, async move {
            // 512 bytes hold 512 / (2 + 2 + 1 + 1 + 1 + up to 3) = at least 42 records.
            for k in 0..1000u64 {
                client.push(1, &[Value::U64(k)]).unwrap();
            }
            let st = client.status();
            assert_eq!(st.pushed, 1000);
            assert!(st.dropped > 900, "{st:?}");
            assert_eq!(st.dropped + u64::from(st.queued), 1000);
            assert!(client.outbox_bytes_used() <= 512);
            c2.borrow_mut().down[0] = false;
            let done = wait_until(StdDuration::from_secs(10), || client.status().queued == 0).await;
            assert!(done, "{:?}", client.status());
        })
        .await;
        let st = client.status();
        let kept = 1000 - st.dropped;
        assert_eq!(st.acked, kept);
        // The newest records survive, renumbered densely from seq 1: no gap reached the gateway.
        assert_exactly_once_in_order(&cluster, st.dropped..1000);
    });
}

#[test]
fn test_reject_newest_keeps_oldest_and_counts_rejections() {
    let (rt, local) = local();
    local.block_on(&rt, async {
        let cluster = cluster(1, Faults::default(), 3);
        cluster.borrow_mut().down[0] = true;
        let client = leak::<512>(OverflowPolicy::RejectNewest);
        let gws = gateways(1);
        let c2 = cluster.clone();
        with_client(client, &cluster, gws, 1, async move {
            let mut accepted = 0u64;
            for k in 0..1000u64 {
                match client.push(1, &[Value::U64(k)]) {
                    Ok(seq) => {
                        assert_eq!(seq, k + 1);
                        accepted += 1;
                    }
                    Err(PushError::Full) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            let st = client.status();
            assert_eq!(
                (st.pushed, st.rejected, st.dropped),
                (accepted, 1000 - accepted, 0)
            );
            assert!(accepted > 40 && accepted < 200, "{st:?}");
            c2.borrow_mut().down[0] = false;
            assert!(wait_until(StdDuration::from_secs(10), || client.status().queued == 0).await);
            assert_eq!(client.status().acked, accepted);
            // Room again: new records are taken.
            client.push(1, &[Value::U64(accepted)]).unwrap();
            assert!(
                wait_until(StdDuration::from_secs(10), || client.status().acked
                    == accepted + 1)
                .await
            );
        })
        .await;
        let st = client.status();
        assert_exactly_once_in_order(&cluster, 0..st.acked);
    });
}

#[test]
fn test_ram_reboot_resumes_after_high_water() {
    let (rt, local) = local();
    local.block_on(&rt, async {
        let cluster = cluster(1, Faults::default(), 4);
        let gws = gateways(1);
        // First boot: 100 records committed, then 20 more pushed while the gateway is down
        // and lost with the RAM outbox at the "reboot".
        let first = leak::<4096>(OverflowPolicy::RejectNewest);
        let c2 = cluster.clone();
        with_client(first, &cluster, gws, 1, async move {
            push_many(first, 0, 100).await;
            assert!(wait_until(StdDuration::from_secs(10), || first.status().acked == 100).await);
            c2.borrow_mut().down[0] = true;
            push_many(first, 100, 20).await;
        })
        .await;
        cluster.borrow_mut().down[0] = false;
        // Second boot: a fresh client pushes before it knows the high-water.
        let second = leak::<4096>(OverflowPolicy::RejectNewest);
        for k in 1000..1010u64 {
            second.push(1, &[Value::U64(k)]).unwrap();
        }
        with_client(second, &cluster, gws, 2, async move {
            assert!(wait_until(StdDuration::from_secs(10), || second.status().acked == 10).await);
            assert_eq!(second.status().acked_through, 110);
        })
        .await;
        let c = cluster.borrow();
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        let want: Vec<u64> = (0..100).chain(1000..1010).collect();
        assert_eq!(c.payloads(), want);
        assert_eq!(c.rows.last().unwrap().0, 110);
        assert_eq!(
            c.hellos
                .iter()
                .map(|h| h.1)
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            2
        );
    });
}

#[test]
fn test_redirect_to_loopback_leader_is_followed() {
    let (rt, local) = local();
    local.block_on(&rt, async {
        let faults = Faults {
            follower: FollowerMode::Redirect,
            ..Faults::default()
        };
        let cluster = cluster(3, faults, 5);
        cluster.borrow_mut().leader = 2;
        let client = leak::<4096>(OverflowPolicy::RejectNewest);
        let gws = gateways(3);
        with_client(client, &cluster, gws, 1, async move {
            push_many(client, 0, 50).await;
            assert!(wait_until(StdDuration::from_secs(10), || client.status().acked == 50).await);
            assert_eq!(client.status().state, ConnectionState::Connected);
            assert_eq!(client.status().gateway, Some(gateway_addr(2)));
        })
        .await;
        let c = cluster.borrow();
        // The device tried gateway 0 first, got a redirect to 127.0.0.1:4003 and mapped it to
        // the ip it was connected to.
        assert_eq!(c.attempts[0].0, 0);
        assert_eq!(c.attempts[1].0, 2);
        assert_eq!(c.connects[1], 0, "no need to try gateway 1");
        assert_exactly_once_in_order(&cluster, 0..50);
    });
}

#[test]
fn test_not_leader_rotates_through_the_list() {
    let (rt, local) = local();
    local.block_on(&rt, async {
        let faults = Faults {
            follower: FollowerMode::NotLeader,
            ..Faults::default()
        };
        let cluster = cluster(3, faults, 6);
        cluster.borrow_mut().leader = 2;
        cluster.borrow_mut().down[1] = true;
        let client = leak::<4096>(OverflowPolicy::RejectNewest);
        let gws = gateways(3);
        with_client(client, &cluster, gws, 1, async move {
            push_many(client, 0, 10).await;
            assert!(wait_until(StdDuration::from_secs(10), || client.status().acked == 10).await);
            let st = client.status();
            assert_eq!(
                st.retries, 2,
                "NotLeader from 0, connect failure at 1: {st:?}"
            );
            assert_eq!(st.last_error, None, "cleared by the successful session");
        })
        .await;
        let order: Vec<usize> = cluster
            .borrow()
            .attempts
            .iter()
            .map(|a| a.0)
            .take(3)
            .collect();
        assert_eq!(order, [0, 1, 2]);
    });
}

#[test]
fn test_overloaded_and_unknown_device_back_off_longer() {
    let (rt, local) = local();
    local.block_on(&rt, async {
        let cluster = cluster(1, Faults::default(), 7);
        cluster.borrow_mut().reject_with = Some(ErrorCode::Overloaded);
        let client = leak::<1024>(OverflowPolicy::RejectNewest);
        let gws = gateways(1);
        let c2 = cluster.clone();
        with_client(client, &cluster, gws, 1, async move {
            // Waits for attempts rather than a fixed time (a loaded machine may run late);
            // their spacing is what shows the back-off.
            let attempts_reach = |n: usize| {
                let c = c2.clone();
                async move {
                    let ok = wait_until(StdDuration::from_secs(10), || {
                        c.borrow().attempts.len() >= n
                    })
                    .await;
                    assert!(ok, "{n} attempts: {:?}", c.borrow().attempts);
                }
            };
            attempts_reach(3).await;
            let st = client.status();
            assert_eq!(st.last_error, Some(ErrorCode::Overloaded));
            let attempts: Vec<u64> = c2.borrow().attempts.iter().map(|a| a.1).collect();
            for w in attempts.windows(2) {
                // overloaded_delay is 60 ms, backoff_max 80 ms.
                assert!(w[1] - w[0] >= 55, "attempts too close: {attempts:?}");
            }
            // A sealed configuration error waits the longest back-off.
            c2.borrow_mut().reject_with = Some(ErrorCode::BadAuth);
            c2.borrow_mut().attempts.clear();
            attempts_reach(3).await;
            let attempts: Vec<u64> = c2.borrow().attempts.iter().map(|a| a.1).collect();
            for w in attempts.windows(2) {
                assert!(w[1] - w[0] >= 75, "BadAuth waits backoff_max: {attempts:?}");
            }
            assert_eq!(client.status().last_error, Some(ErrorCode::BadAuth));
            // An unsealed UnknownDevice is only a dropped connection: the device keeps
            // trying, and the code is not taken as the gateway's word.
            c2.borrow_mut().reject_with = None;
            c2.borrow_mut().reject_unsealed = Some(ErrorCode::UnknownDevice);
            c2.borrow_mut().attempts.clear();
            attempts_reach(3).await;
            assert_ne!(client.status().last_error, Some(ErrorCode::UnknownDevice));
            client.push(1, &[Value::U64(0)]).unwrap();
            c2.borrow_mut().reject_unsealed = None;
            assert!(wait_until(StdDuration::from_secs(5), || client.status().acked == 1).await);
        })
        .await;
    });
}

/// Boot 1 of the device (boot number 5): ten records stored and acknowledged while an attacker
/// records the gateway's replies, which it returns (a Welcome, then Acks).
async fn record_first_boot(
    cluster: &ClusterRef,
    gws: &'static [cairn_firmware::GatewayAddr],
) -> Vec<Vec<u8>> {
    cluster.borrow_mut().recording = Some(Vec::new());
    let first = leak::<4096>(OverflowPolicy::RejectNewest);
    with_client(first, cluster, gws, 5, async move {
        push_many(first, 0, 10).await;
        assert!(wait_until(StdDuration::from_secs(10), || first.status().acked == 10).await);
    })
    .await;
    let recorded = cluster.borrow_mut().recording.take().unwrap();
    assert!(recorded.len() >= 2, "a Welcome and at least one Ack");
    recorded
}

/// What anyone on the path can send: an unsealed Error(SeqGap), and a recorded Ack flagged
/// unsealed.
fn unsealed_frames(recorded: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
    let mut error = [0u8; 64];
    let n = cairn_protocol::encode_unsealed_error(ErrorCode::SeqGap, &mut error).unwrap();
    let mut ack = recorded[1].clone();
    ack[6] = cairn_protocol::FLAG_UNSEALED;
    (error[..n].to_vec(), ack)
}

/// Gateway frames recorded on an earlier boot (same boot number), and forged or unsealed
/// Welcome/Ack/Error frames, make a rebooted device drop, skip or renumber nothing; once a
/// real gateway answers, every record is stored exactly once (SPEC.md §5.7).
#[test]
fn test_recorded_and_forged_gateway_frames_drop_nothing() {
    let (rt, local) = local();
    local.block_on(&rt, async {
        let cluster = cluster(1, Faults::default(), 11);
        let gws = gateways(1);
        let recorded = record_first_boot(&cluster, gws).await;
        let acks_through_10 = recorded.concat();

        // Boot 2, same boot number, RAM outbox: five records the cluster has never seen, which
        // a replayed "Welcome(hw 0), Ack(through 10)" would have the device drop.
        let mut forged_welcome = recorded[0].clone();
        let last = forged_welcome.len() - 1;
        forged_welcome[last] ^= 1;
        let (unsealed_error, unsealed_ack) = unsealed_frames(&recorded);
        let attacks: Vec<Vec<u8>> = vec![
            acks_through_10,
            recorded[1..].concat(),
            forged_welcome,
            unsealed_error,
            unsealed_ack,
        ];
        let second = leak::<4096>(OverflowPolicy::RejectNewest);
        for k in 100..105u64 {
            second.push(1, &[Value::U64(k)]).unwrap();
        }
        let c2 = cluster.clone();
        with_client(second, &cluster, gws, 5, async move {
            for attack in attacks {
                let before = c2.borrow().hellos.len();
                c2.borrow_mut().replay = Some(attack);
                assert!(
                    wait_until(StdDuration::from_secs(5), || c2.borrow().hellos.len()
                        >= before + 2)
                    .await
                );
                let st = second.status();
                assert_eq!((st.acked, st.queued, st.dropped), (0, 5, 0), "{st:?}");
                assert_eq!(st.acked_through, 0);
            }
            c2.borrow_mut().replay = None;
            assert!(wait_until(StdDuration::from_secs(10), || second.status().acked == 5).await);
            assert_eq!(second.status().acked_through, 15);
        })
        .await;
        let c = cluster.borrow();
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        let want: Vec<u64> = (0..10).chain(100..105).collect();
        assert_eq!(c.payloads(), want);
    });
}

/// Inside a live session (after the gateway's authentic Welcome), frames an attacker on the
/// path injects or alters — an Ack recorded on an earlier boot, an Ack sealed under another
/// key, another connection's Welcome, unsealed Error and Ack frames, real Acks with one byte
/// changed — never make the device drop or skip a record: it never believes a record acked
/// that the cluster has not committed, and every record is stored exactly once in the end.
#[test]
fn test_frames_injected_into_a_live_session_drop_nothing() {
    let (rt, local) = local();
    local.block_on(&rt, async {
        let cluster = cluster(1, Faults::default(), 13);
        let gws = gateways(1);
        let recorded = record_first_boot(&cluster, gws).await;

        // An Ack through seq 1000 sealed by an attacker under a key of its own, with the
        // counter the device expects next.
        let mut attacker = cairn_protocol::DeviceSession::new(&[0x13; 32], 5, [9u8; 12]);
        let mut hello = [0u8; 128];
        let n = attacker
            .encode(&Message::Hello(attacker.hello(DEVICE, 1, 8)), &mut hello)
            .unwrap();
        let mut gw =
            cairn_protocol::GatewaySession::accept(&[0x13; 32], &hello[..n], [7; 12]).unwrap();
        let mut scratch = [0u8; 128];
        gw.encode(
            &Message::Welcome(Welcome {
                high_water: 0,
                leader: None,
                credit: 8,
            }),
            &mut scratch,
        )
        .unwrap();
        let mut foreign_ack = [0u8; 128];
        let n = gw
            .encode(
                &Message::Ack(Ack {
                    through_seq: 1000,
                    credit: 8,
                    leader: None,
                }),
                &mut foreign_ack,
            )
            .unwrap();
        let foreign_ack = foreign_ack[..n].to_vec();
        let (unsealed_error, unsealed_ack) = unsealed_frames(&recorded);
        let injections: Vec<Vec<u8>> = vec![
            recorded[1..].concat(),
            foreign_ack,
            recorded[0].clone(),
            unsealed_error,
            unsealed_ack,
        ];

        let second = leak::<4096>(OverflowPolicy::RejectNewest);
        for k in 100..110u64 {
            second.push(1, &[Value::U64(k)]).unwrap();
        }
        let c2 = cluster.clone();
        with_client(second, &cluster, gws, 5, async move {
            let check = |c2: &ClusterRef| {
                let st = second.status();
                assert!(
                    st.acked_through <= c2.borrow().hw,
                    "{st:?} beyond the committed"
                );
                assert_eq!(st.dropped, 0, "{st:?}");
            };
            for bytes in injections {
                let before = c2.borrow().hellos.len();
                c2.borrow_mut().inject_after_welcome = Some(bytes);
                assert!(
                    wait_until(StdDuration::from_secs(5), || c2.borrow().hellos.len()
                        >= before + 2)
                    .await
                );
                check(&c2);
            }
            c2.borrow_mut().inject_after_welcome = None;
            c2.borrow_mut().tamper_acks = true;
            for k in 110..115u64 {
                second.push(1, &[Value::U64(k)]).unwrap();
            }
            let before = c2.borrow().hellos.len();
            assert!(
                wait_until(StdDuration::from_secs(5), || c2.borrow().hellos.len()
                    >= before + 2)
                .await
            );
            check(&c2);
            c2.borrow_mut().tamper_acks = false;
            assert!(wait_until(StdDuration::from_secs(10), || second.status().queued == 0).await);
            assert_eq!(second.status().acked_through, 25);
        })
        .await;
        let c = cluster.borrow();
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        let want: Vec<u64> = (0..10).chain(100..115).collect();
        assert_eq!(c.payloads(), want);
    });
}

#[test]
fn test_idle_connection_pings_and_detects_a_dead_gateway() {
    let (rt, local) = local();
    local.block_on(&rt, async {
        let cluster = cluster(1, Faults::default(), 8);
        let client = leak::<1024>(OverflowPolicy::RejectNewest);
        let gws = gateways(1);
        with_client(client, &cluster, gws, 1, async move {
            client.push(1, &[Value::U64(0)]).unwrap();
            assert!(wait_until(StdDuration::from_secs(5), || client.status().acked == 1).await);
            // Idle for several ping intervals: pongs keep the one session alive.
            tokio::time::sleep(StdDuration::from_millis(700)).await;
            let st = client.status();
            assert_eq!(
                (st.retries, st.reconnects, st.state),
                (0, 0, ConnectionState::Connected)
            );
        })
        .await;
        assert_eq!(cluster.borrow().connects[0], 1);
    });
}

#[test]
fn test_leader_hint_is_tried_first_on_reconnect() {
    let (rt, local) = local();
    local.block_on(&rt, async {
        // Followers forward and hint at the leader (gateway 2) as 127.0.0.1:4003.
        let cluster = cluster(3, Faults::default(), 9);
        cluster.borrow_mut().leader = 2;
        let client = leak::<4096>(OverflowPolicy::RejectNewest);
        let gws = gateways(3);
        let c2 = cluster.clone();
        with_client(client, &cluster, gws, 1, async move {
            client.push(1, &[Value::U64(0)]).unwrap();
            assert!(wait_until(StdDuration::from_secs(5), || client.status().acked == 1).await);
            assert_eq!(
                client.status().gateway,
                Some(gateway_addr(0)),
                "a follower serves too"
            );
            // Break the connection: the next attempt goes to the hinted leader, mapped to the
            // ip the hint came from.
            c2.borrow_mut().down[0] = true;
            client.push(1, &[Value::U64(1)]).unwrap();
            assert!(wait_until(StdDuration::from_secs(5), || client.status().acked == 2).await);
            assert_eq!(client.status().gateway, Some(gateway_addr(2)));
        })
        .await;
        let order: Vec<usize> = cluster.borrow().attempts.iter().map(|a| a.0).collect();
        assert_eq!(order, [0, 2]);
        assert_exactly_once_in_order(&cluster, 0..2);
    });
}

#[test]
fn test_credit_window_is_never_exceeded() {
    let (rt, local) = local();
    local.block_on(&rt, async {
        // Tiny credit and slow acks: the device must wait for acks to open the window.
        let faults = Faults {
            credit: 5,
            ack_delay_max_ms: 5,
            ..Faults::default()
        };
        let cluster = cluster(1, faults, 10);
        let client = leak::<8192>(OverflowPolicy::RejectNewest);
        let gws = gateways(1);
        with_client(client, &cluster, gws, 1, async move {
            push_many(client, 0, 300).await;
            assert!(wait_until(StdDuration::from_secs(20), || client.status().acked == 300).await);
        })
        .await;
        // The gateway records any batch past the window it granted as a violation.
        assert_exactly_once_in_order(&cluster, 0..300);
    });
}

#[test]
fn test_drop_oldest_under_faults_keeps_order_and_never_reuses_a_seq() {
    let (rt, local) = local();
    local.block_on(&rt, async {
        // A small outbox that overflows while connections die, acks are slow and batches of
        // dead connections still commit (before the next Welcome, as SPEC §8 requires): sent
        // but unacknowledged records get dropped, and the client renumbers on Welcome.
        let faults = Faults {
            kill_per_mille: 60,
            drop_ack_per_mille: 30,
            ack_delay_min_ms: 0,
            ack_delay_max_ms: 20,
            late_commit_per_mille: 500,
            credit: 24,
            follower: FollowerMode::Forward,
        };
        let cluster = cluster(2, faults, 13);
        let client = leak::<256>(OverflowPolicy::DropOldest);
        let gws = gateways(2);
        with_client(client, &cluster, gws, 1, async move {
            for k in 0..2000u64 {
                client.push(1, &[Value::U64(k)]).unwrap();
                if k % 8 == 0 {
                    tokio::time::sleep(StdDuration::from_millis(1)).await;
                }
            }
            assert!(wait_until(StdDuration::from_secs(20), || client.status().queued == 0).await);
        })
        .await;
        let st = client.status();
        let c = cluster.borrow();
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        assert_eq!(c.gaps, 0, "the client never sends a gap");
        let got = c.payloads();
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "committed in push order, each once"
        );
        assert_eq!(
            got.last(),
            Some(&1999),
            "the newest record always gets through"
        );
        assert!(st.dropped > 0 && st.retries > 0, "{st:?}");
        // Every record was either committed or counted as dropped (a record can be both: sent,
        // committed, then dropped before its Ack arrived).
        assert!(
            got.len() as u64 + st.dropped >= 2000,
            "{} + {}",
            got.len(),
            st.dropped
        );
        for (i, (seq, _)) in c.rows.iter().enumerate() {
            assert_eq!(*seq, i as u64 + 1);
        }
    });
}

#[test]
fn test_connect_and_ack_timeouts_fire() {
    let (rt, local) = local();
    local.block_on(&rt, async {
        // Gateway 0 never completes the TCP handshake; gateway 1 accepts but acks only after
        // 3 s, far beyond the 1 s response timeout.
        let faults = Faults {
            ack_delay_min_ms: 3000,
            ack_delay_max_ms: 3000,
            ..Faults::default()
        };
        let cluster = cluster(2, faults, 14);
        cluster.borrow_mut().black_hole[0] = true;
        let client = leak::<1024>(OverflowPolicy::RejectNewest);
        let gws = gateways(2);
        let c2 = cluster.clone();
        with_client(client, &cluster, gws, 1, async move {
            client.push(1, &[Value::U64(0)]).unwrap();
            let timed_out =
                wait_until(StdDuration::from_secs(3), || client.status().retries >= 2).await;
            assert!(timed_out, "{:?}", client.status());
            let attempts: Vec<(usize, u64)> = c2.borrow().attempts.clone();
            // The hung connect is abandoned after connect_timeout (200 ms) for gateway 1.
            assert_eq!((attempts[0].0, attempts[1].0), (0, 1), "{attempts:?}");
            let gap = attempts[1].1 - attempts[0].1;
            assert!((190..1000).contains(&gap), "connect timeout after {gap} ms");
            // Gateway 1 took the batch but never acked in time: the client gave up on it.
            assert_eq!(client.status().acked, 0);
        })
        .await;
    });
}
