//! `flash-outbox` on a NOR model that refuses a second write to a word, with power cuts in
//! the middle of flash writes and erases, against the simulated gateway cluster.
#![cfg(feature = "flash-outbox")]

mod common;
mod nor;

use std::collections::BTreeSet;
use std::time::Duration as StdDuration;

use cairn_firmware::backoff::Prng;
use cairn_firmware::flash::{FlashError, FlashOutbox};
use cairn_firmware::{Client, OverflowPolicy, PushError, Value};
use common::*;
use embassy_sync::blocking_mutex::raw::CriticalSectionRawMutex;
use nor::Nor;

/// 8 erase units of 4 KiB, 4-byte words, no word written twice (the model panics).
type Flash = Nor<4, 4096>;
const REGION: std::ops::Range<u32> = 0..32 * 1024;

fn flash() -> Flash {
    Nor::new(8, 1)
}

type TestClient = Client<CriticalSectionRawMutex, 2048>;

fn local() -> (tokio::runtime::Runtime, tokio::task::LocalSet) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (rt, tokio::task::LocalSet::new())
}

fn gateways() -> &'static [cairn_firmware::GatewayAddr] {
    Box::leak(Box::new([gateway_addr(0), gateway_addr(1)]))
}

#[test]
fn test_boot_counter_increments_and_regions_are_checked() {
    let (rt, local) = local();
    local.block_on(&rt, async {
        let flash = flash();
        for want in 1..=3 {
            let store = FlashOutbox::open(flash.clone(), REGION).await.unwrap();
            assert_eq!(store.boot(), want);
        }
        let one_unit = FlashOutbox::open(flash.clone(), 0..4 * 1024).await;
        assert_eq!(one_unit.err(), Some(FlashError::BadRegion));
        let unaligned = FlashOutbox::open(flash.clone(), 100..8 * 1024).await;
        assert_eq!(unaligned.err(), Some(FlashError::BadRegion));
        let too_far = FlashOutbox::open(flash.clone(), 0..64 * 1024).await;
        assert_eq!(too_far.err(), Some(FlashError::BadRegion));
    });
}

#[test]
fn test_restore_puts_back_exactly_the_unacked_records() {
    let (rt, local) = local();
    local.block_on(&rt, async {
        let flash = flash();
        let cluster = cluster(2, Faults::default(), 11);
        let gws = gateways();
        // Boot 1: 30 records acked, then 20 more while the gateways are down.
        {
            let mut store = FlashOutbox::open(flash.clone(), REGION).await.unwrap();
            let client: &'static TestClient =
                Box::leak(Box::new(TestClient::new(OverflowPolicy::RejectNewest)));
            assert_eq!(store.restore(client).await.unwrap(), 0);
            let c = cluster.clone();
            let runner = tokio::task::spawn_local(async move {
                let config = fast_config(gws, store.boot());
                client
                    .run_with_store(&mut SimTransport { cluster: c }, &config, &mut store)
                    .await
            });
            for k in 0..30 {
                client.push(1, &[Value::U64(k)]).unwrap();
            }
            assert!(wait_until(StdDuration::from_secs(5), || client.status().acked == 30).await);
            cluster.borrow_mut().down = vec![true; 2];
            // Kill the live connection too: the next frame it carries is lost.
            for k in 30..50 {
                client.push(1, &[Value::U64(k)]).unwrap();
            }
            tokio::time::sleep(StdDuration::from_millis(100)).await;
            runner.abort();
            let _ = runner.await;
        }
        cluster.borrow_mut().down = vec![false; 2];
        let committed_before = cluster.borrow().rows.len() as u64;
        assert!(committed_before < 50, "the gateway must have missed some");
        // Boot 2: the flash still holds records 30..50 (or the part not committed).
        let mut store = FlashOutbox::open(flash.clone(), REGION).await.unwrap();
        assert_eq!(store.boot(), 2);
        let client: &'static TestClient =
            Box::leak(Box::new(TestClient::new(OverflowPolicy::RejectNewest)));
        let restored = store.restore(client).await.unwrap() as u64;
        assert!(
            restored >= 50 - committed_before && restored <= 20,
            "restored {restored}"
        );
        for k in 50..60 {
            client.push(1, &[Value::U64(k)]).unwrap();
        }
        let c = cluster.clone();
        let runner = tokio::task::spawn_local(async move {
            let config = fast_config(gws, store.boot());
            client
                .run_with_store(&mut SimTransport { cluster: c }, &config, &mut store)
                .await
        });
        assert!(wait_until(StdDuration::from_secs(5), || client.status().queued == 0).await);
        runner.abort();
        let c = cluster.borrow();
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        assert_eq!(c.payloads(), (0..60).collect::<Vec<_>>());
        assert_eq!(c.gaps, 0);
    });
}

