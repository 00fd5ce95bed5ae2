//! The phase report of `cargo xtask bench all`: `report.md`, `report.json`
//! and SVG charts under the output directory.
//!
//! Every phase module returns a [`BenchReport`]; this module puts them side
//! by side with the plan's success criterion of each phase and draws the
//! charts the issue asks for (hit ratio against capacity, tokens/s against
//! the KV budget, peak memory per phase). A phase adds a chart by putting a
//! `charts` array in its details (see [`ChartSpec`]); a few charts are read
//! from the details shapes the phases already write.

use anyhow::{Context, Result};
use qvl_core::bench::{BenchReport, MachineInfo};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// What the plan asks of each phase, in its words, beside the aim we set.
pub fn plan_criterion(phase: &str) -> &'static str {
    match phase {
        "model" => "base layer: decode close to the memory-bandwidth bound; batched prefill faster than token by token",
        "pool" => "allocation time 20% lower (aim: faster than glibc, on par with mimalloc, reserved <= 1.10x live)",
        "cache" => "hit rate 30% higher than LRU at the same capacity (and 1/3 of the LRU-to-Belady gap closed)",
        "compress" => "40% less memory at under 1% precision loss (aim: KV 3.5x smaller, perplexity within 1%)",
        "swap" => "sequences 2x longer at under 10% overhead (aim: 8x the KV budget at >= 90% throughput)",
        "tier" => "use every memory level, balancing speed and capacity (aim: weights 4x the RAM budget at >= 70% of the SSD bound)",
        "gc" => "peak memory 15% lower (aim: within 5% of the offline optimum)",
        "metrics" => "metrics cheap on hot paths",
        "e2e" => "all phases on against all off: identical outputs where lossless, bounded difference with compression",
        _ => "(no plan criterion recorded)",
    }
}

/// One phase's entry in the combined report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseEntry {
    /// The phase name.
    pub phase: String,
    /// The plan's criterion in words.
    pub plan_criterion: String,
    /// "ran", "failed" (the benchmark returned an error) or "not implemented".
    pub status: String,
    /// The error, when the benchmark failed.
    pub error: Option<String>,
    /// Seconds the phase took.
    pub seconds: f64,
    /// The phase's own report, when it ran.
    pub report: Option<BenchReport>,
}

/// The whole report (`report.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CombinedReport {
    /// UTC time the report was written, ISO 8601.
    pub generated_utc: String,
    /// Whether `--quick` sizes were used.
    pub quick: bool,
    /// Where it ran.
    pub machine: MachineInfo,
    /// One entry per phase, in phase order.
    pub phases: Vec<PhaseEntry>,
    /// The SVG files written beside the report.
    pub charts: Vec<String>,
}

impl CombinedReport {
    /// Criteria counted over every phase that ran: (passed, total).
    pub fn pass_count(&self) -> (usize, usize) {
        let criteria = self
            .phases
            .iter()
            .filter_map(|p| p.report.as_ref())
            .flat_map(|r| r.criteria.iter());
        criteria.fold((0, 0), |(pass, all), c| {
            (pass + usize::from(c.pass), all + 1)
        })
    }
}

/// A chart a phase asks for, in `details.charts`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChartSpec {
    /// File stem of the SVG (`cache-hit-ratio`).
    pub id: String,
    /// Title above the plot.
    pub title: String,
    /// Label of the x axis.
    pub x_label: String,
    /// Label of the y axis.
    pub y_label: String,
    /// `line` (series of points) or `bar` (one bar per label).
    #[serde(default = "default_kind")]
    pub kind: String,
    /// The lines, for `line` charts.
    #[serde(default)]
    pub series: Vec<Series>,
    /// The bars, for `bar` charts.
    #[serde(default)]
    pub bars: Vec<Bar>,
}

fn default_kind() -> String {
    "line".to_string()
}

/// One line of a line chart.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// (x, y) points, drawn in the given order.
    pub points: Vec<(f64, f64)>,
}

/// One bar of a bar chart.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bar {
    /// Label under the bar.
    pub label: String,
    /// Height.
    pub value: f64,
}

