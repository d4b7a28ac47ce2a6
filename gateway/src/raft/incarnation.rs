//! Incarnations on Raft RPCs: a node that lost its disk cannot vote.
//!
//! A node's incarnation is a random `u64` its Raft log stores with its first vote
//! ([`log_store::Incarnation`]); the leader records each member's before adding it
//! (`Command::Members`, `_cairn_members`). Every Raft RPC (`/raft/*` except `ping`) carries two
//! headers, so the postcard bodies stay those of releases without incarnations:
//!
//! | header | value |
//! |---|---|
//! | [`FROM`] `cairn-incarnation-from` | `SENDER_ID:INCARNATION` |
//! | [`TO`] `cairn-incarnation-to` | `RECEIVER_ID:INCARNATION`, or `RECEIVER_ID:none` when the sender has no record of it |
//!
//! The receiver ([`guard`]) answers `409 Conflict` (and nothing else) when the request is not
//! meant for it: another node id, another incarnation than its own, or a sender whose recorded
//! incarnation differs from the one it names (a replaced node come back). A *blank* node (its
//! log holds no vote: a new node, or one whose disk was wiped) refuses a request naming
//! another incarnation than its candidate, i.e. one meant for the life a wiped node forgot; so
//! a wiped node restarted under its old id answers nothing, and says in its log that it must
//! be started with `--replace ID`. A request that names no incarnation for it (`ID:none`: the
//! sender has none recorded) is served: the founders of a `--bootstrap-expect` cluster start
//! that way, and so does every member until it has recorded its own (a second after the
//! cluster's members all run a release with incarnations; a disk lost within that window is
//! not caught).
//!
//! Requests without the headers come from a release without incarnations (a rolling upgrade)
//! and are accepted, until every member of this node's membership has a recorded incarnation:
//! from then on the check is strict and they are refused too.
//!
//! [`log_store::Incarnation`]: super::log_store::Incarnation

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::StatusCode;

use super::log_store::Incarnation;
use super::{NodeId, Raft};
use crate::db::Store;
use crate::metrics::Metrics;

/// The sender's `ID:INCARNATION`.
pub const FROM: &str = "cairn-incarnation-from";
/// The receiver the sender means: `ID:INCARNATION` or `ID:none`.
pub const TO: &str = "cairn-incarnation-to";

/// A cached copy of the recorded incarnations is read again after this long even when no
/// `Command::Members` was applied here (a snapshot installed one).
const CACHE_TTL: Duration = Duration::from_secs(1);

/// This node's incarnation and the members' recorded ones, for both halves of the transport.
pub struct Incarnations {
    id: NodeId,
    own: Arc<Incarnation>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    cache: Mutex<Option<Cached>>,
    /// A read of the table is under way on a blocking thread.
    refreshing: std::sync::atomic::AtomicBool,
    /// When the blank-node message was last logged (once per 10 s at most).
    logged: Mutex<Option<Instant>>,
}

struct Cached {
    generation: u64,
    at: Instant,
    map: Arc<BTreeMap<NodeId, u64>>,
}

