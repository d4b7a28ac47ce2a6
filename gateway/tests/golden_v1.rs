//! The postcard bytes of format version 1 (release v0.1.0, commit 0b11d7a), frozen: every
//! `Command` variant that release had, a Raft log entry of each payload kind, and the Raft RPC
//! bodies (AppendEntries, Vote and their answers, the snapshot head). A v0.1.0 node decodes
//! exactly these bytes, and a newer binary must keep producing them while the cluster's active
//! version is 1 (`gateway/src/version.rs`). A change to a payload type, a renumbered variant
//! or an openraft upgrade that moves a byte fails here: such a change needs a new entry kind
//! or a versioned envelope, and a format version bump.
//!
//! `GOLDEN_PRINT=1 cargo test -p cairn-gateway --test golden_v1 -- --nocapture` prints the
//! current bytes (to review, never to paste over a failure without a version bump).

use std::collections::{BTreeMap, BTreeSet};

use cairn_gateway::command::Command;
use cairn_gateway::command::backup::{BackupShipped, ShippedPosition};
use cairn_gateway::command::device::DeviceBatch;
use cairn_gateway::command::export::ExportCommand;
use cairn_gateway::command::load::{LoadChunk, LoadEnd};
use cairn_gateway::command::registry::RegistryCommand;
use cairn_gateway::command::sql::SqlCommand;
use cairn_gateway::command::streams::{SchemaV1, StreamDefV1, StreamsCommand};
use cairn_gateway::db::export::{Cursor, Position};
use cairn_gateway::db::schema::{Column, ColumnType, OnMismatch, Schema, StreamDef, Undeclared};
use cairn_gateway::db::sql::{Params, Statement, Value};
use cairn_gateway::raft::{Entry, Peer, SnapshotMeta, StoredMembership, TypeConfig, Vote};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse};
use openraft::{EntryPayload, Membership};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn log_id(term: u64, node: u64, index: u64) -> cairn_gateway::raft::LogId {
    openraft::testing::log_id::<TypeConfig>(term, node, index)
}

fn schema() -> Schema {
    Schema {
        streams: vec![StreamDef {
            id: 7,
            table: "climate".into(),
            columns: vec![
                Column {
                    name: "t".into(),
                    ty: ColumnType::Real,
                },
                Column {
                    name: "ok".into(),
                    ty: ColumnType::Bool,
                },
            ],
            on_mismatch: OnMismatch::default(),
        }],
        undeclared: Undeclared::Reject,
    }
}

fn sql() -> SqlCommand {
    SqlCommand {
        statements: vec![
            Statement::new("CREATE TABLE t(a)"),
            Statement {
                sql: "INSERT INTO t VALUES(?, ?, ?, ?, ?)".into(),
                params: Params::Positional(vec![
                    Value::Null,
                    Value::Integer(-5),
                    Value::Real(1.5),
                    Value::Text("x".into()),
                    Value::Blob(vec![1, 2]),
                ]),
            },
            Statement {
                sql: "INSERT INTO t VALUES(:a)".into(),
                params: Params::Named(vec![("a".into(), Value::Integer(1))]),
            },
        ],
        transaction: true,
    }
}

