//! Power cuts at every flash operation, on flash models with 1-, 4- and 32-byte words and
//! 4 KiB to 128 KiB erase units that refuse a second write to a word.
//!
//! A deterministic device and gateway: the device pushes, syncs (which writes the flash log),
//! sends what `sync` reported durable, and takes acks; the gateway commits in seq order and
//! refuses gaps. One run cuts power at operation `k` (tearing it), reboots, and carries on to
//! a final boot that delivers everything. For every `k` of the run without a cut:
//! - every record that was durable (on flash per `sync`) and not acked is restored, with the
//!   same seq if it was sent;
//! - no seq is ever sent with two different contents, nothing is committed twice, and the
//!   gateway never sees a gap;
//! - every seq ever sent is at or below the seq floor found at the next boot, and the floor
//!   never goes backwards;
//! - the boot counter strictly increases;
//! - the last boot delivers every record that was ever durable.

extern crate std;

use std::collections::{BTreeMap, BTreeSet};
use std::vec::Vec;

use embassy_futures::block_on;
use embassy_sync::blocking_mutex::raw::NoopRawMutex;
use embedded_storage_async::nor_flash::NorFlash;

use super::FlashOutbox;
use crate::record::StoredRecord;
use crate::{Client, OverflowPolicy, Seq, Store, Value};

#[path = "../tests/nor/mod.rs"]
mod nor;
use nor::Nor;

type TestClient = Client<NoopRawMutex, 4096>;

/// Everything the device and the gateway have seen, across boots.
#[derive(Default)]
struct World {
    next_k: u64,
    /// Gateway: committed seq -> content; its high-water is the last key.
    committed: BTreeMap<Seq, u64>,
    /// Contents durable and not acked at the last look (must survive a power cut).
    must_survive: BTreeMap<u64, Seq>,
    /// Every content ever durable.
    ever_durable: BTreeSet<u64>,
    last_boot: u32,
    floor: Seq,
    rng: u64,
}

impl World {
    fn rand(&mut self, n: u64) -> u64 {
        self.rng = self
            .rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.rng >> 33) % n
    }

    fn high_water(&self) -> Seq {
        self.committed.last_key_value().map_or(0, |(s, _)| *s)
    }
}

fn content(bytes: &[u8]) -> u64 {
    match StoredRecord::decode(bytes)
        .expect("a valid record")
        .values()
        .first()
        .copied()
    {
        Some(Value::U64(k)) => k,
        other => panic!("unexpected first value {other:?}"),
    }
}

fn records(client: &TestClient) -> Vec<(Seq, u64)> {
    client.lock(|s| s.outbox.iter().map(|(seq, b)| (seq, content(b))).collect())
}

/// A sync, then everything durable goes on the wire and the gateway commits it. Returns false
/// when the flash lost power.
fn sync_and_send<S: NorFlash>(
    w: &mut World,
    client: &TestClient,
    store: &mut FlashOutbox<S>,
    dead: &dyn Fn() -> bool,
) -> bool {
    let limit = block_on(store.sync(client));
    let durable: Vec<(Seq, u64)> = records(client)
        .into_iter()
        .filter(|(s, _)| *s < limit)
        .collect();
    w.must_survive = durable.iter().map(|(s, k)| (*k, *s)).collect();
    w.ever_durable.extend(durable.iter().map(|(_, k)| *k));
    if dead() {
        return false;
    }
    let wire_last = client.lock(|s| s.wire_last);
    for (seq, k) in durable {
        if seq <= wire_last {
            continue;
        }
        if let Some(old) = w.committed.get(&seq) {
            assert_eq!(*old, k, "seq {seq} sent with two contents");
            continue;
        }
        assert_eq!(seq, w.high_water() + 1, "gap before seq {seq}");
        assert!(
            !w.committed.values().any(|c| *c == k),
            "content {k} committed twice"
        );
        assert!(seq <= store.seq_floor(), "seq {seq} sent above the floor");
        w.committed.insert(seq, k);
        client.lock(|s| s.set_wire_next(seq + 1));
    }
    true
}

fn welcome(w: &World, client: &TestClient) {
    let hw = w.high_water();
    client.lock(|s| {
        let sent_through = s.wire_last;
        s.outbox.ack_through(hw.min(sent_through));
        s.rebase(hw + 1);
        s.set_wire_next(hw + 1);
    });
}

