//! Seeded fault schedules.
//!
//! A schedule is a list of [`Step`]s drawn from a seed with [`SplitMix64`] (our own eight-line
//! generator, so a seed printed today replays the same schedule after any dependency update).
//! Each step injects one [`Fault`], or two or three at once (an *overlap*: for example a
//! partition while the old leader is paused and a follower's disk is full), holds them for
//! `hold_ms`, heals them, then lets the cluster run for `gap_ms` before the next. The runner ([`crate::faults`]) executes steps against a
//! real cluster; this module only decides *what* happens, so schedules can be printed,
//! stored with a failing history and replayed.

use std::fmt;

use serde::{Deserialize, Serialize};

/// SplitMix64 (Steele, Lea & Flood 2014): tiny, fast, and stable forever.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`); the modulo bias is irrelevant at our sizes.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
}

/// Which node a fault hits, resolved when the step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    Leader,
    /// The n-th follower (modulo how many there are at the time).
    Follower(u8),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Leader => write!(f, "leader"),
            Target::Follower(n) => write!(f, "follower#{n}"),
        }
    }
}

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fault {
    /// `SIGKILL`, hold, start again on the same data.
    Kill(Target),
    /// `SIGSTOP`, hold, `SIGCONT`.
    Pause(Target),
    /// Cut the node off from every other node (iptables DROP both ways); clients still reach it.
    Isolate(Target),
    /// Cut the cluster into a minority and a majority; the leader lands in the minority when
    /// `leader_in_minority`, forcing an election on the other side.
    Split { leader_in_minority: bool },
    /// Drop this percentage of packets between nodes (iptables `statistic`), on every node.
    Loss { percent: u8 },
    /// Fill the node's data dir (a small tmpfs) to the last byte; hold; free it.
    DiskFull(Target),
    /// Remove a follower from the membership (`DELETE /remove`), stop it, and join a fresh
    /// node in its place, all under load.
    ReplaceMember(Target),
    /// The power goes out: the nodes in `scope` are killed with `SIGKILL` and their data
    /// dirs (on faultfs) lose everything not fsync'd; with `tear`, part of each disk's last
    /// unsynced write lands. Hold, start again.
    PowerCut { scope: CutScope, tear: bool },
    /// The node's wall clock (libfaketime) jumps or runs slow; monotonic time is untouched,
    /// as on a real machine whose clock is set by hand or by a bad NTP server.
    Clock { target: Target, skew: Skew },
    /// The power goes out on the real devices ([`crate::real_device`]: the QEMU image, the
    /// host board) while records wait unacknowledged: each is killed with `SIGKILL`; the heal
    /// boots them again (QEMU on the same flash file, whose outbox resends). Only in schedules
    /// with real devices ([`add_device_cuts`]).
    DeviceCut,
}

/// Which nodes a power cut takes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CutScope {
    One(Target),
    /// As many nodes as leave a majority standing, the leader among them.
    Minority,
    /// Every member at once.
    All,
}

/// What a clock fault does to the wall clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Skew {
    /// Jump this many seconds ahead.
    Forward(u32),
    /// Jump this many seconds back.
    Backward(u32),
    /// Run at this many percent of real speed.
    Slow(u8),
}

impl fmt::Display for Skew {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skew::Forward(s) => write!(f, "jumps {s} s forward"),
            Skew::Backward(s) => write!(f, "jumps {s} s back"),
            Skew::Slow(p) => write!(f, "runs at {p}% speed"),
        }
    }
}

impl Skew {
    /// The libfaketime setting (`FAKETIME_TIMESTAMP_FILE` contents) for this skew.
    pub fn faketime(&self) -> String {
        match self {
            Skew::Forward(s) => format!("+{s}"),
            Skew::Backward(s) => format!("-{s}"),
            Skew::Slow(p) => format!("+0 x{:.2}", f64::from(*p) / 100.0),
        }
    }
}

