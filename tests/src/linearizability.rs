//! A linearizability checker for histories of one kind of object: a register keyed by name.
//!
//! The algorithm is Wing & Gong's search as improved by Lowe ("Testing for linearizability",
//! 2017), the one Knossos and Porcupine use: walk the history's call/return events in time
//! order, tentatively linearize any pending operation the model accepts, backtrack when a
//! return is reached whose operation has not been linearized, and memoize `(set of linearized
//! operations, model state)` pairs already explored so each is tried once. Registers under
//! different keys are independent (linearizability is compositional, Herlihy & Wing), so each
//! key is checked on its own, which keeps the search small.
//!
//! Operations whose outcome the client never learned (a timeout, a dropped connection, an
//! error after the request may have been proposed) are *indeterminate*: they may take effect
//! at any point after their invocation, or never. They have no return event, and the search
//! succeeds once every *completed* operation is linearized, so an indeterminate operation is
//! linearized only where it explains an observation. Indeterminate reads tell nothing and are
//! dropped.
//!
//! Why not stateright 0.31: its `LinearizabilityTester` wants the history fed as it happens
//! (`on_invoke`/`on_return` per thread, one outstanding op per thread) and has no notion of an
//! indeterminate operation that may never return; a client that times out must move on, and
//! modelling that means treating each timed-out op as a thread that never returns, which its
//! serialized-history search handles without memoization. A hundred-line search over our own
//! types, with a budget and a readable counterexample, is the better fit.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// The value a register holds: `None` until first written (no row in the table).
pub type Value = Option<i64>;

/// What a client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Call {
    Read,
    Write(i64),
    /// Compare-and-set: if the register holds `from`, set it to `to`.
    Cas {
        from: i64,
        to: i64,
    },
}

/// What the client learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Ret {
    /// A read returned this value.
    Read(Value),
    /// A write was acknowledged.
    Written,
    /// A compare-and-set was acknowledged with whether it applied.
    Cas(bool),
    /// The request definitely had no effect (for example the connection was refused).
    Failed,
    /// Unknown: it may have taken effect, or not.
    Indeterminate,
}

/// One operation in a history: times are nanoseconds since the history's epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub process: u32,
    pub key: String,
    pub call: Call,
    pub ret: Ret,
    pub invoke_ns: u64,
    /// `None` for an indeterminate operation (it never returned as far as the model knows).
    pub complete_ns: Option<u64>,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = match self.complete_ns {
            Some(t) => format!("{:.3}", t as f64 / 1e6),
            None => "∞".into(),
        };
        write!(
            f,
            "p{} {} {:?} -> {:?} [{:.3} ms, {end} ms]",
            self.process,
            self.key,
            self.call,
            self.ret,
            self.invoke_ns as f64 / 1e6
        )
    }
}

/// The register's sequential specification: the state after `call` returned `ret` in
/// `state`, or `None` if that cannot happen.
pub fn step(state: Value, call: Call, ret: Ret) -> Option<Value> {
    match (call, ret) {
        (Call::Read, Ret::Read(v)) => (v == state).then_some(state),
        (Call::Write(v), Ret::Written | Ret::Indeterminate) => Some(Some(v)),
        (Call::Cas { from, to }, Ret::Cas(true)) => (state == Some(from)).then_some(Some(to)),
        (Call::Cas { from, .. }, Ret::Cas(false)) => (state != Some(from)).then_some(state),
        (Call::Cas { from, to }, Ret::Indeterminate) => {
            Some(if state == Some(from) { Some(to) } else { state })
        }
        _ => None,
    }
}

/// Why a key's history is not linearizable, or could not be decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order explains the history. `stuck` is the operation that could not be placed when
    /// the search got furthest; `linearized` how many operations that deepest order placed.
    NotLinearizable {
        key: String,
        stuck: Op,
        linearized: usize,
        ops: Vec<Op>,
    },
    /// The search budget ran out before a verdict.
    Unknown {
        key: String,
        explored: u64,
    },
}