/// Opens and restores; checks what came back. `None` when power failed meanwhile.
fn boot<S: NorFlash + Clone>(
    w: &mut World,
    flash: &S,
    region: core::ops::Range<u32>,
    client: &TestClient,
) -> Option<FlashOutbox<S>> {
    let mut store = block_on(FlashOutbox::open(flash.clone(), region)).ok()?;
    assert!(store.boot() > w.last_boot, "boot counter went back");
    w.last_boot = store.boot();
    let high_water = w.high_water();
    assert!(store.seq_floor() >= w.floor, "seq floor went back");
    assert!(
        store.seq_floor() >= high_water,
        "a sent seq is above the floor"
    );
    w.floor = store.seq_floor();
    block_on(store.restore(client)).ok()?;
    let restored = records(client);
    let seqs: Vec<Seq> = restored.iter().map(|(s, _)| *s).collect();
    assert!(
        seqs.windows(2).all(|p| p[1] == p[0] + 1),
        "restored seqs {seqs:?}"
    );
    let contents: BTreeMap<u64, Seq> = restored.iter().map(|(s, k)| (*k, *s)).collect();
    assert_eq!(contents.len(), restored.len(), "a content restored twice");
    for (k, seq) in &w.must_survive {
        let got = contents.get(k);
        assert!(got.is_some(), "durable record {k} (seq {seq}) lost");
        if *seq <= high_water {
            assert_eq!(got, Some(seq), "sent record {k} changed its seq");
        }
    }
    for (seq, k) in &restored {
        if let Some(c) = w.committed.get(seq) {
            assert_eq!(c, k, "restored seq {seq} differs from what was committed");
        }
    }
    welcome(w, client);
    Some(store)
}

struct Scenario {
    boots: u32,
    pushes_per_boot: u32,
    /// 64-byte blobs per record (bigger records fill big units sooner).
    blobs: usize,
    /// Start from a flash full of foreign data (so every unit is erased before use).
    dirty: bool,
}

/// Runs the scenario on a fresh flash, cutting power at operation `cut` (counted from the
/// first open). Returns the operations the run took.
/// What a run did: flash operations, erases, records restored over all boots.
struct Ran {
    ops: u64,
    erases: u64,
    restored: usize,
}

fn run<const W: usize, const E: usize>(sc: &Scenario, units: usize, cut: Option<u64>) -> Ran {
    let flash: Nor<W, E> = Nor::new(units + 1, cut.unwrap_or(7));
    // The region leaves the first unit out: offsets are relative to the flash, not the region.
    let region = E as u32..((units + 1) * E) as u32;
    if sc.dirty {
        flash.scribble(region.start as usize..region.end as usize, 0x5A);
    }
    let mut w = World {
        rng: cut.unwrap_or(0) ^ 0x5eed,
        ..World::default()
    };
    let blob = [0xA5u8; 64];
    let mut cut_pending = cut;
    let dead = || flash.dead();
    let mut boot_no = 0;
    let mut restored = 0;
    while boot_no < sc.boots {
        boot_no += 1;
        let last = boot_no == sc.boots;
        flash.power_on(cut_pending.map(|c| c.saturating_sub(flash.ops())));
        let client = TestClient::new(OverflowPolicy::RejectNewest);
        let Some(mut store) = boot(&mut w, &flash, region.clone(), &client) else {
            assert!(flash.dead(), "open failed with power on");
            cut_pending = None;
            boot_no -= 1;
            continue;
        };
        restored += store.len();
        let mut alive = true;
        for _ in 0..sc.pushes_per_boot {
            let k = w.next_k;
            let mut values = [
                Value::U64(k),
                Value::Bool(true),
                Value::Bool(true),
                Value::Bool(true),
                Value::Bool(true),
                Value::Bool(true),
                Value::Bool(true),
                Value::Bool(true),
            ];
            for v in values.iter_mut().skip(1).take(sc.blobs) {
                *v = Value::Bytes(&blob);
            }
            if client.push(1, &values[..1 + sc.blobs]).is_ok() {
                w.next_k += 1;
            }
            if w.rand(3) == 0 {
                continue;
            }
            if !sync_and_send(&mut w, &client, &mut store, &dead) {
                alive = false;
                break;
            }
            // Acks lag behind commits.
            let lag = w.rand(4);
            let through = w.high_water().saturating_sub(lag);
            client.lock(|s| s.outbox.ack_through(through));
        }
        if alive && last {
            // Deliver everything.
            for _ in 0..3 {
                if !sync_and_send(&mut w, &client, &mut store, &dead) {
                    break;
                }
                let hw = w.high_water();
                client.lock(|s| s.outbox.ack_through(hw));
            }
            if !flash.dead() {
                assert_eq!(
                    client.status().queued,
                    0,
                    "the last boot delivers everything"
                );
            }
        }
        if flash.dead() {
            cut_pending = None;
            if last {
                boot_no -= 1;
            }
        }
    }
    let committed: BTreeSet<u64> = w.committed.values().copied().collect();
    assert_eq!(
        committed.len(),
        w.committed.len(),
        "a content committed twice"
    );
    let missing: Vec<&u64> = w.ever_durable.difference(&committed).collect();
    assert!(
        missing.is_empty(),
        "durable records never delivered: {missing:?}"
    );
    Ran {
        ops: flash.ops(),
        erases: flash.erases(),
        restored,
    }
}