/// Writes `report.md`, `report.json` and the charts into `out_dir`; returns
/// the path of `report.md`.
pub fn write(report: &mut CombinedReport, out_dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let charts = collect_charts(report);
    report.charts.clear();
    for chart in &charts {
        let file = format!("{}.svg", chart.id);
        let path = out_dir.join(&file);
        std::fs::write(&path, render_svg(chart))
            .with_context(|| format!("writing {}", path.display()))?;
        report.charts.push(file);
    }
    let json_path = out_dir.join("report.json");
    let json = serde_json::to_string_pretty(report).context("serializing the report")?;
    std::fs::write(&json_path, json + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    let md_path = out_dir.join("report.md");
    std::fs::write(&md_path, markdown(report, &charts))
        .with_context(|| format!("writing {}", md_path.display()))?;
    Ok(md_path)
}

/// Every chart: the ones phases declare, then the ones read from known
/// details shapes (only when the phase did not declare a chart of that id).
fn collect_charts(report: &CombinedReport) -> Vec<ChartSpec> {
    let mut charts: Vec<ChartSpec> = Vec::new();
    for entry in &report.phases {
        let Some(r) = &entry.report else { continue };
        if let Some(list) = r.details.get("charts").and_then(Value::as_array) {
            for v in list {
                match serde_json::from_value::<ChartSpec>(v.clone()) {
                    Ok(c) => charts.push(c),
                    Err(e) => eprintln!(
                        "report: a chart in {}'s details is malformed ({e}); skipped",
                        r.phase
                    ),
                }
            }
        }
    }
    let known = |id: &str, charts: &[ChartSpec]| charts.iter().any(|c| c.id == id);
    if let Some(cache) = phase_details(report, "cache") {
        if !known("cache-hit-ratio", &charts) {
            if let Some(c) = cache_hit_ratio_chart(cache) {
                charts.push(c);
            }
        }
    }
    if let Some(swap) = phase_details(report, "swap") {
        if !known("swap-kv-budget", &charts) {
            if let Some(c) = swap_budget_chart(swap) {
                charts.push(c);
            }
        }
    }
    if let Some(e2e) = phase_details(report, "e2e") {
        if !known("e2e-peak-memory", &charts) {
            if let Some(c) = e2e_memory_chart(e2e) {
                charts.push(c);
            }
        }
    }
    charts
}

/// Decode tokens/s against the KV budget, swapped and all in RAM, per
/// model, from the swap phase's `sweeps[].runs[]` (`budget_fraction` "1/4",
/// `swap_median_tokens_per_s`, `host_median_tokens_per_s`).
fn swap_budget_chart(details: &Value) -> Option<ChartSpec> {
    let sweeps = details.get("sweeps")?.as_array()?;
    let mut series = Vec::new();
    for sweep in sweeps {
        let model = sweep.get("model")?.as_str()?;
        let short = model.split(" (").next().unwrap_or(model).trim();
        let mut swapped = Vec::new();
        let mut in_ram = Vec::new();
        for run in sweep.get("runs")?.as_array()? {
            let fraction = run.get("budget_fraction")?.as_str()?;
            let x = match fraction.split_once('/') {
                Some((n, d)) => n.trim().parse::<f64>().ok()? / d.trim().parse::<f64>().ok()?,
                None => fraction.parse().ok()?,
            };
            swapped.push((x, run.get("swap_median_tokens_per_s")?.as_f64()?));
            in_ram.push((x, run.get("host_median_tokens_per_s")?.as_f64()?));
        }
        swapped.sort_by(|a, b| a.0.total_cmp(&b.0));
        in_ram.sort_by(|a, b| a.0.total_cmp(&b.0));
        series.push(Series {
            name: format!("{short}, swapped"),
            points: swapped,
        });
        series.push(Series {
            name: format!("{short}, all in RAM"),
            points: in_ram,
        });
    }
    (!series.is_empty()).then(|| ChartSpec {
        id: "swap-kv-budget".into(),
        title: "Decode tokens/s against the KV budget".into(),
        x_label: "KV budget, share of the context's KV".into(),
        y_label: "tokens/s (median step)".into(),
        kind: "line".into(),
        series,
        bars: Vec::new(),
    })
}

/// Peak KV memory per phase combination and model, from the e2e phase's
/// `<model>.configs[]` (`config`, `kv_peak_bytes`).
fn e2e_memory_chart(details: &Value) -> Option<ChartSpec> {
    let mut bars = Vec::new();
    for (model, d) in details.as_object()? {
        let Some(configs) = d.get("configs").and_then(Value::as_array) else {
            continue;
        };
        for c in configs {
            let (Some(config), Some(bytes)) = (
                c.get("config").and_then(Value::as_str),
                c.get("kv_peak_bytes").and_then(Value::as_f64),
            ) else {
                continue;
            };
            bars.push(Bar {
                label: format!("{model} {config}"),
                value: bytes / (1u64 << 20) as f64,
            });
        }
    }
    (!bars.is_empty()).then(|| ChartSpec {
        id: "e2e-peak-memory".into(),
        title: "Peak KV memory per phase combination".into(),
        x_label: "model and phases".into(),
        y_label: "MiB".into(),
        kind: "bar".into(),
        series: Vec::new(),
        bars,
    })
}

fn phase_details<'a>(report: &'a CombinedReport, phase: &str) -> Option<&'a Value> {
    report
        .phases
        .iter()
        .filter(|p| p.phase == phase)
        .find_map(|p| p.report.as_ref())
        .map(|r| &r.details)
}

