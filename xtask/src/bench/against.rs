//! `cargo xtask bench --against BIN [--rounds N]`: the Cairn part for this tree's binary and
//! another one (an earlier commit's release build), alternated A B B A per round, with the
//! median of every figure side by side.
//!
//! One run after the other is not a fair comparison on the machines this project is measured
//! on: on the 2-core VM of 4 December 2026 a run that followed another one was often slower
//! (p50 2.3 ms, then 4.1, 2.4, 3.2 for the same binary), the disk still writing back the
//! previous run's hundreds of megabytes. Alternating A B B A gives each binary as many first
//! and second places; the data directory is removed and the disk synced between runs.

use super::report::Results;
use super::{Profile, cairn};
use anyhow::{Result, ensure};
use std::path::{Path, PathBuf};

/// One binary's figures over its runs: (system, name, unit) -> values.
type Figures = std::collections::BTreeMap<(String, String, String), Vec<f64>>;

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn settle() {
    let _ = std::fs::remove_dir_all(crate::util::root().join("target/bench/work/cairn"));
    let _ = std::process::Command::new("sync").status();
    std::thread::sleep(std::time::Duration::from_secs(5));
}

/// Runs the comparison and prints its table; returns it as markdown.
pub fn run(profile: &Profile, this: &Path, other: &Path, rounds: usize) -> Result<String> {
    ensure!(
        other.exists(),
        "--against {}: no such file",
        other.display()
    );
    let bins: [(&str, PathBuf); 2] = [("this tree", this.into()), ("against", other.into())];
    let mut figures: [Figures; 2] = Default::default();
    for round in 0..rounds {
        for which in [0usize, 1, 1, 0] {
            settle();
            println!(
                "bench --against: round {} of {rounds}, {} ({})",
                round + 1,
                bins[which].0,
                bins[which].1.display()
            );
            let mut results = Results::default();
            cairn::run(profile, &mut results, &bins[which].1)?;
            for m in results.0 {
                figures[which]
                    .entry((m.system, m.name, m.unit))
                    .or_default()
                    .push(m.value);
            }
        }
    }
    let mut md = String::from(
        "| figure | this tree (median) | against (median) | ratio | this tree, each run | against, each run |\n\
         |---|---:|---:|---:|---|---|\n",
    );
    for (key, a) in &figures[0] {
        let Some(b) = figures[1].get(key) else {
            continue;
        };
        let (ma, mb) = (median(a), median(b));
        let each = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        md.push_str(&format!(
            "| {} {} ({}) | {ma:.3} | {mb:.3} | {:.3} | {} | {} |\n",
            key.0,
            key.1,
            key.2,
            ma / mb,
            each(a),
            each(b)
        ));
    }
    println!("\n{md}");
    println!("against: {}", other.display());
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn test_median() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