/// Many boots, each ended by a power cut at a random byte of a flash write or erase, with a
/// lossy cluster. Properties:
/// - no seq ever carries two different records (the gateway saw every frame);
/// - rows are committed exactly once and in push order;
/// - what a power cut loses is only a suffix of that boot's pushes (records pushed but not yet
///   on flash): flash persists in order;
/// - records left unacknowledged in flash are resent after the reboot and committed;
/// - the last boot (no cut) delivers everything it pushed.
#[test]
fn test_power_cuts_never_reuse_a_seq_and_resend_unacked() {
    // CAIRN_FLASH_SEEDS=N runs N seeds (default 3).
    let seeds: u64 = std::env::var("CAIRN_FLASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let first: u64 = std::env::var("CAIRN_FLASH_SEED0")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    for seed in first..first + seeds {
        power_cut_run(seed);
    }
}

fn power_cut_run(seed: u64) {
    trace_logger();
    let (rt, local) = local();
    local.block_on(&rt, async {
        let flash = flash();
        let faults = Faults {
            kill_per_mille: 20,
            drop_ack_per_mille: 20,
            ack_delay_min_ms: 0,
            ack_delay_max_ms: 10,
            late_commit_per_mille: 500,
            credit: 40,
            follower: FollowerMode::Forward,
        };
        let cluster = cluster(2, faults, 12 + seed);
        let gws = gateways();
        let mut rng = Prng::new(99 + seed);
        let mut next_k = 0u64;
        let mut pushed_per_boot: Vec<Vec<u64>> = Vec::new();
        let mut restored_total = 0;
        let mut cuts = 0;
        let boots = 12;
        for boot in 0..boots {
            let last = boot == boots - 1;
            flash.power_on(None);
            let mut store = FlashOutbox::open(flash.clone(), REGION).await.unwrap();
            assert_eq!(store.boot(), boot + 1);
            let client: &'static TestClient =
                Box::leak(Box::new(TestClient::new(OverflowPolicy::RejectNewest)));
            restored_total += store.restore(client).await.unwrap();
            if std::env::var_os("CAIRN_SIM_TRACE").is_some() {
                eprintln!(
                    "boot {} restored {} next_k {next_k} status {:?}",
                    boot + 1,
                    store.len(),
                    client.status()
                );
            }
            // Power cut somewhere in the next 5 .. 120 flash operations (150 records take about
            // 300 writes, plus state records and unit erases).
            flash.power_on(if last {
                None
            } else {
                Some(rng.between(5, 120))
            });
            let c = cluster.clone();
            let runner = tokio::task::spawn_local(async move {
                let config = fast_config(gws, store.boot());
                client
                    .run_with_store(&mut SimTransport { cluster: c }, &config, &mut store)
                    .await
            });
            let mut pushed = Vec::new();
            for _ in 0..150 {
                if flash.dead() {
                    break;
                }
                match client.push(1, &[Value::U64(next_k)]) {
                    Ok(_) => {
                        pushed.push(next_k);
                        next_k += 1;
                    }
                    Err(PushError::Full) => {}
                    Err(e) => panic!("{e}"),
                }
                tokio::time::sleep(StdDuration::from_micros(300)).await;
            }
            if last {
                assert!(
                    wait_until(StdDuration::from_secs(10), || client.status().queued == 0).await,
                    "{:?}",
                    client.status()
                );
            } else {
                // Run until the power cut, then "reboot".
                wait_until(StdDuration::from_secs(3), || flash.dead()).await;
                cuts += u32::from(flash.dead());
            }
            runner.abort();
            let _ = runner.await;
            pushed_per_boot.push(pushed);
        }
        println!(
            "seed {seed}: {cuts} power cuts, {restored_total} records restored, {next_k} pushed"
        );
        assert!(cuts >= boots - 3, "power cuts must have happened: {cuts}");
        assert!(restored_total > 0, "some boot must have restored records");

        let c = cluster.borrow();
        assert!(c.violations.is_empty(), "seq reused: {:?}", c.violations);
        assert_eq!(c.gaps, 0);
        let committed = c.payloads();
        let mut sorted = committed.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted, committed, "committed once each, in push order");
        let committed: BTreeSet<u64> = committed.into_iter().collect();
        for (boot, pushed) in pushed_per_boot.iter().enumerate() {
            let kept: Vec<bool> = pushed.iter().map(|k| committed.contains(k)).collect();
            let first_lost = kept.iter().position(|k| !k).unwrap_or(kept.len());
            assert!(
                kept[first_lost..].iter().all(|k| !k),
                "boot {boot}: lost records must be a suffix of its pushes: {kept:?}"
            );
            if boot == pushed_per_boot.len() - 1 {
                assert_eq!(first_lost, kept.len(), "the last boot loses nothing");
            }
        }
        let boots_seen: BTreeSet<u32> = c.hellos.iter().map(|h| h.1).collect();
        assert!(boots_seen.len() >= 2 && boots_seen.iter().all(|b| *b >= 1 && *b <= boots));
    });
}

