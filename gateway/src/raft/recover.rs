//! Recovery from a lost majority: `cairn recover --data-dir DIR --members ID=RAFTADDR,...` on a
//! stopped surviving node, and rqlite's `peers.json` in the data dir (read at start, then
//! renamed to `peers.json.applied` so it applies once): one code path, [`recover`].
//!
//! It forces a new membership on the node's own log through the log store's own interface, as
//! rqlite's `peers.json` and dqlite's `ReconfigureMembership` do: the vote moves to a term
//! above every term in the log (for this node, not granted by anyone), and two entries of that
//! term are appended after the last one it holds: the membership (`members`), then
//! `Command::Members(Recovered)`, which starts a new history epoch and a new epoch for every
//! device on each replica that applies it. Nothing the log holds is dropped; what only the
//! lost nodes held is gone. When the node starts it elects itself with the new membership's
//! quorum (the survivors listed), commits both entries, and blank gateways then join it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, bail, ensure};
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{EntryPayload, RaftLogReader};

use super::log_store::LogStore;
use super::{Entry, LogId, NodeId, Peer, StoredMembership, TypeConfig, Vote};
use crate::command::Command;
use crate::command::members::MembersCommand;

/// The file form of `cairn recover`, rqlite's format.
pub const PEERS_JSON: &str = "peers.json";

/// One member of the forced membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: NodeId,
    pub raft_addr: String,
    /// `false`: a learner (rqlite's `non_voter`).
    pub voter: bool,
}

/// Parses `--members ID=RAFTADDR,...` (all voters).
pub fn parse_members(s: &str) -> anyhow::Result<Vec<Member>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (id, addr) = p
                .trim()
                .split_once('=')
                .with_context(|| format!("--members: {p:?} is not ID=RAFTADDR"))?;
            Ok(Member {
                id: id
                    .trim()
                    .parse()
                    .with_context(|| format!("--members: node id {id:?}"))?,
                raft_addr: addr.trim().to_string(),
                voter: true,
            })
        })
        .collect()
}

#[derive(serde::Deserialize)]
struct PeerJson {
    id: serde_json::Value,
    address: String,
    #[serde(default)]
    non_voter: bool,
}

/// Parses rqlite's `peers.json`: `[{"id": "1", "address": "host:port", "non_voter": false}]`.
/// Cairn's node ids are numbers; a string id must hold one.
pub fn parse_peers_json(b: &[u8]) -> anyhow::Result<Vec<Member>> {
    let peers: Vec<PeerJson> = serde_json::from_slice(b).context("peers.json")?;
    peers
        .into_iter()
        .map(|p| {
            let id = match &p.id {
                serde_json::Value::Number(n) => n.as_u64(),
                serde_json::Value::String(s) => s.parse().ok(),
                _ => None,
            }
            .with_context(|| {
                format!("peers.json: id {} is not a Cairn node id (a number)", p.id)
            })?;
            Ok(Member {
                id,
                raft_addr: p.address,
                voter: !p.non_voter,
            })
        })
        .collect()
}

/// What a recovery did.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// This node's id.
    pub id: NodeId,
    /// The last log entry kept (everything after it existed only on the lost nodes).
    pub kept: Option<LogId>,
    /// The term of the new entries.
    pub term: u64,
    /// Index of the forced membership entry (the `Recovered` entry follows it).
    pub membership_index: u64,
}

impl std::fmt::Display for Recovered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (index, term) = self
            .kept
            .map(|l| (l.index, l.leader_id.term))
            .unwrap_or((0, 0));
        write!(
            f,
            "node {}: kept the Raft log through index {index} (term {term}); new membership at \
             index {} (term {}), a new history epoch from index {}",
            self.id,
            self.membership_index,
            self.term,
            self.membership_index + 1
        )
    }
}

/// The membership this node knows last: the newest of the log's membership entries and the
/// one its database applied.
async fn last_membership(
    store: &mut LogStore,
    data_dir: &Path,
    from: u64,
    to: u64,
) -> anyhow::Result<StoredMembership> {
    let mut best = StoredMembership::default();
    let db = data_dir.join("sm").join("db.sqlite");
    if db.exists() {
        let conn =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        best = super::state_machine::read_applied(&conn)?.1;
    }
    let mut at = from;
    while at <= to {
        let end = (at + 256).min(to + 1);
        for e in store.try_get_log_entries(at..end).await? {
            if let EntryPayload::Membership(m) = &e.payload
                && Some(e.log_id) > *best.log_id()
            {
                best = StoredMembership::new(Some(e.log_id), m.clone());
            }
        }
        at = end;
    }
    Ok(best)
}