impl Incarnations {
    pub fn new(
        id: NodeId,
        own: Arc<Incarnation>,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Incarnations {
            id,
            own,
            store,
            metrics,
            cache: Mutex::new(None),
            refreshing: false.into(),
            logged: Mutex::new(None),
        })
    }

    /// This node's incarnation (the candidate while blank).
    pub fn own(&self) -> u64 {
        self.own.value()
    }

    /// True while this node's log holds no vote.
    pub fn is_blank(&self) -> bool {
        self.own.is_blank()
    }

    /// The recorded incarnations by node id, as this replica has applied them, from the cache:
    /// never waits (the Raft RPC paths call it). A stale cache (a `Command::Members` applied
    /// since, or older than [`CACHE_TTL`]) is answered as it is and read again on a blocking
    /// thread (the database's readers wait during a snapshot install).
    pub fn recorded(self: &Arc<Self>) -> Arc<BTreeMap<NodeId, u64>> {
        let generation = self.metrics.members_changed.load(Ordering::Acquire);
        let (map, fresh) = {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            match cache.as_ref() {
                Some(c) => (
                    c.map.clone(),
                    c.generation == generation && c.at.elapsed() < CACHE_TTL,
                ),
                None => (Arc::default(), false),
            }
        };
        if !fresh && !self.refreshing.swap(true, Ordering::AcqRel) {
            let me = self.clone();
            tokio::task::spawn_blocking(move || {
                me.reload();
                me.refreshing.store(false, Ordering::Release);
            });
        }
        map
    }

    /// Reads the recorded incarnations from the database now (on a blocking thread), for
    /// decisions that must see the latest applied ones (joins, replacements, leaving).
    pub async fn recorded_now(self: &Arc<Self>) -> Arc<BTreeMap<NodeId, u64>> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.reload())
            .await
            .unwrap_or_default()
    }

    /// The recorded incarnation of `id`, read now ([`Self::recorded_now`]).
    pub async fn of_now(self: &Arc<Self>, id: NodeId) -> Option<u64> {
        self.recorded_now().await.get(&id).copied()
    }

    /// Reads the table and caches it (the old copy stays on a read error).
    fn reload(&self) -> Arc<BTreeMap<NodeId, u64>> {
        let generation = self.metrics.members_changed.load(Ordering::Acquire);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let map = match self.store.read(crate::command::members::incarnations) {
            Ok(Ok(m)) => Arc::new(m),
            Ok(Err(e)) | Err(e) => {
                tracing::warn!("reading the members' incarnations: {e}");
                return cache.as_ref().map(|c| c.map.clone()).unwrap_or_default();
            }
        };
        *cache = Some(Cached {
            generation,
            at: Instant::now(),
            map: map.clone(),
        });
        map
    }

    /// The recorded incarnation of `id`, from the cache ([`Self::recorded`]).
    pub fn of(self: &Arc<Self>, id: NodeId) -> Option<u64> {
        self.recorded().get(&id).copied()
    }

    /// The two headers of an RPC from this node to `target`.
    pub fn headers(self: &Arc<Self>, target: NodeId) -> [(&'static str, String); 2] {
        let to = match self.of(target) {
            Some(i) => format!("{target}:{i}"),
            None => format!("{target}:none"),
        };
        [(FROM, format!("{}:{}", self.id, self.own())), (TO, to)]
    }

    /// Logs (at most every 10 s) that this blank node refuses RPCs meant for its old life.
    fn log_blank(&self, why: &str) {
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if logged.is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
            return;
        }
        *logged = Some(Instant::now());
        tracing::error!(
            "refusing Raft RPCs: {why}. This node's Raft log is blank (it holds no vote: its disk \
             was wiped or replaced), and a node that forgot its votes must not vote again under \
             its old id. To put it back in the cluster, stop it and start it with --join \
             <a member's HTTP URL> --replace {id} (node {id} is removed, then joins again as a \
             new node); after a lost majority see `cairn recover`",
            id = self.id
        );
    }
}

/// Parses `ID:INCARNATION` (`none` for an unknown incarnation).
fn parse(v: &str) -> Option<(NodeId, Option<u64>)> {
    let (id, inc) = v.split_once(':')?;
    let id = id.trim().parse().ok()?;
    let inc = match inc.trim() {
        "none" => None,
        s => Some(s.parse().ok()?),
    };
    Some((id, inc))
}

/// What a receiver knows when it judges a request.
#[derive(Debug, Clone, Copy)]
pub struct Receiver {
    pub id: NodeId,
    pub own: u64,
    pub blank: bool,
    /// Every member of this node's membership has a recorded incarnation.
    pub strict: bool,
}

/// The two headers of a request, parsed (`None`: absent or unreadable).
#[derive(Debug, Clone, Copy)]
pub struct Named {
    pub from: (NodeId, Option<u64>),
    pub to: (NodeId, Option<u64>),
}

/// Why a request is refused (`None`: it is served). `recorded_from` is this replica's record
/// of the sender's incarnation. The `bool` says the refusal is the blank-node case.
pub fn judge(
    me: Receiver,
    named: Option<Named>,
    recorded_from: impl Fn(NodeId) -> Option<u64>,
) -> Option<(String, bool)> {
    let Some(n) = named else {
        // A release without incarnations, or something else: strict once every member has one.
        return me.strict.then(|| {
            (
                "a Raft RPC without incarnation headers, and every member has an incarnation"
                    .to_string(),
                false,
            )
        });
    };
    let (to_id, to_inc) = n.to;
    if to_id != me.id {
        return Some((
            format!(
                "the request is meant for node {to_id}, this is node {}",
                me.id
            ),
            false,
        ));
    }
    if let Some(i) = to_inc
        && i != me.own
    {
        return Some((
            format!(
                "node {} expects incarnation {i} of node {}, this node's is {}{}",
                n.from.0,
                me.id,
                me.own,
                if me.blank { " (not stored yet)" } else { "" }
            ),
            me.blank,
        ));
    }
    let (from_id, from_inc) = n.from;
    if let (Some(rec), Some(got)) = (recorded_from(from_id), from_inc)
        && rec != got
    {
        return Some((
            format!(
                "node {from_id} sends as incarnation {got}, the cluster records {rec}: it was \
                 replaced"
            ),
            false,
        ));
    }
    None
}