/// One value of every `Command` variant v0.1.0 had (and each registry, streams and export
/// command kind), in variant order.
fn commands() -> Vec<(&'static str, Command)> {
    let schema_v1 = SchemaV1 {
        streams: vec![StreamDefV1 {
            id: 7,
            table: "climate".into(),
            columns: vec![Column {
                name: "t".into(),
                ty: ColumnType::Real,
            }],
        }],
        undeclared: Undeclared::Reject,
    };
    vec![
        ("Sql", Command::Sql(sql())),
        (
            "DeviceBatches",
            Command::DeviceBatches(vec![DeviceBatch {
                device_id: 42,
                received_at_ms: 1_764_000_000_000,
                body: vec![9, 8, 7],
                session: 0,
            }]),
        ),
        (
            "DeviceRegistry/Add",
            Command::DeviceRegistry(RegistryCommand::Add {
                device_id: 1,
                key: [3; 32],
            }),
        ),
        (
            "DeviceRegistry/Remove",
            Command::DeviceRegistry(RegistryCommand::Remove { device_id: 1 }),
        ),
        (
            "DeviceRegistry/DefineStreams",
            Command::DeviceRegistry(RegistryCommand::DefineStreams(schema_v1)),
        ),
        (
            "DeviceRegistry/ResetHighWater",
            Command::DeviceRegistry(RegistryCommand::ResetHighWater {
                device_id: 1,
                seq: 300,
            }),
        ),
        (
            "DeviceRegistry/Revoke",
            Command::DeviceRegistry(RegistryCommand::Revoke {
                device_id: 1,
                at_ms: 5,
            }),
        ),
        (
            "DeviceRegistry/Rekey",
            Command::DeviceRegistry(RegistryCommand::Rekey {
                device_id: 1,
                key: [4; 32],
                at_ms: 6,
                grace_until_ms: 7,
            }),
        ),
        (
            "DeviceRegistry/SetProtocol",
            Command::DeviceRegistry(RegistryCommand::SetProtocol {
                device_id: 1,
                version: 2,
            }),
        ),
        (
            "DeviceRegistry/KeySeen",
            Command::DeviceRegistry(RegistryCommand::KeySeen {
                device_id: 1,
                rekeyed_at_ms: 6,
                at_ms: 8,
            }),
        ),
        (
            "SqlAt",
            Command::SqlAt {
                stamp_ms: 1_764_000_000_123,
                sql: sql(),
            },
        ),
        (
            "LoadChunk",
            Command::LoadChunk(LoadChunk {
                load_id: 77,
                offset: 4096,
                data: vec![0xAA; 5],
                last: Some(LoadEnd {
                    len: 4101,
                    restore_state: true,
                }),
            }),
        ),
        (
            "Streams/Define",
            Command::Streams(StreamsCommand::Define(schema())),
        ),
        (
            "Streams/Replay",
            Command::Streams(StreamsCommand::Replay {
                stream: 7,
                device: Some(42),
            }),
        ),
        (
            "Stamped",
            Command::Stamped {
                stamp_ms: 1_764_000_000_456,
                cmd: Box::new(Command::Sql(SqlCommand {
                    statements: vec![Statement::new("DELETE FROM t")],
                    transaction: false,
                })),
            },
        ),
        (
            "BackupShipped",
            Command::BackupShipped(BackupShipped {
                target: "file:///b".into(),
                position: ShippedPosition {
                    index: 99,
                    stamp_ms: 1_764_000_000_789,
                },
            }),
        ),
        (
            "Export/SetSite",
            Command::Export(ExportCommand::SetSite("site-a".into())),
        ),
        (
            "Export/Cursor",
            Command::Export(ExportCommand::Cursor(Cursor {
                name: "pg".into(),
                pos: Position {
                    log_index: 10,
                    ordinal: 2,
                },
                delivered: 500,
            })),
        ),
        (
            "Export/Forget",
            Command::Export(ExportCommand::Forget("pg".into())),
        ),
        (
            "Export/Retain",
            Command::Export(ExportCommand::Retain {
                stamp_ms: 1_764_000_000_999,
                table: "climate".into(),
                keep_ms: 86_400_000,
                keep_unexported: true,
                limit: 5000,
            }),
        ),
    ]
}

fn peer(n: u64) -> Peer {
    Peer {
        raft_addr: format!("10.0.0.{n}:4002"),
        http_addr: format!("10.0.0.{n}:4001"),
        device_addr: format!("10.0.0.{n}:4003"),
    }
}

fn membership() -> Membership<u64, Peer> {
    Membership::new(
        vec![BTreeSet::from([1, 2, 3])],
        BTreeMap::from([(1, peer(1)), (2, peer(2)), (3, peer(3)), (4, peer(4))]),
    )
    .unwrap()
}

