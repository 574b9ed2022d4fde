//! `shears report RUN`: SVG plots of a run (loss; per-domain loss against its reference;
//! domain weights; expected sparsity per module against the target; λ) and an HTML page with
//! them, the plan and the final table. It reads the run's typed records
//! ([`shears_trainer::records`]) and nothing else of the trainer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use shears_core::fsutil::StagedDir;
use shears_core::{Error, Result};
use shears_pruning::PruneModule;
use shears_trainer::records::{read_metrics, EvalRecord, MetricRecord, StepRecord};
use shears_trainer::run_dir::{METRICS, PLAN, RESOLVED};

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

fn series<R>(
    recs: &[&R],
    step: impl Fn(&R) -> usize,
    y: impl Fn(&R) -> Option<f64>,
) -> Vec<(f64, f64)> {
    recs.iter()
        .filter_map(|r| Some((step(r) as f64, y(r)?)))
        .collect()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The domains and pruned modules seen in any evaluation.
fn domains_and_modules(evals: &[&EvalRecord]) -> (Vec<String>, Vec<PruneModule>) {
    let mut domains: Vec<String> = evals
        .iter()
        .flat_map(|r| r.domain_loss.keys().cloned())
        .collect();
    domains.sort();
    domains.dedup();
    let mut modules: Vec<PruneModule> = evals
        .iter()
        .filter_map(|r| r.extras.pruning.as_ref())
        .flat_map(|p| p.expected_sparsity.modules())
        .collect();
    modules.sort();
    modules.dedup();
    (domains, modules)
}

/// A figure and the lines in it.
struct Figure {
    file: &'static str,
    title: &'static str,
    y_desc: &'static str,
    caption: &'static str,
    lines: Vec<Line>,
}

fn step_no(r: &StepRecord) -> usize {
    r.step
}

fn eval_no(r: &EvalRecord) -> usize {
    r.step
}

/// A solid line and its dashed companion per key.
fn paired<K: Clone>(
    evals: &[&EvalRecord],
    keys: &[K],
    name: impl Fn(&K) -> String,
    solid: (&str, impl Fn(&EvalRecord, &K) -> Option<f64>),
    dashed: (&str, impl Fn(&EvalRecord, &K) -> Option<f64>),
) -> Vec<Line> {
    let mut lines = vec![];
    for (i, k) in keys.iter().enumerate() {
        lines.push(Line {
            name: format!("{}{}", name(k), solid.0),
            points: series(evals, eval_no, |r| (solid.1)(r, k)),
            dashed: false,
            color: i,
        });
        lines.push(Line {
            name: format!("{}{}", name(k), dashed.0),
            points: series(evals, eval_no, |r| (dashed.1)(r, k)),
            dashed: true,
            color: i,
        });
    }
    lines
}

fn figures(steps: &[&StepRecord], evals: &[&EvalRecord]) -> Vec<Figure> {
    let (domains, modules) = domains_and_modules(evals);
    let mut loss = vec![
        Line {
            name: "loss".into(),
            points: series(steps, step_no, |r| Some(r.loss.0)),
            dashed: false,
            color: 0,
        },
        Line {
            name: "lm loss".into(),
            points: series(steps, step_no, |r| Some(r.lm_loss.0)),
            dashed: false,
            color: 1,
        },
    ];
    if steps.iter().any(|r| r.lagrangian_loss.is_some()) {
        loss.push(Line {
            name: "lagrangian loss".into(),
            points: series(steps, step_no, |r| r.lagrangian_loss.map(|l| l.0)),
            dashed: false,
            color: 2,
        });
    }
    let mut out = vec![Figure {
        file: "loss.svg",
        title: "Training loss",
        y_desc: "nats",
        caption: "Loss per step",
        lines: loss,
    }];
    if !domains.is_empty() {
        out.push(Figure {
            file: "domain_loss.svg",
            title: "Per-domain eval loss (dashed: reference)",
            y_desc: "nats",
            caption: "Per-domain eval loss against the reference",
            lines: paired(
                evals,
                &domains,
                |d| d.clone(),
                ("", |r: &EvalRecord, d: &String| {
                    r.domain_loss.get(d).copied()
                }),
                (" reference", |r: &EvalRecord, d: &String| {
                    r.reference_loss.get(d).copied()
                }),
            ),
        });
        out.push(Figure {
            file: "domain_weights.svg",
            title: "Domain weights (after each update)",
            y_desc: "weight",
            caption: "Domain weights",
            lines: domains
                .iter()
                .enumerate()
                .map(|(i, d)| Line {
                    name: d.clone(),
                    points: series(evals, eval_no, |r| r.domain_weights.get(d).copied()),
                    dashed: false,
                    color: i,
                })
                .collect(),
        });
    }
    if !modules.is_empty() {
        let p = |r: &EvalRecord| r.extras.pruning.clone();
        out.push(Figure {
            file: "sparsity.svg",
            title: "Expected sparsity per module (dashed: target)",
            y_desc: "sparsity",
            caption: "Expected sparsity per module",
            lines: paired(
                evals,
                &modules,
                |m| m.name().to_string(),
                ("", |r: &EvalRecord, m: &PruneModule| {
                    p(r)?.expected_sparsity.get(*m).copied()
                }),
                (" target", |r: &EvalRecord, m: &PruneModule| {
                    p(r)?.target_sparsity.get(*m).copied()
                }),
            ),
        });
        out.push(Figure {
            file: "lambda.svg",
            title: "Lagrange multipliers",
            y_desc: "λ",
            caption: "Lagrange multipliers (solid λ1, dashed λ2)",
            lines: paired(
                evals,
                &modules,
                |m| m.name().to_string(),
                (" λ1", |r: &EvalRecord, m: &PruneModule| {
                    Some(p(r)?.lambda.get(*m)?[0] as f64)
                }),
                (" λ2", |r: &EvalRecord, m: &PruneModule| {
                    Some(p(r)?.lambda.get(*m)?[1] as f64)
                }),
            ),
        });
    }
    out.push(Figure {
        file: "grad_norm.svg",
        title: "Gradient norm (before clipping)",
        y_desc: "L2 norm",
        caption: "Gradient norm",
        lines: vec![Line {
            name: "grad norm".into(),
            points: series(steps, step_no, |r| Some(r.grad_norm.0)),
            dashed: false,
            color: 3,
        }],
    });
    out
}

/// The final evaluation's tables.
fn final_tables(last: &EvalRecord) -> String {
    let mut html = format!("<h2>Final evaluation (step {})</h2>\n<table><tr><th>domain</th><th>loss</th><th>perplexity</th><th>reference</th><th>excess</th><th>weight</th></tr>\n", last.step);
    let get = |m: &BTreeMap<String, f64>, d: &str| m.get(d).copied().unwrap_or(f64::NAN);
    for (d, &l) in &last.domain_loss {
        let r = get(&last.reference_loss, d);
        html.push_str(&format!(
            "<tr><td style=\"text-align:left\">{}</td><td>{l:.4}</td><td>{:.2}</td><td>{r:.4}</td><td>{:+.4}</td><td>{:.4}</td></tr>\n",
            html_escape(d),
            l.exp(),
            l - r,
            get(&last.domain_weights, d)
        ));
    }
    html.push_str("</table>\n");
    if let Some(p) = &last.extras.pruning {
        html.push_str("<h3>Expected sparsity</h3>\n<table><tr><th>module</th><th>expected</th><th>target</th><th>λ1</th><th>λ2</th></tr>\n");
        for (m, e) in p.expected_sparsity.iter() {
            let [l1, l2] = p.lambda.get(m).copied().unwrap_or([f32::NAN; 2]);
            html.push_str(&format!(
                "<tr><td style=\"text-align:left\">{}</td><td>{e:.4}</td><td>{:.4}</td><td>{l1:.3}</td><td>{l2:.3}</td></tr>\n",
                m.name(),
                p.final_target_sparsity.get(m).copied().unwrap_or(f64::NAN),
            ));
        }
        html.push_str(&format!(
            "</table>\n<p>Expected prunable parameters {:.0}; target {}.</p>\n",
            p.expected_prunable_params, p.target_prunable_params
        ));
    }
    html
}

/// The HTML page: summary line, final tables, figures, and the plan as given and resolved.
fn page(run: &Path, steps: &[&StepRecord], evals: &[&EvalRecord], figures: &[Figure]) -> String {
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
        last_step.loss.0,
        last_step.lm_loss.0,
        evals.len(),
        steps.iter().filter(|r| r.skipped).count()
    ));
    if let Some(last) = evals.last() {
        html.push_str(&final_tables(last));
    }
    for f in figures {
        html.push_str(&format!(
            "<h2>{c}</h2>\n<img src=\"{file}\" alt=\"{c}\" width=\"900\">\n",
            c = f.caption,
            file = f.file
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
    html
}

/// Write the report of `run` into `out` (default `RUN/report`); returns the HTML page's path.
/// `shears report`.
#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// Run directory (of `shears prune` or `shears train`).
    pub run: PathBuf,
    /// Output directory (default: RUN/report).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `shears report`: write the report and print the page's path.
pub fn report(a: ReportArgs) -> anyhow::Result<()> {
    let page = write_report(&a.run, a.out.as_deref())?;
    println!("{}", page.display());
    Ok(())
}

pub fn write_report(run: &Path, out: Option<&Path>) -> Result<PathBuf> {
    let recs = read_metrics(run)?;
    let steps: Vec<&StepRecord> = recs
        .iter()
        .filter_map(|r| match r {
            MetricRecord::Step(s) => Some(s),
            _ => None,
        })
        .collect();
    let evals: Vec<&EvalRecord> = recs
        .iter()
        .filter_map(|r| match r {
            MetricRecord::Eval(e) => Some(&**e),
            _ => None,
        })
        .collect();
    if steps.is_empty() {
        return Err(Error::format(run.join(METRICS), "has no step records yet"));
    }
    let out = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| run.join("report"));
    if shears_core::fsutil::resolved(run).starts_with(shears_core::fsutil::resolved(&out)) {
        return Err(Error::format(
            &out,
            format!(
                "the report would replace the run {} it is made from; choose another --out",
                run.display()
            ),
        ));
    }
    let stage = StagedDir::replacing(&out, "index.html")?;
    let figures = figures(&steps, &evals);
    for f in &figures {
        plot(&stage.path().join(f.file), f.title, f.y_desc, &f.lines)?;
    }
    let page_path = stage.path().join("index.html");
    shears_core::fsutil::write_new(&page_path, page(run, &steps, &evals, &figures).as_bytes())?;
    let out = stage.commit()?;
    Ok(out.join("index.html"))
}