/// The state [`guard`] needs.
#[derive(Clone)]
pub struct Guard {
    pub incarnations: Arc<Incarnations>,
    pub raft: Raft,
}

/// Why a request with `headers` is refused, if it is, and whether this node is blank then.
fn verdict(g: &Guard, headers: &hyper::HeaderMap) -> Option<(String, bool)> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(parse)
    };
    let named = match (header(FROM), header(TO)) {
        (Some(from), Some(to)) => Some(Named { from, to }),
        _ => None,
    };
    let inc = &g.incarnations;
    let recorded = inc.recorded();
    let strict = named.is_none() && {
        let m = openraft::async_runtime::WatchReceiver::borrow_watched(&g.raft.metrics())
            .membership_config
            .clone();
        let ids: Vec<NodeId> = m.membership().nodes().map(|(id, _)| *id).collect();
        !ids.is_empty() && ids.iter().all(|id| recorded.contains_key(id))
    };
    let me = Receiver {
        id: inc.id,
        own: inc.own(),
        blank: inc.is_blank(),
        strict,
    };
    judge(me, named, |id| recorded.get(&id).copied())
}

/// Middleware on the Raft routes: refuses (`409`) every `/raft/*` request (not `ping`) that is
/// not meant for this node's incarnation (see the module doc).
pub async fn guard(State(g): State<Guard>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if !path.starts_with("/raft/") || path == "/raft/ping" {
        return next.run(req).await;
    }
    let Some((why, blank)) = verdict(&g, req.headers()) else {
        return next.run(req).await;
    };
    let inc = &g.incarnations;
    let hint = if blank {
        inc.log_blank(&why);
        format!(
            "; node {} is blank: start it with --replace {}",
            inc.id, inc.id
        )
    } else {
        tracing::warn!("refusing a Raft RPC ({path}): {why}");
        String::new()
    };
    (
        StatusCode::CONFLICT,
        format!("incarnation mismatch: {why}{hint}"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Receiver = Receiver {
        id: 3,
        own: 77,
        blank: false,
        strict: false,
    };

    fn named(to: Option<u64>) -> Option<Named> {
        Some(Named {
            from: (1, Some(11)),
            to: (3, to),
        })
    }

    #[test]
    fn test_parse_headers() {
        assert_eq!(parse("3:18446744073709551615"), Some((3, Some(u64::MAX))));
        assert_eq!(parse("3:none"), Some((3, None)));
        assert_eq!(parse("3"), None);
        assert_eq!(parse("x:1"), None);
    }

    #[test]
    fn test_judge() {
        let rec = |id| (id == 1).then_some(11);
        assert!(
            judge(ME, named(Some(77)), rec).is_none(),
            "its own incarnation"
        );
        assert!(judge(ME, named(None), rec).is_none(), "sender behind");
        assert!(judge(ME, None, rec).is_none(), "an older release");
        let strict = Receiver { strict: true, ..ME };
        assert!(
            judge(strict, None, rec).is_some(),
            "strict once all have one"
        );
        let (why, blank) = judge(ME, named(Some(78)), rec).unwrap();
        assert!(why.contains("expects incarnation 78") && !blank, "{why}");
        let other = Some(Named {
            from: (1, Some(11)),
            to: (2, Some(77)),
        });
        assert!(judge(ME, other, rec).is_some(), "meant for another node");
        let replaced = Some(Named {
            from: (1, Some(12)),
            to: (3, Some(77)),
        });
        assert!(judge(ME, replaced, rec).unwrap().0.contains("replaced"));
        // A wiped node: it refuses its old life's incarnation, and accepts the candidate a
        // leader recorded at its join and a sender that has none recorded (founders).
        let blank = Receiver { blank: true, ..ME };
        assert!(judge(blank, named(Some(5)), rec).unwrap().1);
        assert!(judge(blank, named(None), rec).is_none());
        assert!(judge(blank, named(Some(77)), rec).is_none());
    }
}
