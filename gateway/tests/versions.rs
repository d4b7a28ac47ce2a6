//! Format versions at the storage level (`gateway/src/version.rs`): the node-local
//! `raft.db` migrates on open and refuses a newer one; the state machine stops before an
//! entry of a newer version (never misapplies it, never fails openraft, which would exit into
//! a crash loop) and applies the active-version entry with its migration.

use std::sync::Arc;
use std::time::Duration;

use cairn_gateway::command::Command;
use cairn_gateway::metrics::Metrics;
use cairn_gateway::raft::log_store::LogStore;
use cairn_gateway::raft::state_machine::StateMachine;
use cairn_gateway::raft::{Entry, TypeConfig};
use cairn_gateway::version::SUPPORTED;
use openraft::EntryPayload;
use openraft::storage::RaftStateMachine;

fn entry(index: u64, cmd: Command) -> Entry {
    Entry {
        log_id: openraft::testing::log_id::<TypeConfig>(1, 1, index),
        payload: EntryPayload::Normal(cmd),
    }
}

fn stamp_of(path: &std::path::Path) -> Option<Vec<u8>> {
    let c = rusqlite::Connection::open(path).unwrap();
    c.query_row(
        "SELECT value FROM meta WHERE key = 'format_version'",
        [],
        |r| r.get(0),
    )
    .ok()
}

#[test]
fn test_raft_db_migrates_from_version_1_and_refuses_a_newer_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.db");
    // A version 1 log: v0.1.0's schema, no stamp.
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE log (idx INTEGER PRIMARY KEY, log_id BLOB NOT NULL, entry BLOB NOT NULL);
             CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);",
        )
        .unwrap();
    }
    assert_eq!(stamp_of(&path), None);
    drop(LogStore::open(&path).unwrap());
    assert_eq!(stamp_of(&path), Some(SUPPORTED.to_string().into_bytes()));
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute(
            "UPDATE meta SET value = CAST(?1 AS BLOB) WHERE key = 'format_version'",
            [(SUPPORTED + 1).to_string()],
        )
        .unwrap();
    }
    let err = LogStore::open(&path)
        .err()
        .expect("a newer raft.db is refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!("format version {}", SUPPORTED + 1))
            && msg.contains(&format!("supports up to format version {SUPPORTED}")),
        "{msg}"
    );
    assert_eq!(
        stamp_of(&path),
        Some((SUPPORTED + 1).to_string().into_bytes()),
        "left as it was"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_state_machine_holds_an_entry_of_a_newer_version_and_applies_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::default());
    let mut sm = StateMachine::open(dir.path(), metrics.clone()).unwrap();
    sm.apply(futures_util::stream::iter([Ok((
        entry(1, Command::ActivateVersion(SUPPORTED).stamped(1_000)),
        None,
    ))]))
    .await
    .unwrap();
    assert_eq!(metrics.versions.active(), SUPPORTED);
    assert!(metrics.versions.blocked().is_none());

    // The next entry needs a newer binary: apply waits (it neither errors nor skips it).
    let newer = entry(2, Command::ActivateVersion(SUPPORTED + 1));
    let mut held = sm.clone();
    let waited = tokio::time::timeout(
        Duration::from_secs(3),
        held.apply(futures_util::stream::iter([Ok((newer, None))])),
    )
    .await;
    assert!(waited.is_err(), "apply must hold the entry, not return");
    let why = metrics
        .versions
        .blocked()
        .expect("the node reports why it stopped");
    assert!(
        why.contains(&format!("needs cluster format version {}", SUPPORTED + 1)),
        "{why}"
    );
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(1), "nothing past it applied");
    assert_eq!(metrics.versions.active(), SUPPORTED);

    // The database recorded the active version and version 2's migration at index 1.
    let c = rusqlite::Connection::open(dir.path().join("db.sqlite")).unwrap();
    let rows: Vec<(u32, i64)> = c
        .prepare("SELECT version, log_index FROM _cairn_migrations")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows, vec![(2, 1)]);
}
