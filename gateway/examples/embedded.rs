//! Three Cairn nodes inside one process, through the embedding API (`cairn_gateway::embed`):
//! start them on loopback (the OS picks the ports, the data goes to a temporary directory),
//! write from a follower, run a transaction that rolls back, read at each consistency level,
//! and listen for committed device records.
//!
//! ```sh
//! cargo run -p cairn-gateway --example embedded
//! ```
//!
//! `tests/embedded.rs` runs this code and pushes device records at it.

use std::path::Path;
use std::time::Duration;

use cairn_gateway::db::schema::{Column, ColumnType, StreamDef};
use cairn_gateway::embed::{Level, Node, NodeConfig, Statement, StatementResult, Value};

/// Node `id`'s settings: loopback, ports chosen by the OS, data in `dir/node{id}`, and the
/// devices' stream 1 stored in the table `climate`.
pub fn config(dir: &Path, id: u64) -> NodeConfig {
    NodeConfig {
        node_id: id,
        data_dir: dir.join(format!("node{id}")),
        http_addr: "127.0.0.1:0".into(),
        raft_addr: "127.0.0.1:0".into(),
        device_addr: "127.0.0.1:0".into(),
        stream: vec![StreamDef {
            on_mismatch: Default::default(),
            id: 1,
            table: "climate".into(),
            columns: vec![Column {
                name: "temperature".into(),
                ty: ColumnType::Real,
            }],
        }],
        ..NodeConfig::default()
    }
}

/// Starts three nodes with their data under `dir`: node 1 bootstraps, nodes 2 and 3 join
/// through its HTTP API. Returns once each of them knows the leader and the three voters.
pub async fn start_cluster(dir: &Path) -> anyhow::Result<Vec<Node>> {
    let first = Node::start(NodeConfig {
        bootstrap: true,
        ..config(dir, 1)
    })
    .await?;
    let join = format!("http://{}", first.peer().http_addr);
    let mut nodes = vec![first];
    for id in [2, 3] {
        let node = Node::start(NodeConfig {
            join: Some(join.clone()),
            ..config(dir, id)
        })
        .await?;
        nodes.push(node);
    }
    for node in &nodes {
        node.wait_ready(3, Duration::from_secs(30)).await?;
    }
    Ok(nodes)
}

/// What [`demo`] saw.
#[derive(Debug)]
pub struct Seen {
    /// The rolled-back transaction's results (the second statement's says why).
    pub rolled_back: Vec<StatementResult>,
    /// `SELECT text FROM notes` at each level.
    pub reads: Vec<(Level, Vec<Vec<Value>>)>,
}

/// Writes from a follower, runs a transaction that fails, and reads at each level.
pub async fn demo(nodes: &[Node]) -> anyhow::Result<Seen> {
    let leader = nodes
        .iter()
        .find(|n| n.is_leader())
        .ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let follower = nodes
        .iter()
        .find(|n| !n.is_leader())
        .ok_or_else(|| anyhow::anyhow!("no follower"))?;

    // A write made on a follower goes to the leader and through the log like any other.
    follower
        .execute([
            Statement::from("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL)"),
            Statement::from((
                "INSERT INTO notes(text) VALUES(?)",
                vec![Value::Text("from a follower".into())],
            )),
        ])
        .await?;

    // One transaction: the second statement fails, so the first is rolled back with it.
    let rolled_back = leader
        .transaction([
            "INSERT INTO notes(text) VALUES('rolled back')",
            "INSERT INTO no_such_table VALUES(1)",
        ])
        .await?;

    // `None` reads the replica it is asked on: the leader has applied every acknowledged
    // write. The other levels go to the leader from wherever they are asked.
    let mut reads = Vec::new();
    for (node, level) in [
        (leader, Level::None),
        (follower, Level::Weak),
        (follower, Level::Linearizable),
        (follower, Level::Strong),
    ] {
        let mut r = node
            .query(["SELECT text FROM notes ORDER BY id"], level)
            .await?;
        reads.push((level, r.remove(0).values));
    }
    Ok(Seen { rolled_back, reads })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let nodes = start_cluster(dir.path()).await?;
    for n in &nodes {
        println!(
            "node {}: http {} raft {} devices {}",
            n.id(),
            n.peer().http_addr,
            n.peer().raft_addr,
            n.peer().device_addr
        );
    }

    // Devices push to any node's device port; every replica publishes what it stores.
    let mut records = nodes[2].subscribe();
    tokio::spawn(async move {
        loop {
            match records.recv().await {
                Ok(batch) => {
                    for r in batch.records() {
                        let values: Vec<String> = r.values().map(|v| v.to_string()).collect();
                        println!(
                            "device {} seq {}: {}",
                            r.device_id,
                            r.seq,
                            values.join(", ")
                        );
                    }
                }
                Err(e @ cairn_gateway::embed::FeedError::Closed) => {
                    println!("{e}");
                    return;
                }
                Err(e) => println!("{e}"),
            }
        }
    });

    let seen = demo(&nodes).await?;
    println!(
        "transaction: {}",
        seen.rolled_back[1].error.as_deref().unwrap_or("no error")
    );
    for (level, rows) in &seen.reads {
        println!("{level:?}: {rows:?}");
    }
    for n in nodes {
        n.shutdown().await;
    }
    Ok(())
}
