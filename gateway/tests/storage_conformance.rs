//! openraft's storage conformance suite against Cairn's SQLite log store and state machine.

use cairn_gateway::raft::TypeConfig;
use cairn_gateway::raft::log_store::LogStore;
use cairn_gateway::raft::state_machine::StateMachine;
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};

/// Builds stores keeping `cache` bytes of flushed entries in memory (0: every read of a
/// flushed entry goes to SQLite, which exercises eviction and the disk path).
struct SqliteBuilder {
    cache: usize,
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for SqliteBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log =
            LogStore::open_with_cache(&dir.path().join("raft.db"), self.cache).expect("open log");
        let sm = StateMachine::open(&dir.path().join("sm"), Default::default())
            .expect("open state machine");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_openraft_storage_suite() {
    Suite::test_all(SqliteBuilder {
        cache: cairn_gateway::raft::log_store::CACHE_BYTES,
    })
    .await
    .expect("conformance suite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_openraft_storage_suite_without_entry_cache() {
    Suite::test_all(SqliteBuilder { cache: 0 })
        .await
        .expect("conformance suite, cache 0");
}