fn sweep<const W: usize, const E: usize>(sc: Scenario, units: usize) {
    let clean = run::<W, E>(&sc, units, None);
    assert!(
        clean.erases >= 2,
        "the log must wrap: {} erases",
        clean.erases
    );
    let mut restored = 0;
    for k in 0..clean.ops {
        // Names the failing cut if `run` panics.
        struct Cut(u64);
        impl Drop for Cut {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    std::eprintln!("power cut at operation {}", self.0);
                }
            }
        }
        let _cut = Cut(k);
        restored += run::<W, E>(&sc, units, Some(k)).restored;
    }
    assert!(restored > 0, "power cuts must leave records to restore");
    std::println!(
        "W={W} E={E}: power cut at each of {} operations ({} erases), {restored} records restored",
        clean.ops,
        clean.erases
    );
}

#[test]
fn test_power_cut_at_every_operation_1_byte_words_4k_units() {
    sweep::<1, 4096>(
        Scenario {
            boots: 4,
            pushes_per_boot: 90,
            blobs: 0,
            dirty: false,
        },
        2,
    );
}

#[test]
fn test_power_cut_at_every_operation_4_byte_words_4k_units() {
    sweep::<4, 4096>(
        Scenario {
            boots: 4,
            pushes_per_boot: 60,
            blobs: 1,
            dirty: true,
        },
        3,
    );
}

#[test]
fn test_power_cut_at_every_operation_32_byte_words_4k_units() {
    sweep::<32, 4096>(
        Scenario {
            boots: 4,
            pushes_per_boot: 50,
            blobs: 0,
            dirty: true,
        },
        2,
    );
}

#[test]
fn test_power_cut_at_every_operation_32_byte_words_128k_units() {
    sweep::<32, { 128 * 1024 }>(
        Scenario {
            boots: 3,
            pushes_per_boot: 100,
            blobs: 7,
            dirty: true,
        },
        2,
    );
}

/// A device that never reaches a gateway fills the log; every later boot must still open
/// (the boot counter is persisted) and restore what flash holds.
#[test]
fn test_boots_with_a_full_log() {
    let flash: Nor<4, 4096> = Nor::new(2, 1);
    let blob = [7u8; 64];
    let mut full_seen = false;
    for boot in 1..=8 {
        // A RAM outbox larger than the log, so the log is what fills up.
        let client = Client::<NoopRawMutex, 16384>::new(OverflowPolicy::RejectNewest);
        let mut store = block_on(FlashOutbox::open(flash.clone(), 0..8192)).expect("opens");
        assert_eq!(store.boot(), boot);
        let restored = block_on(store.restore(&client)).unwrap();
        assert_eq!(restored, store.len());
        for k in 0..200 {
            let values = [Value::U64(k), Value::Bytes(&blob), Value::Bytes(&blob)];
            if client.push(1, &values).is_err() {
                break;
            }
            let limit = block_on(store.sync(&client));
            let next = client.lock(|s| s.outbox.next_seq());
            full_seen |= limit < next;
        }
        if boot > 1 {
            assert!(restored > 0, "boot {boot} restored nothing");
        }
    }
    assert!(full_seen, "the log must have filled up");
}