/// This node's id: `id`, or the member of `known` whose Raft address is the one in the data
/// dir's `addrs.json`.
fn own_id(data_dir: &Path, id: Option<NodeId>, known: &StoredMembership) -> anyhow::Result<NodeId> {
    if let Some(id) = id {
        return Ok(id);
    }
    #[derive(serde::Deserialize)]
    struct Addrs {
        raft_addr: String,
    }
    let addrs: Addrs = serde_json::from_slice(
        &std::fs::read(data_dir.join("addrs.json")).context("addrs.json (or pass --node-id)")?,
    )?;
    let found: Vec<NodeId> = known
        .membership()
        .nodes()
        .filter(|(_, p)| p.raft_addr == addrs.raft_addr)
        .map(|(id, _)| *id)
        .collect();
    match found[..] {
        [id] => Ok(id),
        _ => bail!(
            "cannot tell this node's id from {} (Raft address {}): pass --node-id",
            data_dir.display(),
            addrs.raft_addr
        ),
    }
}

/// Forces `members` on the stopped node in `data_dir` (see the module doc). `id` is this
/// node's id (found from `addrs.json` when `None`); it must be a voter of `members`.
pub async fn recover(
    data_dir: &Path,
    id: Option<NodeId>,
    members: &[Member],
) -> anyhow::Result<Recovered> {
    let log_path = data_dir.join("raft.db");
    ensure!(
        log_path.exists(),
        "{} holds no Raft log (raft.db): recover runs on a surviving node's data dir",
        data_dir.display()
    );
    let mut store = LogStore::open(&log_path)?;
    let state = store.get_log_state().await?;
    let kept = state.last_log_id;
    let from = state.last_purged_log_id.map(|l| l.index + 1).unwrap_or(0);
    let to = kept.map(|l| l.index).unwrap_or(0);
    let known = last_membership(&mut store, data_dir, from, to).await?;
    let id = own_id(data_dir, id, &known)?;

    let ids: BTreeSet<NodeId> = members.iter().map(|m| m.id).collect();
    ensure!(
        ids.len() == members.len(),
        "--members names a node id twice"
    );
    ensure!(
        members.iter().any(|m| m.id == id && m.voter),
        "this node (id {id}) must be a voter of the new membership"
    );
    let voters: BTreeSet<NodeId> = members.iter().filter(|m| m.voter).map(|m| m.id).collect();
    let nodes: BTreeMap<NodeId, Peer> = members
        .iter()
        .map(|m| {
            // Addresses other than Raft's come from the membership this node knew; a node
            // new to it brings its own when it joins.
            let old = known
                .membership()
                .get_node(&m.id)
                .cloned()
                .unwrap_or_default();
            (
                m.id,
                Peer {
                    raft_addr: m.raft_addr.clone(),
                    ..old
                },
            )
        })
        .collect();
    let membership = openraft::Membership::new(vec![voters], nodes)
        .map_err(|e| anyhow::anyhow!("the new membership: {e}"))?;

    let mut reader = store.clone();
    let old_vote = reader.read_vote().await?;
    let term = old_vote
        .map(|v| v.leader_id.term)
        .unwrap_or(0)
        .max(kept.map(|l| l.leader_id.term).unwrap_or(0))
        + 1;
    let leader = openraft::impls::leader_id_adv::LeaderId { term, node_id: id };
    let index = kept.map(|l| l.index + 1).unwrap_or(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let stamp = now.max(
        store
            .stamp_floor()
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    let entries = vec![
        Entry {
            log_id: LogId::new(leader, index),
            payload: EntryPayload::Membership(membership),
        },
        Entry {
            log_id: LogId::new(leader, index + 1),
            payload: EntryPayload::Normal(
                Command::Members(MembersCommand::Recovered {
                    kept_index: to,
                    members: ids.into_iter().collect(),
                })
                .stamped(stamp),
            ),
        },
    ];
    store.save_vote(&Vote::new(term, id)).await?;
    let (tx, rx) = <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot();
    store.append(entries, IOFlushed::signal(tx)).await?;
    rx.await
        .map_err(|_| anyhow::anyhow!("raft log writer stopped"))??;
    Ok(Recovered {
        id,
        kept,
        term,
        membership_index: index,
    })
}

/// Applies `DATA_DIR/peers.json` if there is one (then renames it to `peers.json.applied`):
/// called at start, before the log is opened.
pub async fn peers_json_at_start(data_dir: &Path, id: NodeId) -> anyhow::Result<Option<Recovered>> {
    let path = data_dir.join(PEERS_JSON);
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(None);
    };
    let members = parse_peers_json(&bytes)?;
    let r = recover(data_dir, Some(id), &members).await?;
    std::fs::rename(&path, data_dir.join("peers.json.applied"))?;
    tracing::warn!("{PEERS_JSON} applied: {r}");
    Ok(Some(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse() {
        assert_eq!(
            parse_members("3=127.0.0.1:4002, 4=h:1").unwrap(),
            vec![
                Member {
                    id: 3,
                    raft_addr: "127.0.0.1:4002".into(),
                    voter: true
                },
                Member {
                    id: 4,
                    raft_addr: "h:1".into(),
                    voter: true
                }
            ]
        );
        assert!(parse_members("3:127.0.0.1:4002").is_err());
        let p = parse_peers_json(
            br#"[{"id":"1","address":"a:1","non_voter":false},{"id":2,"address":"b:2","non_voter":true}]"#,
        )
        .unwrap();
        assert_eq!(p.len(), 2);
        assert!(p[0].voter && !p[1].voter && p[1].id == 2);
        assert!(parse_peers_json(br#"[{"id":"node-a","address":"a:1"}]"#).is_err());
    }

    fn peer(n: u64) -> Peer {
        Peer {
            raft_addr: format!("10.0.0.{n}:4002"),
            http_addr: format!("10.0.0.{n}:4001"),
            device_addr: format!("10.0.0.{n}:4003"),
        }
    }

    /// A survivor's log of a three-node cluster: recover forces {1} (then {1, 4} through
    /// peers.json) with a raised vote, keeps every entry, and appends the membership and the
    /// `Recovered` entry in the new term.
    #[tokio::test]
    async fn test_recover_forces_membership() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.db");
        let mut store = LogStore::open(&path).unwrap();
        let leader = |term| openraft::impls::leader_id_adv::LeaderId { term, node_id: 2 };
        let three = openraft::Membership::new(
            vec![BTreeSet::from([1, 2, 3])],
            BTreeMap::from([(1, peer(1)), (2, peer(2)), (3, peer(3))]),
        )
        .unwrap();
        let mut entries = vec![Entry {
            log_id: LogId::new(leader(4), 1),
            payload: EntryPayload::Membership(three),
        }];
        for i in 2..=7 {
            entries.push(Entry {
                log_id: LogId::new(leader(4), i),
                payload: EntryPayload::Blank,
            });
        }
        let (tx, rx) = <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot();
        store.append(entries, IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
        store.save_vote(&Vote::new_committed(5, 2)).await.unwrap();
        let incarnation = store.incarnation().value();
        drop(store);

        // Not a member of the new membership: refused, nothing written.
        let err = recover(
            dir.path(),
            Some(2),
            &parse_members("1=10.0.0.1:4002").unwrap(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("must be a voter"), "{err}");

        let r = recover(
            dir.path(),
            Some(1),
            &parse_members("1=10.0.0.9:4002").unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(r.kept.map(|l| l.index), Some(7));
        assert_eq!((r.term, r.membership_index), (6, 8));
        assert!(r.to_string().contains("through index 7"), "{r}");

        let mut store = LogStore::open(&path).unwrap();
        assert_eq!(store.incarnation().value(), incarnation, "the same life");
        let vote = store.read_vote().await.unwrap().unwrap();
        assert_eq!(vote.leader_id.term, 6);
        let got = store.try_get_log_entries(1..=9).await.unwrap();
        assert_eq!(got.len(), 9, "nothing dropped");
        let EntryPayload::Membership(m) = &got[7].payload else {
            panic!("{:?}", got[7]);
        };
        assert_eq!(m.voter_ids().collect::<Vec<_>>(), vec![1]);
        let node = m.get_node(&1).unwrap();
        assert_eq!(node.raft_addr, "10.0.0.9:4002");
        assert_eq!(node.http_addr, "10.0.0.1:4001", "other addresses as known");
        let EntryPayload::Normal(c) = &got[8].payload else {
            panic!("{:?}", got[8]);
        };
        assert!(c.entry_stamp_ms().is_some());
        let Command::Members(rec) = c.unstamped() else {
            panic!("{c}");
        };
        assert_eq!(
            rec,
            &MembersCommand::Recovered {
                kept_index: 7,
                members: vec![1]
            }
        );
        drop(store);

        // peers.json: the same path, applied once.
        std::fs::write(
            dir.path().join(PEERS_JSON),
            br#"[{"id":"1","address":"10.0.0.9:4002","non_voter":false},
                 {"id":"4","address":"10.0.0.4:4002","non_voter":true}]"#,
        )
        .unwrap();
        let r = peers_json_at_start(dir.path(), 1).await.unwrap().unwrap();
        assert_eq!((r.kept.map(|l| l.index), r.term), (Some(9), 7));
        assert!(!dir.path().join(PEERS_JSON).exists());
        assert!(dir.path().join("peers.json.applied").exists());
        assert!(peers_json_at_start(dir.path(), 1).await.unwrap().is_none());
        let mut store = LogStore::open(&path).unwrap();
        let got = store.try_get_log_entries(10..=10).await.unwrap();
        let EntryPayload::Membership(m) = &got[0].payload else {
            panic!("{:?}", got[0]);
        };
        assert_eq!(m.voter_ids().collect::<Vec<_>>(), vec![1]);
        assert_eq!(m.learner_ids().collect::<Vec<_>>(), vec![4]);
    }
}