impl Verdict {
    pub fn is_linearizable(&self) -> bool {
        matches!(self, Verdict::Linearizable)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Linearizable => write!(f, "linearizable"),
            Verdict::Unknown { key, explored } => write!(
                f,
                "key {key}: undecided after exploring {explored} configurations"
            ),
            Verdict::NotLinearizable {
                key,
                stuck,
                linearized,
                ops,
            } => {
                writeln!(
                    f,
                    "key {key}: NOT linearizable; the deepest order placed {linearized} of {} \
                     operations and then could not place:\n  {stuck}\nhistory of key {key} \
                     around it (the whole history is in the saved run):",
                    ops.len()
                )?;
                let mut sorted: Vec<&Op> = ops.iter().collect();
                sorted.sort_by_key(|o| o.invoke_ns);
                let at = sorted.iter().position(|o| *o == stuck).unwrap_or(0);
                let (from, to) = (at.saturating_sub(30), (at + 10).min(sorted.len()));
                for op in &sorted[from..to] {
                    let mark = if *op == stuck { "->" } else { "  " };
                    writeln!(f, "{mark}{op}")?;
                }
                Ok(())
            }
        }
    }
}

/// Default number of search steps per key before giving up with [`Verdict::Unknown`].
pub const BUDGET: u64 = 5_000_000;

/// Checks every key of `ops` separately; returns the first verdict that is not
/// linearizable (or undecided), else [`Verdict::Linearizable`].
pub fn check(ops: &[Op]) -> Verdict {
    check_with_budget(ops, BUDGET)
}

pub fn check_with_budget(ops: &[Op], budget: u64) -> Verdict {
    let mut by_key: BTreeMap<&str, Vec<Op>> = BTreeMap::new();
    for op in ops {
        by_key.entry(&op.key).or_default().push(op.clone());
    }
    for (key, ops) in by_key {
        let v = check_key(key, ops, budget);
        if !v.is_linearizable() {
            return v;
        }
    }
    Verdict::Linearizable
}

/// Drops indeterminate writes whose value no read or CAS observed. Such a write can always
/// be placed "never" without changing what any read saw or any successful CAS needed; only
/// a failed CAS could depend on it, so keys with a failed CAS keep them all. This removes most of the search space a partition's timeouts create.
fn prune_unobserved(ops: Vec<Op>) -> Vec<Op> {
    if ops.iter().any(|o| o.ret == Ret::Cas(false)) {
        return ops;
    }
    let observed: HashSet<i64> = ops
        .iter()
        .filter_map(|o| match (o.call, o.ret) {
            (Call::Read, Ret::Read(Some(v))) => Some(v),
            (Call::Cas { from, .. }, _) => Some(from),
            _ => None,
        })
        .collect();
    ops.into_iter()
        .filter(|o| match (o.call, o.ret) {
            (Call::Write(v), Ret::Indeterminate) => observed.contains(&v),
            _ => true,
        })
        .collect()
}

/// One event of the doubly linked list the search walks.
#[derive(Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
    /// For a call, the index of its return event (if it has one).
    partner: Option<usize>,
    prev: usize,
    next: usize,
}

