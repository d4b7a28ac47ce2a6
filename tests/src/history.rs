//! What the clients did during a fault run, recorded for the checkers.
//!
//! - [`Recorder`] collects register operations ([`Op`]) from many client threads with times
//!   taken from one monotonic epoch, for the linearizability checker.
//! - [`Ledger`] tracks append-only records (unique tokens inserted into a table without a
//!   unique constraint): which were acknowledged, which ended indeterminate, which failed.
//!   [`Ledger::audit`] compares it with what a replica stored: an acknowledged token missing
//!   is *lost*, a token stored more than once is *duplicated*, a stored token nobody pushed
//!   is *phantom*.
//! - [`Run`] is the whole record of one schedule (seed, faults, operations, ledger) as JSON,
//!   written next to a failure so it can be checked again offline.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::linearizability::{Call, Op, Ret};

/// Shared, thread-safe log of register operations.
#[derive(Clone)]
pub struct Recorder {
    epoch: Instant,
    ops: Arc<Mutex<Vec<Op>>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

/// An operation that has been invoked and not yet completed.
pub struct Pending {
    process: u32,
    key: String,
    call: Call,
    invoke_ns: u64,
}

impl Recorder {
    pub fn new() -> Self {
        Recorder {
            epoch: Instant::now(),
            ops: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Call just before sending the request.
    pub fn invoke(&self, process: u32, key: &str, call: Call) -> Pending {
        Pending {
            process,
            key: key.to_string(),
            call,
            invoke_ns: self.now_ns(),
        }
    }

    /// Call as soon as the answer (or the failure) is known.
    pub fn complete(&self, p: Pending, ret: Ret) {
        let complete_ns = match ret {
            Ret::Indeterminate => None,
            _ => Some(self.now_ns()),
        };
        self.ops.lock().expect("recorder lock").push(Op {
            process: p.process,
            key: p.key,
            call: p.call,
            ret,
            invoke_ns: p.invoke_ns,
            complete_ns,
        });
    }

    pub fn ops(&self) -> Vec<Op> {
        let mut v = self.ops.lock().expect("recorder lock").clone();
        v.sort_by_key(|o| o.invoke_ns);
        v
    }
}

/// The fate of one pushed record as its client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fate {
    Acked,
    Indeterminate,
    Failed,
}

/// Records pushed by the clients, keyed by token.
#[derive(Clone, Default)]
pub struct Ledger {
    tokens: Arc<Mutex<BTreeMap<String, Fate>>>,
}

/// The outcome of comparing a replica's contents with the ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    pub acked: u64,
    pub lost: Vec<String>,
    pub duplicated: Vec<String>,
    pub phantom: Vec<String>,
}

impl Audit {
    pub fn is_clean(&self) -> bool {
        self.lost.is_empty() && self.duplicated.is_empty() && self.phantom.is_empty()
    }
}

impl Ledger {
    pub fn record(&self, token: &str, fate: Fate) {
        self.tokens
            .lock()
            .expect("ledger lock")
            .insert(token.to_string(), fate);
    }

    pub fn entries(&self) -> BTreeMap<String, Fate> {
        self.tokens.lock().expect("ledger lock").clone()
    }

    pub fn acked(&self) -> u64 {
        self.entries()
            .values()
            .filter(|f| **f == Fate::Acked)
            .count() as u64
    }

    /// `stored` is every token one replica holds, with repeats as stored.
    pub fn audit(&self, stored: &[String]) -> Audit {
        audit(&self.entries(), stored)
    }
}

/// See [`Ledger::audit`]. A failed push that shows up stored counts as phantom: the client
/// was told it had no effect.
pub fn audit(pushed: &BTreeMap<String, Fate>, stored: &[String]) -> Audit {
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    for t in stored {
        *counts.entry(t).or_default() += 1;
    }
    let mut a = Audit::default();
    for (token, fate) in pushed {
        let n = counts.get(token.as_str()).copied().unwrap_or(0);
        if *fate == Fate::Acked {
            a.acked += 1;
            if n == 0 {
                a.lost.push(token.clone());
            }
        }
        if n > 1 {
            a.duplicated.push(token.clone());
        }
        if *fate == Fate::Failed && n > 0 {
            a.phantom.push(token.clone());
        }
    }
    for token in counts.keys() {
        if !pushed.contains_key(*token) {
            a.phantom.push(token.to_string());
        }
    }
    a
}

/// Everything needed to look at one schedule again: `cargo xtask faults --check FILE`
/// re-runs the checkers on it; `--seed` re-runs the schedule itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub seed: u64,
    pub schedule: Vec<String>,
    pub ops: Vec<Op>,
    pub pushed: BTreeMap<String, Fate>,
    /// Tokens each replica stored (node id → tokens).
    pub stored: BTreeMap<u64, Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_recorder_orders_and_times() {
        let r = Recorder::new();
        let a = r.invoke(1, "k", Call::Write(1));
        let b = r.invoke(2, "k", Call::Read);
        r.complete(b, Ret::Read(None));
        r.complete(a, Ret::Indeterminate);
        let ops = r.ops();
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0].process, 1);
        assert_eq!(ops[0].complete_ns, None);
        assert!(ops[1].complete_ns.unwrap() >= ops[1].invoke_ns);
    }

    #[test]
    fn test_audit_finds_lost_duplicated_phantom() {
        let l = Ledger::default();
        l.record("a", Fate::Acked);
        l.record("b", Fate::Acked);
        l.record("c", Fate::Indeterminate);
        l.record("d", Fate::Failed);
        l.record("e", Fate::Indeterminate);
        let stored: Vec<String> = ["a", "a", "c", "d", "z"].map(String::from).into();
        let a = l.audit(&stored);
        assert_eq!(a.acked, 2);
        assert_eq!(a.lost, ["b"]);
        assert_eq!(a.duplicated, ["a"]);
        assert_eq!(a.phantom, ["d", "z"]);
        assert!(!a.is_clean());
        let ok: Vec<String> = ["a", "b", "c"].map(String::from).into();
        assert!(l.audit(&ok).is_clean());
    }

    #[test]
    fn test_run_round_trips_as_json() {
        let r = Recorder::new();
        let p = r.invoke(0, "k", Call::Cas { from: 1, to: 2 });
        r.complete(p, Ret::Cas(true));
        let run = Run {
            seed: 7,
            schedule: vec!["kill leader".into()],
            ops: r.ops(),
            pushed: BTreeMap::from([("t".to_string(), Fate::Acked)]),
            stored: BTreeMap::from([(1, vec!["t".to_string()])]),
        };
        let s = serde_json::to_string(&run).unwrap();
        let back: Run = serde_json::from_str(&s).unwrap();
        assert_eq!(back.ops, run.ops);
        assert_eq!(back.seed, 7);
    }
}