impl fmt::Display for CutScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CutScope::One(t) => write!(f, "{t}"),
            CutScope::Minority => write!(f, "a minority (with the leader)"),
            CutScope::All => write!(f, "the whole cluster"),
        }
    }
}

impl Fault {
    /// Whether this fault needs network namespaces (and root).
    pub fn needs_netns(&self) -> bool {
        matches!(
            self,
            Fault::Isolate(_) | Fault::Split { .. } | Fault::Loss { .. }
        )
    }

    /// Whether this fault needs a tmpfs data dir (and root).
    pub fn needs_tmpfs(&self) -> bool {
        matches!(self, Fault::DiskFull(_))
    }

    /// Whether this fault needs faultfs data dirs (FUSE, root).
    pub fn needs_faultfs(&self) -> bool {
        matches!(self, Fault::PowerCut { .. })
    }

    /// Whether this fault needs the nodes started under libfaketime.
    pub fn needs_faketime(&self) -> bool {
        matches!(self, Fault::Clock { .. })
    }

    /// The kind's name in the summary line.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Kill(_) => "kill",
            Fault::Pause(_) => "pause",
            Fault::Isolate(_) | Fault::Split { .. } => "partition",
            Fault::Loss { .. } => "loss",
            Fault::DiskFull(_) => "disk",
            Fault::PowerCut { .. } => "powercut",
            Fault::Clock { .. } => "clock",
            Fault::ReplaceMember(_) => "member",
            Fault::DeviceCut => "devcut",
        }
    }

    /// Whether this fault changes the network (two of them cannot overlap: one rule set).
    fn is_network(&self) -> bool {
        self.needs_netns()
    }

    /// Whether this fault may share a step with others (a membership change or a whole-
    /// cluster cut stands alone).
    fn overlaps(&self) -> bool {
        !matches!(
            self,
            Fault::ReplaceMember(_)
                | Fault::PowerCut {
                    scope: CutScope::All,
                    ..
                }
        )
    }
}

/// Every kind in the summary line's order.
pub const KINDS: [&str; 9] = [
    "kill",
    "pause",
    "partition",
    "loss",
    "disk",
    "powercut",
    "clock",
    "member",
    "devcut",
];

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Kill(t) => write!(f, "kill -9 {t} + restart"),
            Fault::Pause(t) => write!(f, "SIGSTOP/SIGCONT {t}"),
            Fault::Isolate(t) => write!(f, "isolate {t}"),
            Fault::Split { leader_in_minority } => write!(
                f,
                "split majority/minority (leader in {})",
                if *leader_in_minority {
                    "minority"
                } else {
                    "majority"
                }
            ),
            Fault::Loss { percent } => write!(f, "{percent}% packet loss between nodes"),
            Fault::DiskFull(t) => write!(f, "disk full on {t}"),
            Fault::ReplaceMember(t) => write!(f, "remove {t} from membership, join a new node"),
            Fault::PowerCut { scope, tear } => write!(
                f,
                "power cut on {scope}{}",
                if *tear { " (torn last write)" } else { "" }
            ),
            Fault::Clock { target, skew } => write!(f, "clock of {target} {skew}"),
            Fault::DeviceCut => write!(f, "power cut on the real devices, boot them again"),
        }
    }
}

/// One step of a schedule: one fault, or several at once (an overlap), held together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub faults: Vec<Fault>,
    pub hold_ms: u64,
    pub gap_ms: u64,
}

impl Step {
    pub fn is_overlap(&self) -> bool {
        self.faults.len() > 1
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let faults: Vec<String> = self.faults.iter().map(Fault::to_string).collect();
        write!(
            f,
            "{}{} for {} ms, then {} ms calm",
            if self.is_overlap() { "together: " } else { "" },
            faults.join(" + "),
            self.hold_ms,
            self.gap_ms
        )
    }
}

