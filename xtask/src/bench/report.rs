//! What a bench run produces: `results.json`, the ratio table, the SVG chart, BENCHMARKS.md.

use anyhow::{Context, Result};
use serde_json::json;
use std::fmt::Write as _;
use std::path::Path;

/// One figure measured in a run.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub name: String,
    pub system: String,
    pub value: f64,
    pub unit: String,
}

impl Measurement {
    pub fn new(name: &str, system: &str, value: f64, unit: &str) -> Measurement {
        Measurement {
            name: name.into(),
            system: system.into(),
            value,
            unit: unit.into(),
        }
    }
}

/// All measurements of a run, in the order they were taken.
#[derive(Debug, Default)]
pub struct Results(pub Vec<Measurement>);

impl Results {
    pub fn push(&mut self, m: Measurement) {
        println!(
            "    {:<10} {:<52} {:>12} {}",
            m.system,
            m.name,
            fmt_value(m.value),
            m.unit
        );
        self.0.push(m);
    }

    pub fn get(&self, system: &str, name: &str) -> Option<f64> {
        self.0
            .iter()
            .find(|m| m.system == system && m.name == name)
            .map(|m| m.value)
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let rows: Vec<_> = self
            .0
            .iter()
            .map(|m| json!({"name": m.name, "system": m.system, "value": m.value, "unit": m.unit}))
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&rows)? + "\n")
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// Figures print with three significant digits at most after the point, no exponent.
pub fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Which way is better for a comparison.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Better {
    Higher,
    Lower,
    AtMost,
}

/// One row of the ratio table: a Cairn figure against a peer's figure of the same kind.
pub struct Comparison {
    pub what: &'static str,
    pub cairn: (&'static str, &'static str),
    pub peer: (&'static str, &'static str),
    pub better: Better,
    /// The ratio Cairn/peer the issue asks for, if any (`>= x` for Higher, `< x` for Lower).
    pub target: Option<f64>,
}

/// An absolute goal for a Cairn figure.
pub struct Goal {
    pub what: &'static str,
    pub cairn: (&'static str, &'static str),
    pub better: Better,
    pub target: f64,
}

impl Better {
    pub fn sign(self) -> &'static str {
        match self {
            Better::Higher => "≥",
            Better::Lower => "<",
            Better::AtMost => "≤",
        }
    }
}

pub fn met(better: Better, value: f64, target: f64) -> &'static str {
    let ok = match better {
        Better::Higher => value >= target,
        Better::Lower => value < target,
        Better::AtMost => value <= target,
    };
    if !value.is_finite() {
        "?"
    } else if ok {
        "yes"
    } else {
        "no"
    }
}

/// The markdown ratio table (comparisons with peers, then Cairn's absolute goals).
pub fn ratio_table(results: &Results, comparisons: &[Comparison], goals: &[Goal]) -> String {
    let mut out = String::new();
    out.push_str("| comparison | Cairn | peer | peer value | Cairn/peer | target | met |\n");
    out.push_str("|---|---:|---|---:|---:|---:|:---:|\n");
    for c in comparisons {
        let cv = results.get(c.cairn.0, c.cairn.1).unwrap_or(f64::NAN);
        let pv = results.get(c.peer.0, c.peer.1).unwrap_or(f64::NAN);
        let unit = unit_of(results, c.cairn).or_else(|| unit_of(results, c.peer));
        let ratio = cv / pv;
        let (target, ok) = match c.target {
            Some(t) => (format!("{} {t}×", c.better.sign()), met(c.better, ratio, t)),
            None => ("".into(), ""),
        };
        let _ = writeln!(
            out,
            "| {} | {} {} | {} | {} | {} | {} | {} |",
            c.what,
            fmt_value(cv),
            unit.unwrap_or_default(),
            c.peer.0,
            fmt_value(pv),
            if ratio.is_finite() {
                format!("{ratio:.3}×")
            } else {
                "n/a".into()
            },
            target,
            ok
        );
    }
    out.push_str("\n| Cairn goal | value | target | met |\n|---|---:|---:|:---:|\n");
    for g in goals {
        let v = results.get(g.cairn.0, g.cairn.1).unwrap_or(f64::NAN);
        let unit = unit_of(results, g.cairn).unwrap_or_default();
        let _ = writeln!(
            out,
            "| {} | {} {unit} | {} {} {unit} | {} |",
            g.what,
            fmt_value(v),
            g.better.sign(),
            fmt_value(g.target),
            met(g.better, v, g.target)
        );
    }
    out
}

fn unit_of(results: &Results, (system, name): (&str, &str)) -> Option<String> {
    results
        .0
        .iter()
        .find(|m| m.system == system && m.name == name)
        .map(|m| m.unit.clone())
}

/// All measurements as a markdown table grouped by system.
pub fn all_table(results: &Results) -> String {
    let mut out = String::from("| system | measurement | value | unit |\n|---|---|---:|---|\n");
    for m in &results.0 {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            m.system,
            m.name,
            fmt_value(m.value),
            m.unit
        );
    }
    out
}

/// A series for the throughput chart: name, colour, (x = devices or writers, y = records/s).
pub struct Series {
    pub name: String,
    pub colour: &'static str,
    pub points: Vec<(f64, f64)>,
}

