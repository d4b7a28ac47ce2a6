//! What applying one device entry costs on one replica, through the real state machine: the
//! ack path at one record in flight applies one entry of one one-record batch at a time.
//! Applies `CAIRN_APPLY_ENTRIES` (default 20,000) stamped `SessionBatches` entries of one
//! batch of `CAIRN_APPLY_RECORDS` records (default 1) of the bench's stream (three reals), one
//! apply call each, round robin over
//! `CAIRN_APPLY_DEVICES` devices (default 1) that each opened a session, and prints µs per
//! entry. The database goes under `CAIRN_APPLY_DIR` (default a fresh directory in /dev/shm,
//! so the figure is the CPU path, not the disk).
//!
//! ```sh
//! cargo run --release -p cairn-gateway --example apply_cost
//! perf record -g target/release/examples/apply_cost   # where the time goes
//! ```

use std::time::Instant;

use cairn_gateway::command::Command;
use cairn_gateway::command::device::DeviceBatch;
use cairn_gateway::command::registry::RegistryCommand;
use cairn_gateway::command::streams::StreamsCommand;
use cairn_gateway::db::schema::{Column, ColumnType, OnMismatch, Schema, StreamDef, Undeclared};
use cairn_gateway::raft::state_machine::StateMachine;
use cairn_gateway::raft::{Entry, TypeConfig};
use cairn_protocol::{BatchEncoder, MAX_FRAME, Record, Value};
use openraft::EntryPayload;
use openraft::storage::RaftStateMachine;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn schema() -> Schema {
    let col = |name: &str| Column {
        name: name.into(),
        ty: ColumnType::Real,
    };
    Schema {
        streams: vec![StreamDef {
            id: 1,
            table: "climate".into(),
            columns: vec![col("temperature"), col("humidity"), col("pressure")],
            on_mismatch: OnMismatch::default(),
        }],
        undeclared: Undeclared::Telemetry,
    }
}

fn entry(index: u64, cmd: Command) -> Entry {
    Entry {
        log_id: openraft::testing::log_id::<TypeConfig>(1, 1, index),
        payload: EntryPayload::Normal(cmd),
    }
}

async fn apply(sm: &mut StateMachine, e: Entry) {
    sm.apply(futures_util::stream::iter([Ok((e, None))]))
        .await
        .expect("apply");
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let entries = env("CAIRN_APPLY_ENTRIES", 20_000);
    let devices = env("CAIRN_APPLY_DEVICES", 1).max(1);
    let per_batch = env("CAIRN_APPLY_RECORDS", 1).clamp(1, 40);
    let dir = match std::env::var("CAIRN_APPLY_DIR") {
        Ok(d) => std::path::PathBuf::from(d),
        Err(_) => std::path::PathBuf::from(format!("/dev/shm/cairn-apply-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let mut sm = StateMachine::open(&dir, Default::default())?;
    // As a new cluster: format version 2 active, then the stream definitions.
    let mut index = 1;
    apply(&mut sm, entry(index, Command::ActivateVersion(2))).await;
    index += 1;
    apply(
        &mut sm,
        entry(index, Command::Streams(StreamsCommand::Define(schema()))),
    )
    .await;
    let mut sessions = Vec::new();
    for d in 0..devices {
        index += 1;
        let open = Command::DeviceRegistry(RegistryCommand::OpenSession {
            device_id: 1000 + d,
        });
        apply(&mut sm, entry(index, open)).await;
        sessions.push(cairn_gateway::db::registry::current_session(
            &sm.store().writer(),
            1000 + d,
        )?);
    }
    let received = 1_795_632_240_000i64;
    let started = Instant::now();
    for n in 0..entries {
        let d = n % devices;
        let first = (n / devices) * per_batch + 1;
        let mut body = [0u8; MAX_FRAME];
        let mut enc = BatchEncoder::new(&mut body, first, 1_000_000 + (first + per_batch) * 200);
        for seq in first..first + per_batch {
            enc.push(&Record {
                stream: 1,
                uptime_ms: 1_000_000 + seq * 200,
                values: &[
                    Value::F32(21.5 + (seq % 10) as f32 * 0.1),
                    Value::F32(48.25),
                    Value::F32(1013.0),
                ],
            })?;
        }
        let at = received + n as i64;
        let batch = DeviceBatch {
            device_id: 1000 + d,
            received_at_ms: at,
            body: enc.finish()?.as_bytes().to_vec(),
            session: sessions[d as usize],
        };
        let cmd = Command::SessionBatches {
            sessions: vec![sessions[d as usize]],
            batches: vec![batch],
        }
        .stamped(at);
        index += 1;
        apply(&mut sm, entry(index, cmd)).await;
    }
    let us = started.elapsed().as_secs_f64() * 1e6 / entries as f64;
    println!(
        "apply: {us:.1} µs per entry of one batch of {per_batch} records ({entries} entries, {devices} devices)"
    );
    drop(sm);
    if std::env::var("CAIRN_APPLY_DIR").is_err() {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}