/// What the environment allows.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    pub netns: bool,
    pub tmpfs: bool,
    /// FUSE for faultfs data dirs (power cuts).
    pub faultfs: bool,
    /// libfaketime for clock faults.
    pub faketime: bool,
}

impl Capabilities {
    fn allows(&self, f: &Fault) -> bool {
        !(f.needs_netns() && !self.netns
            || f.needs_tmpfs() && !self.tmpfs
            || f.needs_faultfs() && !self.faultfs
            || f.needs_faketime() && !self.faketime)
    }
}

/// What a schedule concentrates on (`cairn-faults --focus`); `Mixed` draws everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Focus {
    #[default]
    Mixed,
    /// Every step overlaps two or three faults.
    Overlap,
    /// Every step holds a power cut (alone or overlapped).
    PowerCut,
    /// Every step holds a clock fault.
    Clock,
}

impl fmt::Display for Focus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Focus::Mixed => "mixed",
            Focus::Overlap => "overlap",
            Focus::PowerCut => "powercut",
            Focus::Clock => "clock",
        })
    }
}

impl std::str::FromStr for Focus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mixed" => Ok(Focus::Mixed),
            "overlap" => Ok(Focus::Overlap),
            "powercut" => Ok(Focus::PowerCut),
            "clock" => Ok(Focus::Clock),
            _ => Err(format!(
                "unknown focus {s:?} (mixed, overlap, powercut, clock)"
            )),
        }
    }
}

/// One fault of any kind, drawn from `rng`.
fn draw(rng: &mut SplitMix64) -> Fault {
    let target = if rng.chance(50) {
        Target::Leader
    } else {
        Target::Follower(rng.below(4) as u8)
    };
    let follower = Target::Follower(rng.below(4) as u8);
    match rng.below(9) {
        0 => Fault::Kill(target),
        1 => Fault::Pause(target),
        2 => Fault::Isolate(target),
        3 => Fault::Split {
            leader_in_minority: rng.chance(50),
        },
        4 => Fault::Loss {
            percent: *rng.pick(&[10, 20, 35]),
        },
        5 => Fault::DiskFull(target),
        6 => draw_cut(rng, target),
        7 => draw_clock(rng, target),
        _ => Fault::ReplaceMember(follower),
    }
}

fn draw_cut(rng: &mut SplitMix64, target: Target) -> Fault {
    let scope = match rng.below(3) {
        0 => CutScope::One(target),
        1 => CutScope::Minority,
        _ => CutScope::All,
    };
    Fault::PowerCut {
        scope,
        tear: rng.chance(50),
    }
}

fn draw_clock(rng: &mut SplitMix64, target: Target) -> Fault {
    let skew = match rng.below(3) {
        0 => Skew::Forward(*rng.pick(&[5, 60, 3600])),
        1 => Skew::Backward(*rng.pick(&[5, 60, 3600])),
        _ => Skew::Slow(*rng.pick(&[25, 50, 90])),
    };
    Fault::Clock { target, skew }
}

/// Adds faults drawn from `rng` to `faults` until it holds `n`, keeping at most one network
/// fault and only kinds that overlap; gives up after a few tries.
fn fill_overlap(rng: &mut SplitMix64, caps: Capabilities, faults: &mut Vec<Fault>, n: usize) {
    for _ in 0..40 {
        if faults.len() >= n {
            return;
        }
        let f = draw(rng);
        let clash = f.is_network() && faults.iter().any(Fault::is_network);
        if caps.allows(&f) && f.overlaps() && !clash {
            faults.push(f);
        }
    }
}