fn entries() -> Vec<Entry> {
    vec![
        Entry {
            log_id: log_id(2, 1, 10),
            payload: EntryPayload::Blank,
        },
        Entry {
            log_id: log_id(2, 1, 11),
            payload: EntryPayload::Membership(membership()),
        },
        Entry {
            log_id: log_id(2, 1, 12),
            payload: EntryPayload::Normal(Command::Sql(sql()).stamped(1_764_000_000_001)),
        },
    ]
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Checks `value` encodes to `frozen` and `frozen` decodes to a value encoding the same.
fn check<T: Serialize + DeserializeOwned>(name: &str, value: &T, frozen: &str) {
    let bytes = postcard::to_allocvec(value).unwrap();
    if std::env::var_os("GOLDEN_PRINT").is_some() {
        println!("(\"{name}\", \"{}\"),", hex(&bytes));
        return;
    }
    assert_eq!(hex(&bytes), frozen, "{name}: the version 1 bytes changed");
    let raw: Vec<u8> = (0..frozen.len() / 2)
        .map(|i| u8::from_str_radix(&frozen[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let back: T = postcard::from_bytes(&raw).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(postcard::to_allocvec(&back).unwrap(), raw, "{name}");
}

fn frozen(table: &[(&str, &str)], name: &str) -> String {
    table
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, h)| h.to_string())
        .unwrap_or_default()
}

#[test]
fn test_v1_commands_keep_their_bytes() {
    let all = commands();
    // Every variant v0.1.0 had is covered (the Display names the variant).
    let kinds: BTreeSet<String> = all
        .iter()
        .map(|(_, c)| c.to_string().split('(').next().unwrap().to_string())
        .collect();
    assert_eq!(kinds.len(), 9, "{kinds:?}");
    for (name, cmd) in &all {
        assert_eq!(cmd.min_version(), 1, "{name}");
        check(name, cmd, &frozen(COMMANDS, name));
    }
}

#[test]
fn test_v1_rpc_bodies_keep_their_bytes() {
    let vote = Vote::new(3, 2);
    let committed = Vote::new_committed(3, 1);
    let append = AppendEntriesRequest::<TypeConfig> {
        vote: committed,
        prev_log_id: Some(log_id(2, 1, 9)),
        entries: entries(),
        leader_commit: Some(log_id(2, 1, 9)),
    };
    check("append", &append, &frozen(RPCS, "append"));
    let heartbeat = AppendEntriesRequest::<TypeConfig> {
        vote: committed,
        prev_log_id: Some(log_id(2, 1, 12)),
        entries: vec![],
        leader_commit: Some(log_id(2, 1, 12)),
    };
    check("heartbeat", &heartbeat, &frozen(RPCS, "heartbeat"));
    let answers: Vec<(&str, Result<AppendEntriesResponse<TypeConfig>, String>)> = vec![
        ("append-ok", Ok(AppendEntriesResponse::Success)),
        (
            "append-partial",
            Ok(AppendEntriesResponse::PartialSuccess(Some(log_id(
                2, 1, 11,
            )))),
        ),
        ("append-conflict", Ok(AppendEntriesResponse::Conflict)),
        ("append-higher", Ok(AppendEntriesResponse::HigherVote(vote))),
        ("append-err", Err("raft stopped".into())),
    ];
    for (name, a) in &answers {
        check(name, a, &frozen(RPCS, name));
    }
    let req = VoteRequest::<TypeConfig>::new(vote, Some(log_id(2, 1, 12)));
    check("vote", &req, &frozen(RPCS, "vote"));
    let resp: Result<VoteResponse<TypeConfig>, String> = Ok(VoteResponse {
        vote,
        vote_granted: true,
        last_log_id: Some(log_id(2, 1, 12)),
    });
    check("vote-ok", &resp, &frozen(RPCS, "vote-ok"));
    let meta = SnapshotMeta {
        last_log_id: Some(log_id(2, 1, 12)),
        last_membership: StoredMembership::new(Some(log_id(2, 1, 11)), membership()),
    };
    check(
        "snapshot-head",
        &(committed, meta),
        &frozen(RPCS, "snapshot-head"),
    );
}

/// `(name, hex)` of each command in [`commands`], as v0.1.0 encodes it.
const COMMANDS: &[(&str, &str)] = &[
    (
        "Sql",
        "000311435245415445205441424c4520742861290023494e5345525420494e544f20742056414c554553283f2c203f2c203f2c203f2c203f29010500010902000000000000f83f0301780402010218494e5345525420494e544f20742056414c554553283a612902010161010201",
    ),
    ("DeviceBatches", "01012a80a0bfe9d66603090807"),
    (
        "DeviceRegistry/Add",
        "0200010303030303030303030303030303030303030303030303030303030303030303",
    ),
    ("DeviceRegistry/Remove", "020101"),
    (
        "DeviceRegistry/DefineStreams",
        "0202010707636c696d6174650101740101",
    ),
    ("DeviceRegistry/ResetHighWater", "020301ac02"),
    ("DeviceRegistry/Revoke", "0204010a"),
    (
        "DeviceRegistry/Rekey",
        "02050104040404040404040404040404040404040404040404040404040404040404040c0e",
    ),
    ("DeviceRegistry/SetProtocol", "02060102"),
    ("DeviceRegistry/KeySeen", "0207010c10"),
    (
        "SqlAt",
        "03f6a1bfe9d6660311435245415445205441424c4520742861290023494e5345525420494e544f20742056414c554553283f2c203f2c203f2c203f2c203f29010500010902000000000000f83f0301780402010218494e5345525420494e544f20742056414c554553283a612902010161010201",
    ),
    ("LoadChunk", "044d802005aaaaaaaaaa01852001"),
    (
        "Streams/Define",
        "0500010707636c696d61746502017401026f6b040001",
    ),
    ("Streams/Replay", "050107012a"),
    (
        "Stamped",
        "0690a7bfe9d66600010d44454c4554452046524f4d20740000",
    ),
    ("BackupShipped", "070966696c653a2f2f2f6263aaacbfe9d666"),
    ("Export/SetSite", "080006736974652d61"),
    ("Export/Cursor", "08010270670a02f403"),
    ("Export/Forget", "0802027067"),
    (
        "Export/Retain",
        "0803ceafbfe9d66607636c696d61746580f0b252018827",
    ),
];

/// `(name, hex)` of the RPC bodies.
const RPCS: &[(&str, &str)] = &[
    (
        "append",
        "030101010201090302010a0002010b02010301020304010d31302e302e302e313a343030320d31302e302e302e313a343030310d31302e302e302e313a34303033020d31302e302e302e323a343030320d31302e302e302e323a343030310d31302e302e302e323a34303033030d31302e302e302e333a343030320d31302e302e302e333a343030310d31302e302e302e333a34303033040d31302e302e302e343a343030320d31302e302e302e343a343030310d31302e302e302e343a3430303302010c010682a0bfe9d666000311435245415445205441424c4520742861290023494e5345525420494e544f20742056414c554553283f2c203f2c203f2c203f2c203f29010500010902000000000000f83f0301780402010218494e5345525420494e544f20742056414c554553283a61290201016101020101020109",
    ),
    ("heartbeat", "0301010102010c000102010c"),
    ("append-ok", "0000"),
    ("append-partial", "00010102010b"),
    ("append-conflict", "0002"),
    ("append-higher", "0003030200"),
    ("append-err", "010c726166742073746f70706564"),
    ("vote", "0302000102010c00"),
    ("vote-ok", "00030200010102010c"),
    (
        "snapshot-head",
        "0301010102010c0102010b010301020304010d31302e302e302e313a343030320d31302e302e302e313a343030310d31302e302e302e313a34303033020d31302e302e302e323a343030320d31302e302e302e323a343030310d31302e302e302e323a34303033030d31302e302e302e333a343030320d31302e302e302e333a343030310d31302e302e302e333a34303033040d31302e302e302e343a343030320d31302e302e302e343a343030310d31302e302e302e343a3430303300",
    ),
];
