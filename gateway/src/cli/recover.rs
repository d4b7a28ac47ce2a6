//! `cairn recover --data-dir DIR --members ID=RAFTADDR,... [--node-id N]`: see
//! `raft::recover`. The node must be stopped.

use std::path::Path;
use std::time::Duration;

use crate::raft::recover::{parse_members, recover};

/// Refuses when the node in `data_dir` seems to run: its Raft address (`addrs.json`) answers.
fn ensure_stopped(data_dir: &Path) -> anyhow::Result<()> {
    let Ok(b) = std::fs::read(data_dir.join("addrs.json")) else {
        return Ok(());
    };
    let Ok(addrs) = serde_json::from_slice::<crate::daemon::BoundAddrs>(&b) else {
        return Ok(());
    };
    let Ok(addr) = addrs.raft_addr.parse::<std::net::SocketAddr>() else {
        return Ok(());
    };
    if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok() {
        anyhow::bail!(
            "something answers on this node's Raft address {addr}: stop the node before `cairn \
             recover` (it changes the node's log)"
        );
    }
    Ok(())
}

pub fn run(data_dir: &Path, members: &str, node_id: Option<u64>) -> anyhow::Result<()> {
    let members = parse_members(members)?;
    anyhow::ensure!(!members.is_empty(), "--members names no node");
    ensure_stopped(data_dir)?;
    let r = super::runtime()?.block_on(recover(data_dir, node_id, &members))?;
    let kept = r.kept.map(|l| l.index).unwrap_or(0);
    println!("recovered {r}");
    println!("last log index kept: {kept}");
    println!(
        "records acknowledged only by the lost nodes are gone; devices continue from the \
         high-water marks this log holds. Start the node as before, then join blank gateways \
         to it with --join."
    );
    Ok(())
}