/// Hit ratio against capacity per policy, from the cache phase's
/// `mooncake.rows` (`policy`, `capacity_fraction`, `hit_ratio`).
fn cache_hit_ratio_chart(details: &Value) -> Option<ChartSpec> {
    let rows = details.get("mooncake")?.get("rows")?.as_array()?;
    let mut series: Vec<Series> = Vec::new();
    for row in rows {
        let policy = row.get("policy")?.as_str()?;
        let x = row.get("capacity_fraction")?.as_f64()? * 100.0;
        let y = row.get("hit_ratio")?.as_f64()?;
        match series.iter_mut().find(|s| s.name == policy) {
            Some(s) => s.points.push((x, y)),
            None => series.push(Series {
                name: policy.to_string(),
                points: vec![(x, y)],
            }),
        }
    }
    for s in &mut series {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    (!series.is_empty()).then(|| ChartSpec {
        id: "cache-hit-ratio".into(),
        title: "Hit ratio against capacity (Mooncake trace)".into(),
        x_label: "capacity, % of unique blocks".into(),
        y_label: "hit ratio".into(),
        kind: "line".into(),
        series,
        bars: Vec::new(),
    })
}

fn markdown(report: &CombinedReport, charts: &[ChartSpec]) -> String {
    let mut md = String::new();
    let (pass, total) = report.pass_count();
    let m = &report.machine;
    let _ = writeln!(md, "# qvl phase report\n");
    let _ = writeln!(
        md,
        "Written by `cargo xtask bench all{}` at {} on {} ({} cores, {:.1} GiB RAM, GPU: {}, disk: {}).",
        if report.quick { " --quick" } else { "" },
        report.generated_utc,
        m.cpu,
        m.cores,
        m.ram as f64 / (1u64 << 30) as f64,
        m.gpu,
        if m.disk.is_empty() { "unknown" } else { &m.disk },
    );
    let _ = writeln!(
        md,
        "Every value is measured against its baseline in the same run; ratios > 1 mean better than the baseline. {pass} of {total} criteria pass.{}\n",
        if report.quick {
            " Quick sizes: smaller than the full runs, so read the ratios as a smoke test."
        } else {
            ""
        }
    );
    let _ = writeln!(md, "## Summary\n");
    let _ = writeln!(
        md,
        "| phase | plan's criterion | criterion | value | baseline | ratio | target | result |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for entry in &report.phases {
        let plan = escape(&entry.plan_criterion);
        match &entry.report {
            Some(r) if !r.criteria.is_empty() => {
                for (i, c) in r.criteria.iter().enumerate() {
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {} {} | {} | {:.3} | {} | {} |",
                        if i == 0 { entry.phase.as_str() } else { "" },
                        if i == 0 { plan.as_str() } else { "" },
                        escape(&c.name),
                        num(c.value),
                        escape(&c.unit),
                        num(c.baseline),
                        c.ratio,
                        escape(&c.target),
                        if c.pass { "PASS" } else { "**FAIL**" },
                    );
                }
            }
            Some(_) => {
                let _ = writeln!(md, "| {} | {plan} | (no criteria) | | | | | |", entry.phase);
            }
            None => {
                let why = entry.error.as_deref().unwrap_or(&entry.status);
                let _ = writeln!(
                    md,
                    "| {} | {plan} | {} | | | | | **{}** |",
                    entry.phase,
                    escape(why),
                    entry.status.to_uppercase()
                );
            }
        }
    }
    if !charts.is_empty() {
        let _ = writeln!(md, "\n## Charts\n");
        for c in charts {
            let _ = writeln!(md, "![{}]({}.svg)\n", escape(&c.title), c.id);
        }
    }
    let _ = writeln!(md, "## Time per phase\n");
    let _ = writeln!(md, "| phase | seconds | status |");
    let _ = writeln!(md, "|---|---|---|");
    for e in &report.phases {
        let _ = writeln!(md, "| {} | {:.1} | {} |", e.phase, e.seconds, e.status);
    }
    let _ = writeln!(
        md,
        "\nThe raw numbers behind each criterion are in `<phase>.json` (`details`) beside this file."
    );
    md
}