/// Draws `steps` steps from `seed`, using only kinds the environment supports; `focus` says
/// what every step must hold. About a third of mixed steps overlap two or three faults.
pub fn schedule(seed: u64, steps: usize, caps: Capabilities, focus: Focus) -> Vec<Step> {
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(steps);
    while out.len() < steps {
        let target = if rng.chance(50) {
            Target::Leader
        } else {
            Target::Follower(rng.below(4) as u8)
        };
        let first = match focus {
            Focus::PowerCut => draw_cut(&mut rng, target),
            Focus::Clock => draw_clock(&mut rng, target),
            Focus::Mixed | Focus::Overlap => draw(&mut rng),
        };
        if !caps.allows(&first) {
            continue;
        }
        let mut faults = vec![first];
        let overlap = match focus {
            Focus::Overlap => true,
            Focus::Mixed => rng.chance(35),
            Focus::PowerCut | Focus::Clock => rng.chance(50),
        };
        if overlap && faults[0].overlaps() {
            let n = 2 + rng.below(2) as usize;
            fill_overlap(&mut rng, caps, &mut faults, n);
        }
        if focus == Focus::Overlap && faults.len() < 2 {
            continue;
        }
        out.push(Step {
            faults,
            hold_ms: rng.range(800, 3000),
            gap_ms: rng.range(300, 1200),
        });
    }
    out
}

