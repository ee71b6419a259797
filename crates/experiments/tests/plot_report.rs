//! The figure and report modules: every figure kind renders to SVG and PNG, bad input is an
//! error (never a panic), and reports render the same content to Markdown and HTML.

use experiments::ExperimentError;
use experiments::plot::{Heatmap, LineChart, Series, ViolinPlot};
use experiments::report::{Claim, Report, Verdict};
use std::path::PathBuf;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("experiments-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn non_empty(paths: &[PathBuf]) {
    for p in paths {
        let len = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(len > 0, "{} missing or empty", p.display());
    }
}

#[test]
fn every_figure_kind_renders_svg_and_png() {
    let dir = temp_dir("plots");
    let x: Vec<f64> = (1..=20).map(|k| k as f64 * 10.0).collect();
    let y: Vec<f64> = x.iter().map(|v| 1.0 / v).collect();
    let lo: Vec<f64> = y.iter().map(|v| 0.8 * v).collect();
    let hi: Vec<f64> = y.iter().map(|v| 1.2 * v).collect();
    let mut y_nan = y.clone();
    y_nan[3] = f64::NAN;
    y_nan[5] = f64::INFINITY;
    for (log_x, log_y) in [(false, false), (true, false), (false, true), (true, true)] {
        let chart = LineChart::new("decay ± band")
            .x_label("n")
            .y_label("value")
            .log_x(log_x)
            .log_y(log_y)
            .series(Series::new("measured", x.clone(), y_nan.clone()).band(lo.clone(), hi.clone()))
            .series(Series::theory("theory", x.clone(), y.clone()).color(0))
            .series(Series::new("other", x.clone(), hi.clone()).markers())
            // Skipped: nothing finite.
            .series(Series::new("empty", vec![1.0], vec![f64::NAN]));
        let paths = chart.write(&dir, &format!("line_{log_x}_{log_y}")).unwrap();
        non_empty(&paths);
        assert!(paths[0].extension().unwrap() == "svg" && paths[1].extension().unwrap() == "png");
    }
    let values: Vec<Vec<f64>> = (0..6)
        .map(|i| (0..30).map(|j| (i * j) as f64 + 1.0).collect())
        .collect();
    let mut with_nan = values.clone();
    with_nan[2][4] = f64::NAN;
    let heat = Heatmap::new("layer × step", with_nan)
        .axes("step", "layer")
        .labels(
            (0..6).map(|i| format!("L{i}")).collect(),
            (0..30).map(|j| (10 * j).to_string()).collect(),
        )
        .colorbar_label("value");
    non_empty(&heat.write(&dir, "heat").unwrap());
    non_empty(
        &heat
            .clone()
            .log_scale(true)
            .write(&dir, "heat_log")
            .unwrap(),
    );
    let violin = ViolinPlot::new("groups")
        .axes("variant", "gradient norm")
        .group("a", (0..50).map(|k| 1.0 + (k as f64).sin()).collect())
        .group("b", vec![2.0; 5])
        .group("c", vec![f64::NAN])
        .group("d", (0..30).map(|k| 3.0 + 0.1 * k as f64).collect());
    non_empty(&violin.write(&dir, "violin").unwrap());
    non_empty(
        &violin
            .clone()
            .log_y(true)
            .write(&dir, "violin_log")
            .unwrap(),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_figure_input_is_an_error() {
    let dir = temp_dir("bad-plots");
    let is_plot_err =
        |r: Result<[PathBuf; 2], ExperimentError>| matches!(r, Err(ExperimentError::Plot { .. }));
    // x and y of different lengths.
    let r = LineChart::new("bad")
        .series(Series::new("s", vec![1.0, 2.0], vec![1.0]))
        .write(&dir, "bad1");
    assert!(is_plot_err(r));
    // Band of the wrong length.
    let r = LineChart::new("bad")
        .series(Series::new("s", vec![1.0, 2.0], vec![1.0, 2.0]).band(vec![0.0], vec![3.0]))
        .write(&dir, "bad2");
    assert!(is_plot_err(r));
    // Nothing finite (and nothing positive on a log axis).
    let r = LineChart::new("bad")
        .log_y(true)
        .series(Series::new("s", vec![1.0, 2.0], vec![-1.0, f64::NAN]))
        .write(&dir, "bad3");
    assert!(is_plot_err(r));
    assert!(is_plot_err(LineChart::new("empty").write(&dir, "bad4")));
    // Ragged heatmap, wrong label count, no cells, all NaN.
    assert!(is_plot_err(
        Heatmap::new("h", vec![vec![1.0, 2.0], vec![3.0]]).write(&dir, "bad5")
    ));
    assert!(is_plot_err(
        Heatmap::new("h", vec![vec![1.0, 2.0]])
            .labels(vec!["a".into(), "b".into()], vec![])
            .write(&dir, "bad6")
    ));
    assert!(is_plot_err(Heatmap::new("h", vec![]).write(&dir, "bad7")));
    assert!(is_plot_err(
        Heatmap::new("h", vec![vec![f64::NAN]]).write(&dir, "bad8")
    ));
    // Violins without data.
    assert!(is_plot_err(ViolinPlot::new("v").write(&dir, "bad9")));
    assert!(is_plot_err(
        ViolinPlot::new("v")
            .group("a", vec![f64::NAN])
            .write(&dir, "bad10")
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn report_renders_markdown_and_escaped_html() {
    let dir = temp_dir("report");
    let report = Report::new("Rank <collapse> & gap")
        .paragraph("Measured with `n = 64` tokens.\n\nSecond **paragraph** with a | pipe.")
        .section("Spectral gap")
        .table(
            vec!["n".into(), "σ₁".into()],
            vec![vec!["64".into(), "1.01".into()], vec!["<script>".into()]],
        )
        .figure("figs/gap", "σ₁ & σ₂ vs n")
        .claims(vec![
            Claim::new("Thm 2: σ₁ → 1", "1", "1.01", "±0.02", Verdict::Agrees),
            Claim::numeric("edge", 2.0, 2.5, 0.0, 0.1),
            Claim::new("qualitative", "-", "-", "-", Verdict::NotApplicable),
        ]);
    let [md, html] = report.write(&dir).unwrap();
    let md = std::fs::read_to_string(md).unwrap();
    let html = std::fs::read_to_string(html).unwrap();
    assert!(md.starts_with("# Rank <collapse> & gap\n"));
    assert!(md.contains("## Spectral gap"));
    assert!(md.contains("![σ₁ & σ₂ vs n](figs/gap.svg)"));
    assert!(md.contains("| claim | predicted | measured | tolerance | verdict |"));
    assert!(md.contains("| Thm 2: σ₁ → 1 | 1 | 1.01 | ±0.02 | agrees |"));
    assert!(md.contains("| edge | 2 | 2.5 | ±10% | does not agree |"));
    assert!(md.contains("| <script> |  |"), "short rows are padded");
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("<h1>Rank &lt;collapse&gt; &amp; gap</h1>"));
    assert!(html.contains("<code>n = 64</code>"));
    assert!(html.contains("<strong>paragraph</strong>"));
    assert!(html.contains("<td>&lt;script&gt;</td>"));
    assert!(!html.contains("<script>"));
    assert!(html.contains("<img src=\"figs/gap.svg\" alt=\"σ₁ &amp; σ₂ vs n\">"));
    assert!(html.contains("<tr class=\"disagrees\">"));
    assert_eq!(html.matches("<p>").count(), 2);
    assert_eq!(report.all_claims().len(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}
