//! `cargo xtask bench --against BIN [--rounds N]`: the Cairn part for this tree's binary and
//! another one (an earlier commit's release build), alternated A B B A per round, with the
//! median of every figure side by side (nearest rank, as the bench's other percentiles).
//!
//! One run after the other is not a fair comparison on the machines this project is measured
//! on: on the 2-core VM of 4 December 2026 a run that followed another one was often slower
//! (p50 2.3 ms, then 4.1, 2.4, 3.2 for the same binary), the disk still writing back the
//! previous run's hundreds of megabytes. Alternating A B B A gives each binary as many first
//! and second places; the data directory is removed and the disk synced between runs.

use super::proc::{percentile, scratch};
use super::report::Results;
use super::{Profile, cairn};
use anyhow::{Result, ensure};
use std::path::{Path, PathBuf};

/// One binary's figures over its runs: (system, name, unit) -> values.
type Figures = std::collections::BTreeMap<(String, String, String), Vec<f64>>;

/// The bench's median (nearest rank, as every other figure of the bench).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// Clears the previous run's data directory and lets the disk write it back.
fn settle() -> Result<()> {
    scratch(cairn::WORK)?;
    std::process::Command::new("sync").status()?;
    std::thread::sleep(std::time::Duration::from_secs(5));
    Ok(())
}

/// Runs the comparison and prints its table; returns it as markdown.
pub fn run(profile: &Profile, this: &Path, other: &Path, rounds: usize) -> Result<String> {
    ensure!(rounds > 0, "--rounds must be at least 1");
    ensure!(
        other.exists(),
        "--against {}: no such file",
        other.display()
    );
    let bins: [(&str, PathBuf); 2] = [("this tree", this.into()), ("against", other.into())];
    let mut figures: [Figures; 2] = Default::default();
    for round in 0..rounds {
        for which in [0usize, 1, 1, 0] {
            settle()?;
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
        // Unsorted input is sorted first (unsorted, the middle element would be 1.0).
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        // An even count takes the upper middle (nearest rank), not the mean of the two.
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 3.0);
    }
}
