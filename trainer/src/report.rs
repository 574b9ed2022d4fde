//! `shears report RUN`: SVG plots of a run (loss; per-domain loss against its reference;
//! domain weights; expected sparsity per module against the target; λ) and an HTML page with
//! them, the plan and the final table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde_json::Value;
use shears_core::error::IoContext;
use shears_core::fsutil::StagedDir;
use shears_core::{Error, Result};

use crate::run_dir::{read_metrics, PLAN, RESOLVED};

/// A named line: `(x, y)` points, dashed or not.
struct Line {
    name: String,
    points: Vec<(f64, f64)>,
    dashed: bool,
    color: usize,
}

fn plot(path: &Path, title: &str, y_desc: &str, lines: &[Line]) -> Result<()> {
    let pts = lines.iter().flat_map(|l| l.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        if y.is_finite() {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let err = |e: String| Error::format(path, format!("cannot draw: {e}"));
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_desc)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for l in lines {
        let color = Palette99::pick(l.color).to_rgba();
        let pts: Vec<(f64, f64)> = l
            .points
            .iter()
            .copied()
            .filter(|p| p.1.is_finite())
            .collect();
        let anno = if l.dashed {
            chart
                .draw_series(DashedLineSeries::new(pts, 6, 4, color.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
        } else {
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
        };
        anno.label(l.name.clone()).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
        });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

fn series(recs: &[&Value], x: &str, y: impl Fn(&Value) -> Option<f64>) -> Vec<(f64, f64)> {
    recs.iter()
        .filter_map(|r| Some((r[x].as_f64()?, y(r)?)))
        .collect()
}

fn keys(recs: &[&Value], field: &str) -> Vec<String> {
    let mut k: Vec<String> = recs
        .iter()
        .filter_map(|r| r[field].as_object())
        .flat_map(|o| o.keys().cloned())
        .collect();
    k.sort();
    k.dedup();
    k
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Write the report of `run` into `out` (default `RUN/report`); returns the HTML page's path.
pub fn write_report(run: &Path, out: Option<&Path>) -> Result<PathBuf> {
    let recs = read_metrics(run)?;
    let steps: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "step").collect();
    let evals: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "eval").collect();
    if steps.is_empty() {
        return Err(Error::format(
            run.join(crate::run_dir::METRICS),
            "has no step records yet",
        ));
    }
    let out = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| run.join("report"));
    let stage = StagedDir::new(&out, true)?;
    let dir = stage.path();
    let mut figures: Vec<(&str, &str)> = vec![];

    let mut loss = vec![
        Line {
            name: "loss".into(),
            points: series(&steps, "step", |r| r["loss"].as_f64()),
            dashed: false,
            color: 0,
        },
        Line {
            name: "lm loss".into(),
            points: series(&steps, "step", |r| r["lm_loss"].as_f64()),
            dashed: false,
            color: 1,
        },
    ];
    if steps.iter().any(|r| r.get("lagrangian_loss").is_some()) {
        loss.push(Line {
            name: "lagrangian loss".into(),
            points: series(&steps, "step", |r| r["lagrangian_loss"].as_f64()),
            dashed: false,
            color: 2,
        });
    }
    plot(&dir.join("loss.svg"), "Training loss", "nats", &loss)?;
    figures.push(("loss.svg", "Loss per step"));

    let domains = keys(&evals, "domain_loss");
    if !domains.is_empty() {
        let mut lines = vec![];
        for (i, d) in domains.iter().enumerate() {
            lines.push(Line {
                name: d.clone(),
                points: series(&evals, "step", |r| r["domain_loss"][d].as_f64()),
                dashed: false,
                color: i,
            });
            lines.push(Line {
                name: format!("{d} reference"),
                points: series(&evals, "step", |r| r["reference_loss"][d].as_f64()),
                dashed: true,
                color: i,
            });
        }
        plot(
            &dir.join("domain_loss.svg"),
            "Per-domain eval loss (dashed: reference)",
            "nats",
            &lines,
        )?;
        figures.push((
            "domain_loss.svg",
            "Per-domain eval loss against the reference",
        ));
        let lines: Vec<Line> = domains
            .iter()
            .enumerate()
            .map(|(i, d)| Line {
                name: d.clone(),
                points: series(&evals, "step", |r| r["domain_weights"][d].as_f64()),
                dashed: false,
                color: i,
            })
            .collect();
        plot(
            &dir.join("domain_weights.svg"),
            "Domain weights (after each update)",
            "weight",
            &lines,
        )?;
        figures.push(("domain_weights.svg", "Domain weights"));
    }
    let modules = keys(&evals, "expected_sparsity");
    if !modules.is_empty() {
        let mut lines = vec![];
        for (i, m) in modules.iter().enumerate() {
            lines.push(Line {
                name: m.clone(),
                points: series(&evals, "step", |r| r["expected_sparsity"][m].as_f64()),
                dashed: false,
                color: i,
            });
            lines.push(Line {
                name: format!("{m} target"),
                points: series(&evals, "step", |r| r["target_sparsity"][m].as_f64()),
                dashed: true,
                color: i,
            });
        }
        plot(
            &dir.join("sparsity.svg"),
            "Expected sparsity per module (dashed: target)",
            "sparsity",
            &lines,
        )?;
        figures.push(("sparsity.svg", "Expected sparsity per module"));
        let mut lines = vec![];
        for (i, m) in modules.iter().enumerate() {
            lines.push(Line {
                name: format!("{m} λ1"),
                points: series(&evals, "step", |r| r["lambda"][m][0].as_f64()),
                dashed: false,
                color: i,
            });
            lines.push(Line {
                name: format!("{m} λ2"),
                points: series(&evals, "step", |r| r["lambda"][m][1].as_f64()),
                dashed: true,
                color: i,
            });
        }
        plot(&dir.join("lambda.svg"), "Lagrange multipliers", "λ", &lines)?;
        figures.push(("lambda.svg", "Lagrange multipliers (solid λ1, dashed λ2)"));
    }
    plot(
        &dir.join("grad_norm.svg"),
        "Gradient norm (before clipping)",
        "L2 norm",
        &[Line {
            name: "grad norm".into(),
            points: series(&steps, "step", |r| r["grad_norm"].as_f64()),
            dashed: false,
            color: 3,
        }],
    )?;
    figures.push(("grad_norm.svg", "Gradient norm"));

    // The page.
    let plan = std::fs::read_to_string(run.join(PLAN)).unwrap_or_default();
    let resolved = std::fs::read_to_string(run.join(RESOLVED)).unwrap_or_default();
    let last_step = steps.last().expect("steps");
    let mut html = String::new();
    html.push_str("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Shears run report</title>\n<style>body{font-family:sans-serif;max-width:960px;margin:auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}pre{background:#f6f6f6;padding:8px;overflow:auto}</style></head><body>\n");
    html.push_str(&format!(
        "<h1>Run {}</h1>\n",
        html_escape(&run.display().to_string())
    ));
    html.push_str(&format!(
        "<p>{} steps logged; last step loss {:.4}, lm loss {:.4}; {} evaluations; {} skipped steps.</p>\n",
        steps.len(),
        last_step["loss"].as_f64().unwrap_or(f64::NAN),
        last_step["lm_loss"].as_f64().unwrap_or(f64::NAN),
        evals.len(),
        steps.iter().filter(|r| r["skipped"] == true).count()
    ));
    if let Some(last) = evals.last() {
        html.push_str(&format!("<h2>Final evaluation (step {})</h2>\n<table><tr><th>domain</th><th>loss</th><th>perplexity</th><th>reference</th><th>excess</th><th>weight</th></tr>\n", last["step"]));
        let mut rows: BTreeMap<&str, String> = BTreeMap::new();
        for d in &domains {
            let l = last["domain_loss"][d].as_f64().unwrap_or(f64::NAN);
            let r = last["reference_loss"][d].as_f64().unwrap_or(f64::NAN);
            rows.insert(
                d,
                format!(
                    "<tr><td style=\"text-align:left\">{}</td><td>{l:.4}</td><td>{:.2}</td><td>{r:.4}</td><td>{:+.4}</td><td>{:.4}</td></tr>\n",
                    html_escape(d),
                    l.exp(),
                    l - r,
                    last["domain_weights"][d].as_f64().unwrap_or(f64::NAN)
                ),
            );
        }
        html.extend(rows.into_values());
        html.push_str("</table>\n");
        if let Some(es) = last["expected_sparsity"].as_object() {
            html.push_str("<h3>Expected sparsity</h3>\n<table><tr><th>module</th><th>expected</th><th>target</th><th>λ1</th><th>λ2</th></tr>\n");
            for (m, e) in es {
                html.push_str(&format!(
                    "<tr><td style=\"text-align:left\">{m}</td><td>{:.4}</td><td>{:.4}</td><td>{:.3}</td><td>{:.3}</td></tr>\n",
                    e.as_f64().unwrap_or(f64::NAN),
                    last["final_target_sparsity"][m].as_f64().unwrap_or(f64::NAN),
                    last["lambda"][m][0].as_f64().unwrap_or(f64::NAN),
                    last["lambda"][m][1].as_f64().unwrap_or(f64::NAN)
                ));
            }
            html.push_str(&format!(
                "</table>\n<p>Expected prunable parameters {:.0}; target {}.</p>\n",
                last["expected_prunable_params"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
                last["target_prunable_params"]
            ));
        }
    }
    for (file, caption) in &figures {
        html.push_str(&format!(
            "<h2>{caption}</h2>\n<img src=\"{file}\" alt=\"{caption}\" width=\"900\">\n"
        ));
    }
    html.push_str(&format!(
        "<h2>Plan as given</h2>\n<pre>{}</pre>\n",
        html_escape(&plan)
    ));
    html.push_str(&format!(
        "<h2>Plan as resolved</h2>\n<pre>{}</pre>\n",
        html_escape(&resolved)
    ));
    html.push_str("</body></html>\n");
    let page = dir.join("index.html");
    std::fs::write(&page, html).at(&page, "cannot write")?;
    let out = stage.commit()?;
    Ok(out.join("index.html"))
}