/// A device that never reaches a gateway still keeps its records: they reach flash while the
/// run loop backs off between failed connects, survive power cuts across two offline boots, and
/// are then delivered exactly once, in push order, with no seq reused, once a gateway is back.
#[test]
fn test_records_pushed_offline_survive_power_cut() {
    let (rt, local) = local();
    local.block_on(&rt, async {
        let flash = flash();
        let cluster = cluster(2, Faults::default(), 13);
        let gws = gateways();

        // Boots the client on `flash`, pushes `keys`, lets the run loop persist for a while
        // with the cluster `up` or not, then cuts power. Returns what `restore` found.
        let boot = |keys: std::ops::Range<u64>, up: bool, deliver: bool| {
            let flash = flash.clone();
            let cluster = cluster.clone();
            async move {
                flash.power_on(None);
                cluster.borrow_mut().down = vec![!up; 2];
                let mut store = FlashOutbox::open(flash.clone(), REGION).await.unwrap();
                let client: &'static TestClient =
                    Box::leak(Box::new(TestClient::new(OverflowPolicy::RejectNewest)));
                let restored = store.restore(client).await.unwrap();
                let c = cluster.clone();
                let runner = tokio::task::spawn_local(async move {
                    let config = fast_config(gws, store.boot());
                    client
                        .run_with_store(&mut SimTransport { cluster: c }, &config, &mut store)
                        .await
                });
                // Let the run loop reach its connect / backoff cycle first.
                tokio::time::sleep(StdDuration::from_millis(30)).await;
                for k in keys.clone() {
                    client.push(1, &[Value::U64(k)]).unwrap();
                    tokio::time::sleep(StdDuration::from_millis(1)).await;
                }
                if deliver {
                    assert!(
                        wait_until(StdDuration::from_secs(5), || client.status().queued == 0).await,
                        "{:?}",
                        client.status()
                    );
                } else {
                    // Time for the run loop to persist (backoff is at most 80 ms here).
                    tokio::time::sleep(StdDuration::from_millis(300)).await;
                    assert_eq!(client.status().acked, 0, "no gateway was reachable");
                }
                // Power cut: flash stops answering, RAM is gone.
                flash.power_off();
                runner.abort();
                let _ = runner.await;
                restored
            }
        };

        // Boot 1 is online, so the gateway holds a high-water (10) before the device goes
        // offline; its outbox is empty at the cut.
        assert_eq!(boot(0..10, true, true).await, 0);
        let attempts_before = cluster.borrow().attempts.len();
        // Boots 2 and 3: no gateway reachable. Nothing is lost at either power cut.
        assert_eq!(boot(10..30, false, false).await, 0);
        assert_eq!(
            boot(30..40, false, false).await,
            20,
            "boot 2's records on flash"
        );
        assert!(
            cluster.borrow().attempts.len() > attempts_before + 2,
            "the offline boots kept trying to connect"
        );
        // Boot 4: gateways back. It restores both offline boots' records and delivers them.
        assert_eq!(
            boot(40..45, true, true).await,
            30,
            "boots 2 and 3's records"
        );

        let c = cluster.borrow();
        assert!(c.violations.is_empty(), "seq reused: {:?}", c.violations);
        assert_eq!(c.gaps, 0);
        assert_eq!(
            c.payloads(),
            (0..45).collect::<Vec<_>>(),
            "each exactly once"
        );
        let boots_seen: BTreeSet<u32> = c.hellos.iter().map(|h| h.1).collect();
        assert_eq!(
            boots_seen,
            BTreeSet::from([1, 4]),
            "only boots 1 and 4 got through"
        );
    });
}
