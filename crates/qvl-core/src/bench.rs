//! The one shape every phase benchmark reports in.
//!
//! `cargo xtask bench <phase>` writes `target/qvl-bench/<phase>.json` as a
//! [`BenchReport`] and prints [`BenchReport::table`]. Each criterion compares
//! a measured value against the baseline measured in the same run.

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The machine a benchmark ran on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineInfo {
    /// CPU model name.
    pub cpu: String,
    /// Logical cores available to the process.
    pub cores: usize,
    /// Total RAM in bytes.
    pub ram: u64,
    /// GPU name, or "none".
    pub gpu: String,
    /// The disk holding the working directory (device and file system).
    pub disk: String,
}

impl MachineInfo {
    /// Reads what Linux tells about this machine; unknown fields stay empty.
    pub fn detect() -> MachineInfo {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let ram = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let gpu = std::fs::read_to_string("/proc/driver/nvidia/gpus")
            .ok()
            .map_or_else(|| "none".to_string(), |_| "nvidia".to_string());
        MachineInfo {
            cpu,
            cores,
            ram,
            gpu,
            disk: disk_of(Path::new(".")),
        }
    }
}

/// The mount (device and file system type) that holds `path`.
fn disk_of(path: &Path) -> String {
    let Ok(abs) = std::fs::canonicalize(path) else {
        return String::new();
    };
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || !abs.starts_with(f[1]) {
            continue;
        }
        if best.as_ref().is_none_or(|(len, _)| f[1].len() > *len) {
            best = Some((f[1].len(), format!("{} ({}) on {}", f[0], f[2], f[1])));
        }
    }
    best.map(|(_, s)| s).unwrap_or_default()
}

/// One success criterion: a measured value against its same-run baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Criterion {
    /// What is measured ("hit ratio at 1% capacity").
    pub name: String,
    /// Unit of value and baseline ("ratio", "ns/alloc", "tokens/s").
    pub unit: String,
    /// The measured value with the optimization.
    pub value: f64,
    /// The same measurement on the plain path.
    pub baseline: f64,
    /// value / baseline (or baseline / value where lower is better; see `target`).
    pub ratio: f64,
    /// The target the ratio must reach, in words and number ("ratio >= 1.3").
    pub target: String,
    /// Whether the target was met.
    pub pass: bool,
}

impl Criterion {
    /// A criterion where higher values are better: ratio = value / baseline,
    /// passing when ratio >= `min_ratio`.
    pub fn higher_is_better(
        name: impl Into<String>,
        unit: impl Into<String>,
        value: f64,
        baseline: f64,
        min_ratio: f64,
    ) -> Criterion {
        let ratio = value / baseline;
        Criterion {
            name: name.into(),
            unit: unit.into(),
            value,
            baseline,
            ratio,
            target: format!("value/baseline >= {min_ratio}"),
            pass: ratio >= min_ratio,
        }
    }

    /// A criterion where lower values are better (time, bytes): ratio =
    /// baseline / value (the speed-up or saving), passing when ratio >= `min_ratio`.
    pub fn lower_is_better(
        name: impl Into<String>,
        unit: impl Into<String>,
        value: f64,
        baseline: f64,
        min_ratio: f64,
    ) -> Criterion {
        let ratio = baseline / value;
        Criterion {
            name: name.into(),
            unit: unit.into(),
            value,
            baseline,
            ratio,
            target: format!("baseline/value >= {min_ratio}"),
            pass: ratio >= min_ratio,
        }
    }
}

/// The report of one phase benchmark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// The phase ("pool", "cache", ...).
    pub phase: String,
    /// Where it ran.
    pub machine: MachineInfo,
    /// The success criteria.
    pub criteria: Vec<Criterion>,
    /// Free-form measurements behind the criteria (tables, series).
    pub details: serde_json::Value,
}

impl BenchReport {
    /// An empty report for `phase` on this machine.
    pub fn new(phase: impl Into<String>) -> BenchReport {
        BenchReport {
            phase: phase.into(),
            machine: MachineInfo::detect(),
            criteria: Vec::new(),
            details: serde_json::Value::Object(Default::default()),
        }
    }

    /// Whether every criterion passed.
    pub fn all_pass(&self) -> bool {
        self.criteria.iter().all(|c| c.pass)
    }

    /// Writes `<dir>/<phase>.json` and returns its path.
    pub fn write_json(&self, dir: &Path) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{}.json", self.phase));
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&path, text + "\n")?;
        Ok(path)
    }

    /// The criteria as a fixed-width text table.
    pub fn table(&self) -> String {
        let header = [
            "criterion",
            "unit",
            "value",
            "baseline",
            "ratio",
            "target",
            "pass",
        ];
        let rows: Vec<[String; 7]> = self
            .criteria
            .iter()
            .map(|c| {
                [
                    c.name.clone(),
                    c.unit.clone(),
                    fmt_num(c.value),
                    fmt_num(c.baseline),
                    format!("{:.3}", c.ratio),
                    c.target.clone(),
                    if c.pass { "PASS" } else { "FAIL" }.to_string(),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = format!(
            "== bench {} ({} cores, {})\n",
            self.phase, self.machine.cores, self.machine.cpu
        );
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (cell, w) in cells.iter().zip(widths) {
                let _ = write!(s, "{cell:<w$}  ");
            }
            s.trim_end().to_string() + "\n"
        };
        out += &line(&header.map(String::from));
        for row in &rows {
            out += &line(row);
        }
        out
    }
}

fn fmt_num(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e6 || v.abs() < 1e-3) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trips_and_tables() {
        let mut r = BenchReport::new("pool");
        r.criteria.push(Criterion::lower_is_better(
            "alloc time",
            "ns",
            50.0,
            100.0,
            1.25,
        ));
        r.criteria.push(Criterion::higher_is_better(
            "hit ratio",
            "ratio",
            0.05,
            0.05,
            1.3,
        ));
        assert_eq!(r.criteria[0].ratio, 2.0);
        assert!(r.criteria[0].pass);
        assert!(!r.criteria[1].pass);
        assert!(!r.all_pass());
        let dir = std::env::temp_dir().join(format!("qvl-bench-test-{}", std::process::id()));
        let path = r.write_json(&dir).unwrap();
        let back: BenchReport =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back, r);
        let table = r.table();
        assert!(table.contains("alloc time"));
        assert!(table.contains("FAIL"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