fn escape(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn num(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e6 || v.abs() < 1e-3) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

/// An ISO 8601 UTC timestamp for `secs` since the Unix epoch.
pub fn iso_utc(secs: u64) -> String {
    // Civil-from-days (Howard Hinnant's algorithm), so no date crate is needed.
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];
const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 400.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 160.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
/// Extra bottom margin of bar charts, for their slanted labels.
const BAR_LABEL_ROOM: f64 = 60.0;

/// Draws a chart as a self-contained SVG document.
pub fn render_svg(chart: &ChartSpec) -> String {
    // Bar labels are long ("smollm2 lossless"): they are drawn slanted, in
    // a taller bottom margin, so neighbours do not overlap.
    let bar_label_room = if chart.kind == "bar" {
        BAR_LABEL_ROOM
    } else {
        0.0
    };
    let height = HEIGHT + bar_label_room;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        WIDTH / 2.0,
        xml(&chart.title)
    );
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = height - TOP - BOTTOM - bar_label_room;
    let finite = |v: f64| v.is_finite();
    let (x_min, x_max, y_max) = if chart.kind == "bar" {
        let y_max = chart
            .bars
            .iter()
            .map(|b| b.value)
            .filter(|v| finite(*v))
            .fold(0.0, f64::max);
        (0.0, chart.bars.len() as f64, y_max)
    } else {
        let xs = chart
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .filter(|v| finite(*v));
        let (lo, hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        });
        let y_max = chart
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .filter(|v| finite(*v))
            .fold(0.0, f64::max);
        if lo.is_finite() {
            (lo.min(0.0), if hi > lo { hi } else { lo + 1.0 }, y_max)
        } else {
            (0.0, 1.0, y_max)
        }
    };
    let y_ticks = nice_ticks(0.0, if y_max > 0.0 { y_max } else { 1.0 });
    let y_top = y_ticks
        .last()
        .copied()
        .unwrap_or(1.0)
        .max(f64::MIN_POSITIVE);
    let sx = |x: f64| LEFT + (x - x_min) / (x_max - x_min) * plot_w;
    let sy = |y: f64| TOP + plot_h - y / y_top * plot_h;
    // Axes, grid and y ticks.
    for t in &y_ticks {
        let y = sy(*t);
        let _ = writeln!(
            svg,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT + plot_w,
            LEFT - 6.0,
            y + 4.0,
            tick_label(*t)
        );
    }
    let _ = writeln!(
        svg,
        "<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{:.1}\" stroke=\"black\"/><line x1=\"{LEFT}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>",
        TOP + plot_h,
        TOP + plot_h,
        LEFT + plot_w,
        TOP + plot_h
    );
    let _ = writeln!(
        svg,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text><text transform=\"translate(16 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        LEFT + plot_w / 2.0,
        height - 14.0,
        xml(&chart.x_label),
        TOP + plot_h / 2.0,
        xml(&chart.y_label)
    );
    if chart.kind == "bar" {
        let slot = plot_w / chart.bars.len().max(1) as f64;
        for (i, bar) in chart.bars.iter().enumerate() {
            let v = if bar.value.is_finite() {
                bar.value.max(0.0)
            } else {
                0.0
            };
            let x = LEFT + slot * i as f64 + slot * 0.15;
            let y = sy(v);
            let _ = writeln!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/><text transform=\"translate({:.1} {:.1}) rotate(-35)\" text-anchor=\"end\">{}</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{}</text>",
                slot * 0.7,
                TOP + plot_h - y,
                COLORS[i % COLORS.len()],
                x + slot * 0.35 + 4.0,
                TOP + plot_h + 14.0,
                xml(&bar.label),
                x + slot * 0.35,
                y - 4.0,
                tick_label(v)
            );
        }
    } else {
        for t in nice_ticks(x_min, x_max) {
            if t < x_min - 1e-12 || t > x_max + 1e-12 {
                continue;
            }
            let x = sx(t);
            let _ = writeln!(
                svg,
                "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"black\"/><text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                TOP + plot_h,
                TOP + plot_h + 5.0,
                TOP + plot_h + 18.0,
                tick_label(t)
            );
        }
        for (i, s) in chart.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let pts: Vec<String> = s
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.1)))
                .collect();
            let _ = writeln!(
                svg,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
                pts.join(" ")
            );
            for p in &pts {
                let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(
                    svg,
                    "<circle cx=\"{x}\" cy=\"{y}\" r=\"3\" fill=\"{color}\"/>"
                );
            }
            let ly = TOP + 10.0 + 18.0 * i as f64;
            let lx = LEFT + plot_w + 12.0;
            let _ = writeln!(
                svg,
                "<line x1=\"{lx:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{color}\" stroke-width=\"2\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                lx + 18.0,
                lx + 24.0,
                ly + 4.0,
                xml(&s.name)
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// About five round tick values covering [lo, hi].
fn nice_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).abs().max(1e-12);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= 6.0)
        .unwrap_or(10.0 * mag);
    let start = (lo / step).floor() * step;
    let mut ticks = Vec::new();
    while ticks.len() < 20 {
        let t = start + step * ticks.len() as f64;
        if t > hi + step * 0.999 {
            break;
        }
        ticks.push(t);
    }
    ticks
}

fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1e9 {
        format!("{:.1}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 10.0 {
        format!("{v:.0}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use qvl_core::bench::Criterion;
    use serde_json::json;

    fn sample() -> CombinedReport {
        let mut cache = BenchReport::new("cache");
        cache.criteria.push(Criterion::higher_is_better(
            "hit ratio at 1%",
            "ratio",
            0.10,
            0.05,
            1.3,
        ));
        cache.details = json!({"mooncake": {"rows": [
            {"policy": "lru", "capacity_fraction": 0.01, "hit_ratio": 0.05},
            {"policy": "lru", "capacity_fraction": 0.05, "hit_ratio": 0.19},
            {"policy": "belady", "capacity_fraction": 0.01, "hit_ratio": 0.24},
            {"policy": "belady", "capacity_fraction": 0.05, "hit_ratio": 0.36}
        ]}, "charts": [{"id": "mem", "title": "peak <memory>", "x_label": "phase", "y_label": "MiB",
            "kind": "bar", "bars": [{"label": "off", "value": 120.0}, {"label": "on", "value": 80.0}]}]});
        let mut swap = BenchReport::new("swap");
        swap.details = json!({"sweeps": [{"model": "2B-shaped decoder (hidden 1024)", "runs": [
            {"budget_fraction": "1/1", "swap_median_tokens_per_s": 50.0, "host_median_tokens_per_s": 51.0},
            {"budget_fraction": "1/8", "swap_median_tokens_per_s": 40.0, "host_median_tokens_per_s": 52.0}
        ]}]});
        let mut e2e = BenchReport::new("e2e");
        e2e.details = json!({"smollm2": {"configs": [
            {"config": "off", "kv_peak_bytes": 3670016.0},
            {"config": "all", "kv_peak_bytes": 1677721.6}
        ]}, "qwen3vl": {"skipped": "no checkpoint"}});
        let entry = |phase: &str, report| PhaseEntry {
            phase: phase.into(),
            plan_criterion: plan_criterion(phase).into(),
            status: "ran".into(),
            error: None,
            seconds: 1.0,
            report: Some(report),
        };
        CombinedReport {
            generated_utc: iso_utc(0),
            quick: true,
            machine: MachineInfo::default(),
            phases: vec![
                PhaseEntry {
                    phase: "cache".into(),
                    plan_criterion: plan_criterion("cache").into(),
                    status: "ran".into(),
                    error: None,
                    seconds: 1.0,
                    report: Some(cache),
                },
                PhaseEntry {
                    phase: "tier".into(),
                    plan_criterion: plan_criterion("tier").into(),
                    status: "failed".into(),
                    error: Some("disk | full".into()),
                    seconds: 0.5,
                    report: None,
                },
                entry("swap", swap),
                entry("e2e", e2e),
            ],
            charts: Vec::new(),
        }
    }

    #[test]
    fn bar_labels_are_slanted_below_the_plot() {
        let chart = ChartSpec {
            id: "e2e-peak-memory".into(),
            title: "Peak KV memory".into(),
            x_label: "model and phases".into(),
            y_label: "MiB".into(),
            kind: "bar".into(),
            series: Vec::new(),
            bars: ["qwen3vl off", "qwen3vl lossless", "smollm2 all"]
                .iter()
                .map(|l| Bar {
                    label: (*l).into(),
                    value: 2.0,
                })
                .collect(),
        };
        let svg = render_svg(&chart);
        assert!(svg.contains(&format!("height=\"{}\"", HEIGHT + BAR_LABEL_ROOM)));
        assert_eq!(svg.matches("rotate(-35)").count(), 3, "{svg}");
        assert!(svg.contains(">qwen3vl lossless</text>"));
    }

    #[test]
    fn writes_markdown_json_and_charts() {
        let dir = std::env::temp_dir().join(format!("qvl-report-test-{}", std::process::id()));
        let mut report = sample();
        let md_path = write(&mut report, &dir).unwrap();
        let md = std::fs::read_to_string(&md_path).unwrap();
        assert!(md.contains("| cache | hit rate 30% higher"), "{md}");
        assert!(md.contains("PASS"));
        assert!(
            md.contains("disk \\| full"),
            "pipes in errors are escaped: {md}"
        );
        assert!(md.contains("1 of 1 criteria pass"));
        assert!(md.contains("![Hit ratio against capacity (Mooncake trace)](cache-hit-ratio.svg)"));
        assert_eq!(
            report.charts,
            vec![
                "mem.svg",
                "cache-hit-ratio.svg",
                "swap-kv-budget.svg",
                "e2e-peak-memory.svg"
            ]
        );
        let swap_svg = std::fs::read_to_string(dir.join("swap-kv-budget.svg")).unwrap();
        assert!(
            swap_svg.contains("2B-shaped decoder, swapped"),
            "{swap_svg}"
        );
        let e2e_svg = std::fs::read_to_string(dir.join("e2e-peak-memory.svg")).unwrap();
        assert_eq!(
            e2e_svg.matches("<rect x=").count(),
            2,
            "skipped models draw no bar"
        );
        let svg = std::fs::read_to_string(dir.join("cache-hit-ratio.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2, "one line per policy");
        let bar = std::fs::read_to_string(dir.join("mem.svg")).unwrap();
        assert!(bar.contains("peak &lt;memory&gt;"), "titles are escaped");
        assert_eq!(bar.matches("<rect x=").count(), 2);
        let back: CombinedReport =
            serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap())
                .unwrap();
        assert_eq!(back.phases.len(), 4);
        assert_eq!(back.phases[1].error.as_deref(), Some("disk | full"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn timestamps_and_ticks() {
        assert_eq!(iso_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_utc(1_795_825_089), "2026-11-28T00:18:09Z");
        assert_eq!(iso_utc(951_782_400), "2000-02-29T00:00:00Z");
        let ticks = nice_ticks(0.0, 0.37);
        assert_eq!(ticks.len(), 5);
        assert!((ticks[4] - 0.4).abs() < 1e-12, "{ticks:?}");
        assert_eq!(nice_ticks(0.0, 10.0).last().copied(), Some(10.0));
    }
}