fn check_key(key: &str, ops: Vec<Op>, budget: u64) -> Verdict {
    // Failed ops had no effect; indeterminate reads tell nothing.
    let ops: Vec<Op> = ops
        .into_iter()
        .filter(|o| o.ret != Ret::Failed)
        .filter(|o| !(o.call == Call::Read && o.ret == Ret::Indeterminate))
        .map(|mut o| {
            if o.ret == Ret::Indeterminate {
                o.complete_ns = None;
            }
            o
        })
        .collect();
    let ops = prune_unobserved(ops);
    // (time, returns after calls at equal times so touching operations count as concurrent, op)
    let mut times: Vec<(u64, bool, usize)> = Vec::new();
    for (i, o) in ops.iter().enumerate() {
        times.push((o.invoke_ns, false, i));
        if let Some(t) = o.complete_ns {
            times.push((t, true, i));
        }
    }
    times.sort();
    // Index 0 is the list head sentinel; events are 1..=n.
    let head = 0;
    let n = times.len();
    let mut ev: Vec<Event> = Vec::with_capacity(n + 1);
    ev.push(Event {
        op: usize::MAX,
        is_call: false,
        partner: None,
        prev: head,
        next: if n > 0 { 1 } else { usize::MAX },
    });
    let mut call_of = vec![usize::MAX; ops.len()];
    for (k, &(_, is_return, op)) in times.iter().enumerate() {
        let idx = k + 1;
        ev.push(Event {
            op,
            is_call: !is_return,
            partner: None,
            prev: idx - 1,
            next: if idx < n { idx + 1 } else { usize::MAX },
        });
        if is_return {
            ev[call_of[op]].partner = Some(idx);
        } else {
            call_of[op] = idx;
        }
    }
    const END: usize = usize::MAX;

    let words = ops.len().div_ceil(64).max(1);
    let mut linearized = vec![0u64; words];
    let mut remaining = ops.iter().filter(|o| o.complete_ns.is_some()).count();
    let mut state: Value = None;
    let mut cache: HashSet<(Vec<u64>, Value)> = HashSet::new();
    // (call event, state before it)
    let mut stack: Vec<(usize, Value)> = Vec::new();
    let mut deepest = (0usize, None::<usize>);
    let mut explored = 0u64;

    let lift = |ev: &mut Vec<Event>, call: usize| {
        let (p, nx) = (ev[call].prev, ev[call].next);
        ev[p].next = nx;
        if nx != END {
            ev[nx].prev = p;
        }
        if let Some(r) = ev[call].partner {
            let (p, nx) = (ev[r].prev, ev[r].next);
            ev[p].next = nx;
            if nx != END {
                ev[nx].prev = p;
            }
        }
    };
    let unlift = |ev: &mut Vec<Event>, call: usize| {
        if let Some(r) = ev[call].partner {
            let (p, nx) = (ev[r].prev, ev[r].next);
            ev[p].next = r;
            if nx != END {
                ev[nx].prev = r;
            }
        }
        let (p, nx) = (ev[call].prev, ev[call].next);
        ev[p].next = call;
        if nx != END {
            ev[nx].prev = call;
        }
    };

    let mut entry = ev[head].next;
    while remaining > 0 {
        explored += 1;
        if explored > budget {
            return Verdict::Unknown {
                key: key.to_string(),
                explored,
            };
        }
        if entry == END {
            // Only pending calls of indeterminate ops are left ahead, and some completed op
            // is still unplaced behind us: back up.
            let Some((call, prev_state)) = stack.pop() else {
                break;
            };
            let op = ev[call].op;
            state = prev_state;
            linearized[op / 64] &= !(1 << (op % 64));
            if ops[op].complete_ns.is_some() {
                remaining += 1;
            }
            unlift(&mut ev, call);
            entry = ev[call].next;
            continue;
        }
        let e = ev[entry];
        if e.is_call {
            let o = &ops[e.op];
            if let Some(next_state) = step(state, o.call, o.ret) {
                let mut bits = linearized.clone();
                bits[e.op / 64] |= 1 << (e.op % 64);
                if cache.insert((bits.clone(), next_state)) {
                    stack.push((entry, state));
                    state = next_state;
                    linearized = bits;
                    if o.complete_ns.is_some() {
                        remaining -= 1;
                    }
                    lift(&mut ev, entry);
                    if stack.len() > deepest.0 {
                        deepest = (stack.len(), None);
                    }
                    entry = ev[head].next;
                    continue;
                }
            }
            entry = e.next;
        } else {
            // A return whose op is not linearized yet: this order fails here.
            if stack.len() >= deepest.0 && deepest.1.is_none() {
                deepest = (stack.len(), Some(e.op));
            }
            let Some((call, prev_state)) = stack.pop() else {
                let stuck = ops[deepest.1.unwrap_or(e.op)].clone();
                return Verdict::NotLinearizable {
                    key: key.to_string(),
                    stuck,
                    linearized: deepest.0,
                    ops,
                };
            };
            let op = ev[call].op;
            state = prev_state;
            linearized[op / 64] &= !(1 << (op % 64));
            if ops[op].complete_ns.is_some() {
                remaining += 1;
            }
            unlift(&mut ev, call);
            entry = ev[call].next;
        }
    }
    if remaining > 0 {
        let stuck = deepest.1.map(|i| ops[i].clone()).unwrap_or_else(|| {
            ops.iter()
                .find(|o| o.complete_ns.is_some())
                .cloned()
                .expect("a completed op remains")
        });
        return Verdict::NotLinearizable {
            key: key.to_string(),
            stuck,
            linearized: deepest.0,
            ops,
        };
    }
    Verdict::Linearizable
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nemesis::SplitMix64;

    fn op(p: u32, call: Call, ret: Ret, a: u64, b: Option<u64>) -> Op {
        Op {
            process: p,
            key: "k".into(),
            call,
            ret,
            invoke_ns: a,
            complete_ns: b,
        }
    }
    fn w(p: u32, v: i64, a: u64, b: u64) -> Op {
        op(p, Call::Write(v), Ret::Written, a, Some(b))
    }
    fn r(p: u32, v: Value, a: u64, b: u64) -> Op {
        op(p, Call::Read, Ret::Read(v), a, Some(b))
    }
    fn w_info(p: u32, v: i64, a: u64) -> Op {
        op(p, Call::Write(v), Ret::Indeterminate, a, None)
    }
    fn cas(p: u32, from: i64, to: i64, ok: bool, a: u64, b: u64) -> Op {
        op(p, Call::Cas { from, to }, Ret::Cas(ok), a, Some(b))
    }
    fn rejected(ops: &[Op]) -> bool {
        matches!(check(ops), Verdict::NotLinearizable { .. })
    }

    #[test]
    fn test_empty_and_sequential() {
        assert!(check(&[]).is_linearizable());
        let h = [
            r(0, None, 0, 1),
            w(0, 1, 2, 3),
            r(0, Some(1), 4, 5),
            w(1, 2, 6, 7),
            r(0, Some(2), 8, 9),
        ];
        assert!(check(&h).is_linearizable());
    }

    #[test]
    fn test_concurrent_write_and_read_either_value() {
        for seen in [None, Some(1)] {
            let h = [w(0, 1, 0, 10), r(1, seen, 2, 8)];
            assert!(check(&h).is_linearizable(), "read {seen:?}");
        }
    }

    #[test]
    fn test_rejects_stale_read() {
        // w1 then w2 both acknowledged; a later read still sees 1.
        let h = [w(0, 1, 0, 1), w(1, 2, 2, 3), r(2, Some(1), 4, 5)];
        let v = check(&h);
        let Verdict::NotLinearizable { stuck, .. } = &v else {
            panic!("accepted a stale read: {v}");
        };
        assert_eq!(stuck.call, Call::Read);
        assert!(v.to_string().contains("NOT linearizable"));
    }

    #[test]
    fn test_rejects_value_never_written() {
        assert!(rejected(&[w(0, 1, 0, 1), r(1, Some(7), 2, 3)]));
    }

    #[test]
    fn test_rejects_read_from_the_future() {
        // The read finished before the write was invoked.
        assert!(rejected(&[r(1, Some(1), 0, 1), w(0, 1, 2, 3)]));
    }

    #[test]
    fn test_rejects_lost_acknowledged_write() {
        // Acknowledged write, later read sees the initial empty register.
        assert!(rejected(&[w(0, 1, 0, 1), r(1, None, 5, 6)]));
    }

    #[test]
    fn test_rejects_non_monotonic_reads() {
        // Two sequential reads by different clients during one slow write: new then old.
        let h = [w(0, 1, 0, 100), r(1, Some(1), 10, 20), r(2, None, 30, 40)];
        assert!(rejected(&h));
        // Old then new is fine.
        let h = [w(0, 1, 0, 100), r(1, None, 10, 20), r(2, Some(1), 30, 40)];
        assert!(check(&h).is_linearizable());
    }

    #[test]
    fn test_indeterminate_write_may_or_may_not_apply() {
        let seen = [w_info(0, 1, 0), r(1, Some(1), 5, 6)];
        assert!(check(&seen).is_linearizable());
        let unseen = [w_info(0, 1, 0), r(1, None, 5, 6)];
        assert!(check(&unseen).is_linearizable());
        // But once seen it cannot be unseen.
        let flicker = [w_info(0, 1, 0), r(1, Some(1), 5, 6), r(1, None, 7, 8)];
        assert!(rejected(&flicker));
        // And it cannot take effect before it was invoked.
        let early = [r(1, Some(1), 0, 1), w_info(0, 1, 2)];
        assert!(rejected(&early));
    }

    #[test]
    fn test_failed_ops_have_no_effect() {
        let h = [
            op(0, Call::Write(1), Ret::Failed, 0, Some(1)),
            r(1, Some(1), 2, 3),
        ];
        assert!(rejected(&h));
    }

    #[test]
    fn test_cas() {
        let h = [w(0, 1, 0, 1), cas(1, 1, 2, true, 2, 3), r(0, Some(2), 4, 5)];
        assert!(check(&h).is_linearizable());
        // Two successful CAS from the same value, one after the other: impossible.
        let h = [
            w(0, 1, 0, 1),
            cas(1, 1, 2, true, 2, 3),
            cas(2, 1, 3, true, 4, 5),
        ];
        assert!(rejected(&h));
        // A CAS that reports failure although the value matched.
        let h = [w(0, 1, 0, 1), cas(1, 1, 2, false, 2, 3)];
        assert!(rejected(&h));
        // Concurrent CASes from the same value: exactly one may win.
        let h = [
            w(0, 1, 0, 1),
            cas(1, 1, 2, true, 2, 10),
            cas(2, 1, 3, false, 3, 9),
            r(0, Some(2), 11, 12),
        ];
        assert!(check(&h).is_linearizable());
    }

    #[test]
    fn test_keys_are_independent() {
        let mut a = w(0, 1, 0, 1);
        a.key = "a".into();
        let mut b = r(1, Some(1), 2, 3);
        b.key = "b".into();
        // Key b never had 1 written.
        let v = check(&[a, b]);
        let Verdict::NotLinearizable { key, .. } = v else {
            panic!("accepted cross-key read");
        };
        assert_eq!(key, "b");
    }

    /// Builds a random concurrent history that is linearizable by construction: every op
    /// takes effect at a point inside its interval on one real register.
    fn random_history(seed: u64, n: usize, procs: u32) -> Vec<Op> {
        let mut rng = SplitMix64::new(seed);
        let mut points: Vec<(u64, u32, Call, u64, u64)> = Vec::new();
        let mut next_free = vec![0u64; procs as usize];
        let mut value = 0i64;
        for _ in 0..n {
            let p = rng.below(procs as u64) as u32;
            let start = next_free[p as usize] + rng.below(20);
            let len = 1 + rng.below(60);
            let lin = start + rng.below(len);
            next_free[p as usize] = start + len + 1;
            let call = match rng.below(3) {
                0 => Call::Read,
                1 => {
                    value += 1;
                    Call::Write(value)
                }
                _ => Call::Cas {
                    from: rng.below(value.max(1) as u64 + 1) as i64,
                    to: 1000 + value,
                },
            };
            points.push((lin, p, call, start, start + len));
        }
        points.sort_by_key(|p| p.0);
        let mut reg: Value = None;
        let mut ops = Vec::new();
        for (_, p, call, a, b) in points {
            let ret = match call {
                Call::Read => Ret::Read(reg),
                Call::Write(v) => {
                    reg = Some(v);
                    Ret::Written
                }
                Call::Cas { from, to } => {
                    let ok = reg == Some(from);
                    if ok {
                        reg = Some(to);
                    }
                    Ret::Cas(ok)
                }
            };
            ops.push(op(p, call, ret, a, Some(b)));
        }
        ops
    }

    #[test]
    fn test_random_linearizable_histories_accepted() {
        for seed in 0..200 {
            let mut h = random_history(seed, 60, 5);
            // Some writes time out: the client never learns the outcome.
            for (i, o) in h.iter_mut().enumerate() {
                if i % 7 == 3 && matches!(o.call, Call::Write(_)) {
                    o.ret = Ret::Indeterminate;
                    o.complete_ns = None;
                }
            }
            let v = check(&h);
            assert!(v.is_linearizable(), "seed {seed}: {v}");
        }
    }

    #[test]
    fn test_random_corrupted_histories_rejected() {
        // Make one read return a value no write ever produced: must always be rejected.
        let mut rejected_count = 0;
        for seed in 0..100 {
            let mut h = random_history(seed, 40, 4);
            let Some(read) = h.iter_mut().find(|o| o.call == Call::Read) else {
                continue;
            };
            read.ret = Ret::Read(Some(-5));
            assert!(rejected(&h), "seed {seed} accepted a phantom value");
            rejected_count += 1;
        }
        assert!(rejected_count > 50);
    }

    #[test]
    fn test_large_history_is_decided() {
        let mut h = random_history(11, 1000, 8);
        for (i, o) in h.iter_mut().enumerate() {
            if i % 5 == 3 && matches!(o.call, Call::Write(_)) {
                o.ret = Ret::Indeterminate;
                o.complete_ns = None;
            }
        }
        let v = check(&h);
        assert!(v.is_linearizable(), "{v}");
    }

    #[test]
    fn test_unobserved_indeterminate_write_is_pruned_but_not_with_failed_cas() {
        // The write of 9 is never observed: pruning it must not change the verdict.
        let h = [w(0, 1, 0, 1), w_info(1, 9, 2), r(2, Some(1), 3, 4)];
        assert!(check(&h).is_linearizable());
        // A failed CAS from 1 is only explained by the unobserved write of 9 taking effect.
        let h = [w(0, 1, 0, 1), w_info(1, 9, 2), cas(2, 1, 5, false, 3, 4)];
        assert!(check(&h).is_linearizable());
        let h = [w(0, 1, 0, 1), cas(2, 1, 5, false, 3, 4)];
        assert!(rejected(&h));
    }

    #[test]
    fn test_budget_gives_unknown() {
        let h = random_history(3, 60, 5);
        assert!(matches!(check_with_budget(&h, 3), Verdict::Unknown { .. }));
    }
}
