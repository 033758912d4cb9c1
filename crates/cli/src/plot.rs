//! `reel plot`: curves of chosen metrics from a `metrics.jsonl` against `step`, one panel per
//! key, as a PNG (plotters' bitmap backend). Text is drawn with DejaVu Sans Mono, bundled in
//! `crates/cli/assets/` with its licence, so no system font is looked up.

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::Path;
use std::sync::Once;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
const FAMILY: &str = "reel-mono";

/// Keys plotted when none are asked for (those present in the file).
pub const DEFAULT_KEYS: &[&str] = &[
    "loss",
    "reward_mean",
    "accuracy",
    "format_rate",
    "kl",
    "entropy",
    "response_len_mean",
    "eval_loss",
];

fn register() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = register_font(FAMILY, FontStyle::Normal, FONT)
            .map_err(|_| anyhow!("the bundled font does not parse"));
    });
    res
}

/// The (step, value) points of each key in `metrics` (JSONL); a line without `step` counts as
/// its line number; null values are skipped. A key no line has is an error naming it.
pub fn read_series(metrics: &Path, keys: &[String]) -> Result<Vec<Vec<(f64, f64)>>> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let mut series = vec![Vec::new(); keys.len()];
    let mut seen_keys = std::collections::BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: bad JSON", metrics.display(), i + 1))?;
        let Some(obj) = v.as_object() else {
            bail!("{}:{}: not a JSON object", metrics.display(), i + 1);
        };
        seen_keys.extend(obj.keys().cloned());
        let step = obj
            .get("step")
            .and_then(|s| s.as_f64())
            .unwrap_or((i + 1) as f64);
        for (k, key) in keys.iter().enumerate() {
            if let Some(x) = obj.get(key).and_then(|x| x.as_f64()) {
                if x.is_finite() {
                    series[k].push((step, x));
                }
            }
        }
    }
    for (k, key) in keys.iter().enumerate() {
        if series[k].is_empty() {
            let known: Vec<_> = seen_keys.into_iter().collect();
            bail!(
                "{}: no numeric values for key `{key}` (keys in the file: {})",
                metrics.display(),
                known.join(", ")
            );
        }
    }
    Ok(series)
}

/// The default keys that `metrics` has.
pub fn default_keys(metrics: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let keys: Vec<String> = DEFAULT_KEYS
        .iter()
        .filter(|k| text.contains(&format!("\"{k}\":")))
        .map(|k| k.to_string())
        .collect();
    if keys.is_empty() {
        bail!(
            "{}: none of the default keys ({}); pass --keys",
            metrics.display(),
            DEFAULT_KEYS.join(",")
        );
    }
    Ok(keys)
}

/// Draws one panel per key (stacked) into a `width × height` PNG at `out`.
pub fn plot(metrics: &Path, keys: &[String], out: &Path, width: u32, height: u32) -> Result<()> {
    if keys.is_empty() {
        bail!("no keys to plot");
    }
    if width < 100 || height < 60 * keys.len() as u32 {
        bail!(
            "a {width}×{height} image is too small for {} panels",
            keys.len()
        );
    }
    let series = read_series(metrics, keys)?;
    register()?;
    let draw_err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", out.display());
    let root = BitMapBackend::new(out, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(&e))?;
    let panels = root.split_evenly((keys.len(), 1));
    for ((area, key), pts) in panels.iter().zip(keys).zip(&series) {
        let (x0, x1) = pts
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
                (a.min(p.0), b.max(p.0))
            });
        let (y0, y1) = pts
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
                (a.min(p.1), b.max(p.1))
            });
        let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
        let pad = if y1 > y0 {
            0.05 * (y1 - y0)
        } else {
            0.5 * y0.abs().max(1.0)
        };
        let mut chart = ChartBuilder::on(area)
            .caption(key, (FAMILY, 16))
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
            .map_err(|e| draw_err(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(key.as_str())
            .label_style((FAMILY, 12))
            .axis_desc_style((FAMILY, 13))
            .draw()
            .map_err(|e| draw_err(&e))?;
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), &BLUE))
            .map_err(|e| draw_err(&e))?;
        if pts.len() == 1 {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))
                .map_err(|e| draw_err(&e))?;
        }
    }
    root.present().map_err(|e| draw_err(&e))?;
    Ok(())
}