/// Adds `n` device power cuts ([`Fault::DeviceCut`]) to `steps`, each as the last fault of a
/// step (so it falls while the step's gateway faults hold) that has none yet, preferring
/// steps that stall acknowledgements (a fault on the leader, a split, a power cut), drawn
/// from their own generator: the gateway faults of a seed stay what they are without a real
/// device.
pub fn add_device_cuts(steps: &mut [Step], seed: u64, n: usize) {
    let mut rng = SplitMix64::new(seed ^ 0xdc07_dc07_dc07_dc07);
    let stalls = |f: &Fault| {
        matches!(
            f,
            Fault::Kill(Target::Leader)
                | Fault::Pause(Target::Leader)
                | Fault::Isolate(Target::Leader)
                | Fault::Split { .. }
                | Fault::PowerCut { .. }
        )
    };
    for _ in 0..n {
        let free: Vec<usize> = (0..steps.len())
            .filter(|&i| !steps[i].faults.contains(&Fault::DeviceCut))
            .collect();
        let preferred: Vec<usize> = free
            .iter()
            .copied()
            .filter(|&i| steps[i].faults.iter().any(stalls))
            .collect();
        let pool = if preferred.is_empty() {
            free
        } else {
            preferred
        };
        if pool.is_empty() {
            return;
        }
        let i = *rng.pick(&pool);
        steps[i].faults.push(Fault::DeviceCut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Capabilities = Capabilities {
        netns: true,
        tmpfs: true,
        faultfs: true,
        faketime: true,
    };

    fn all_faults(s: &[Step]) -> Vec<Fault> {
        s.iter().flat_map(|st| st.faults.iter().copied()).collect()
    }

    #[test]
    fn test_splitmix_known_values() {
        // First outputs for seed 0 are fixed by the algorithm; a change here breaks replay.
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn test_schedule_is_deterministic() {
        let m = Focus::Mixed;
        assert_eq!(schedule(42, 20, ALL, m), schedule(42, 20, ALL, m));
        assert_ne!(schedule(42, 20, ALL, m), schedule(43, 20, ALL, m));
    }

    #[test]
    fn test_schedule_respects_capabilities() {
        let none = Capabilities {
            netns: false,
            tmpfs: false,
            faultfs: false,
            faketime: false,
        };
        let s = schedule(1, 200, none, Focus::Mixed);
        assert_eq!(s.len(), 200);
        assert!(all_faults(&s).iter().all(|f| !f.needs_netns()
            && !f.needs_tmpfs()
            && !f.needs_faultfs()
            && !f.needs_faketime()));
    }

    #[test]
    fn test_schedule_covers_every_kind() {
        let s = all_faults(&schedule(9, 300, ALL, Focus::Mixed));
        let has = |f: fn(&Fault) -> bool| s.iter().any(f);
        assert!(has(|f| matches!(f, Fault::Kill(Target::Leader))));
        assert!(has(|f| matches!(f, Fault::Kill(Target::Follower(_)))));
        assert!(has(|f| matches!(f, Fault::Pause(_))));
        assert!(has(|f| matches!(f, Fault::Isolate(_))));
        assert!(has(|f| matches!(f, Fault::Split { .. })));
        assert!(has(|f| matches!(f, Fault::Loss { .. })));
        assert!(has(|f| matches!(f, Fault::DiskFull(_))));
        assert!(has(|f| matches!(f, Fault::ReplaceMember(_))));
        for scope in [CutScope::Minority, CutScope::All] {
            assert!(
                s.iter()
                    .any(|f| matches!(f, Fault::PowerCut { scope: x, .. } if *x == scope))
            );
        }
        assert!(has(|f| matches!(
            f,
            Fault::PowerCut {
                scope: CutScope::One(_),
                tear: true
            }
        )));
        assert!(has(|f| matches!(
            f,
            Fault::Clock {
                skew: Skew::Backward(_),
                ..
            }
        )));
        assert!(has(|f| matches!(
            f,
            Fault::Clock {
                skew: Skew::Slow(_),
                ..
            }
        )));
        let kinds: std::collections::BTreeSet<&str> = s.iter().map(Fault::kind).collect();
        // Every kind but the device power cut, which only schedules with a device get.
        assert_eq!(kinds.len(), KINDS.len() - 1);
        assert!(!kinds.contains("devcut"));
    }

    #[test]
    fn test_overlaps_are_compatible() {
        let s = schedule(5, 300, ALL, Focus::Overlap);
        assert!(s.iter().all(|st| (2..=3).contains(&st.faults.len())));
        for st in &s {
            assert!(
                st.faults.iter().filter(|f| f.is_network()).count() <= 1,
                "{st}"
            );
            assert!(st.faults.iter().all(Fault::overlaps), "{st}");
        }
        let mixed = schedule(5, 300, ALL, Focus::Mixed);
        let n = mixed.iter().filter(|st| st.is_overlap()).count();
        assert!((50..200).contains(&n), "{n} overlapping steps of 300");
    }

    #[test]
    fn test_focus_puts_its_fault_in_every_step() {
        let cuts = schedule(3, 50, ALL, Focus::PowerCut);
        assert!(
            cuts.iter()
                .all(|st| st.faults.iter().any(Fault::needs_faultfs))
        );
        let clocks = schedule(3, 50, ALL, Focus::Clock);
        assert!(
            clocks
                .iter()
                .all(|st| st.faults.iter().any(Fault::needs_faketime))
        );
        assert_eq!(Skew::Slow(50).faketime(), "+0 x0.50");
        assert_eq!(Skew::Backward(60).faketime(), "-60");
    }

    #[test]
    fn test_device_cuts_join_steps_and_leave_gateway_faults_alone() {
        let plain = schedule(11, 6, ALL, Focus::PowerCut);
        let mut with = plain.clone();
        add_device_cuts(&mut with, 11, 1);
        let cuts: Vec<usize> = (0..with.len())
            .filter(|&i| with[i].faults.contains(&Fault::DeviceCut))
            .collect();
        assert_eq!(cuts.len(), 1);
        let i = cuts[0];
        assert_eq!(
            with[i].faults.last(),
            Some(&Fault::DeviceCut),
            "last in its step"
        );
        assert_eq!(
            &with[i].faults[..with[i].faults.len() - 1],
            &plain[i].faults[..]
        );
        for j in (0..with.len()).filter(|&j| j != i) {
            assert_eq!(with[j], plain[j]);
        }
        let mut again = plain.clone();
        add_device_cuts(&mut again, 11, 1);
        assert_eq!(again, with, "deterministic");
        add_device_cuts(&mut again, 11, 10);
        let n = all_faults(&again)
            .iter()
            .filter(|f| **f == Fault::DeviceCut)
            .count();
        assert_eq!(n, 6, "at most one per step");
    }
}