/// Throughput against device count, log-scaled x axis, as a standalone SVG document.
/// Series with a single point are drawn as horizontal reference lines (peers at their best).
pub fn throughput_svg(title: &str, series: &[Series]) -> String {
    let (w, h) = (720.0, 420.0);
    let (left, right, top, bottom) = (90.0, 220.0, 40.0, 60.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    // No points at all (a subset run): a default axis, never an infinite one.
    let x_min = match xs.iter().copied().fold(f64::INFINITY, f64::min) {
        m if m.is_finite() => m.max(1.0),
        _ => 1.0,
    };
    let x_max = xs.iter().copied().fold(1.0, f64::max).max(x_min * 10.0);
    let y_max_raw = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max);
    let y_max = nice_ceiling(y_max_raw);
    let lx = |x: f64| {
        left + (x.max(x_min).log10() - x_min.log10()) / (x_max.log10() - x_min.log10()) * pw
    };
    let ly = |y: f64| top + ph - (y / y_max) * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        left + pw / 2.0,
        xml_escape(title)
    );
    // Grid and y labels.
    for i in 0..=5 {
        let y = y_max * i as f64 / 5.0;
        let py = ly(y);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            py + 4.0,
            si(y)
        );
    }
    // Decades on x.
    let mut d = 10f64.powf(x_min.log10().floor());
    while d.is_finite() && d <= x_max * 1.0001 {
        if d >= x_min * 0.9999 {
            let px = lx(d);
            let _ = writeln!(
                s,
                r##"<line x1="{px:.1}" y1="{top}" x2="{px:.1}" y2="{:.1}" stroke="#eee"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                top + ph,
                top + ph + 18.0,
                si(d)
            );
        }
        d *= 10.0;
    }
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">simulated devices (Cairn) / concurrent writers (peers), log scale</text>"#,
        left + pw / 2.0,
        h - 18.0
    );
    let _ = writeln!(
        s,
        r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">records committed per second</text>"#,
        top + ph / 2.0,
        top + ph / 2.0
    );
    // Series and legend.
    for (i, ser) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = ser
            .points
            .iter()
            .copied()
            .filter(|p| p.1.is_finite())
            .collect();
        if pts.is_empty() {
            continue;
        }
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", lx(x), ly(y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
            path.join(" "),
            ser.colour
        );
        for &(x, y) in &pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{}"/>"#,
                lx(x),
                ly(y),
                ser.colour
            );
        }
        let ly0 = top + 14.0 + i as f64 * 20.0;
        let lx0 = left + pw + 14.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx0}" y1="{ly0}" x2="{}" y2="{ly0}" stroke="{}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            lx0 + 20.0,
            ser.colour,
            lx0 + 26.0,
            ly0 + 4.0,
            xml_escape(&ser.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn nice_ceiling(v: f64) -> f64 {
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

/// 1200 -> "1.2k", 150000 -> "150k".
fn si(v: f64) -> String {
    let (d, suffix) = if v >= 1e6 {
        (v / 1e6, "M")
    } else if v >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let s = format!("{d:.1}");
    format!("{}{suffix}", s.trim_end_matches(".0"))
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_table_marks_targets() {
        let mut r = Results::default();
        r.0.push(Measurement::new("tp", "Cairn", 200.0, "records/s"));
        r.0.push(Measurement::new("tp", "dqlite", 100.0, "records/s"));
        let t = ratio_table(
            &r,
            &[Comparison {
                what: "throughput",
                cairn: ("Cairn", "tp"),
                peer: ("dqlite", "tp"),
                better: Better::Higher,
                target: Some(100.0),
            }],
            &[Goal {
                what: "tp",
                cairn: ("Cairn", "tp"),
                better: Better::Higher,
                target: 150.0,
            }],
        );
        assert!(
            t.contains("| throughput | 200 records/s | dqlite | 100 | 2.000× | ≥ 100× | no |"),
            "{t}"
        );
        assert!(
            t.contains("| tp | 200 records/s | ≥ 150 records/s | yes |"),
            "{t}"
        );
    }

    #[test]
    fn svg_is_well_formed_and_scaled() {
        let svg = throughput_svg(
            "t",
            &[Series {
                name: "a<b".into(),
                colour: "#000",
                points: vec![(1.0, 10.0), (1000.0, 120_000.0)],
            }],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a&lt;b"));
        assert!(svg.contains(">150k<") || svg.contains(">200k<"), "{svg}");
    }

    /// A subset run has no throughput points: the chart used to loop forever (an infinite
    /// x axis) and eat all memory.
    #[test]
    fn svg_without_points_is_finite() {
        let svg = throughput_svg(
            "t",
            &[Series {
                name: "empty".into(),
                colour: "#000",
                points: Vec::new(),
            }],
        );
        assert!(svg.len() < 100_000 && svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn si_suffixes() {
        assert_eq!(si(1200.0), "1.2k");
        assert_eq!(si(150_000.0), "150k");
        assert_eq!(si(2_000_000.0), "2M");
        assert_eq!(si(7.0), "7");
    }
}
