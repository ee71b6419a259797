//! Figures (SVG and PNG) with plotters.
//!
//! Every figure is written twice, as `STEM.svg` (for the Markdown/HTML reports) and
//! `STEM.png` ([`PNG_SIZE`] pixels, for quick viewing), from one description:
//!
//! * [`LineChart`] — named [`Series`] of `(x, y)` points, each with an optional ±band drawn as
//!   a translucent area and an optional dashed style for theory curves; linear or logarithmic
//!   axes; a legend;
//! * [`Heatmap`] — a `rows × cols` matrix (e.g. layer × step) with tick labels, a colour scale
//!   and a colour bar showing its minimum and maximum; NaN cells are grey;
//! * [`ViolinPlot`] — several named groups of samples side by side (kernel density outline,
//!   median and interquartile bar).
//!
//! Colours come from the fixed [`PALETTE`], by series index unless a series asks for another
//! slot (so a dashed theory curve can share the colour of the measurement it predicts).
//!
//! **Input checking.** Mis-shaped input (x and y of different lengths, a band of the wrong
//! length, a heatmap with ragged rows or labels of the wrong count) is an
//! [`ExperimentError::Plot`] naming the figure. Non-finite points — and points ≤ 0 on a
//! logarithmic axis — are *skipped* (a Monte-Carlo curve may contain an overflowed point);
//! a series left with no point is skipped too, and a figure left with nothing to draw is an
//! error. Nothing here panics on data.
//!
//! ```no_run
//! use experiments::plot::{LineChart, Series};
//! let dir = std::env::temp_dir();
//! LineChart::new("σ₁ of a Random Markov matrix")
//!     .x_label("n")
//!     .y_label("σ₁")
//!     .log_x(true)
//!     .series(Series::new("measured", vec![10.0, 100.0], vec![1.1, 1.01]).band(vec![1.0, 1.0], vec![1.2, 1.02]))
//!     .series(Series::new("theory", vec![10.0, 100.0], vec![1.0, 1.0]).dashed().color(0))
//!     .write(&dir, "sigma1")
//!     .unwrap();
//! ```

use crate::ExperimentError;
use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, Ranged, ValueFormatter};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// Size of the PNG files, in pixels (the SVG has the same nominal size).
pub const PNG_SIZE: (u32, u32) = (900, 600);

/// The fixed palette: series `i` gets `PALETTE[i % PALETTE.len()]` (Tableau 10).
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The colour of palette slot `i`.
pub fn palette(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// One curve of a [`LineChart`].
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// Abscissae.
    pub x: Vec<f64>,
    /// Ordinates (same length as `x`).
    pub y: Vec<f64>,
    /// Optional band `(lower, upper)` (same length as `x`), drawn as a translucent area.
    pub band: Option<(Vec<f64>, Vec<f64>)>,
    /// Dashed line (theory curves).
    pub dashed: bool,
    /// Draw a marker at every point.
    pub markers: bool,
    /// Markers only, no line (a scatter plot).
    pub scatter: bool,
    /// Palette slot; `None` = the series' index in the chart.
    pub color: Option<usize>,
}

impl Series {
    /// A solid line through `(x[i], y[i])`.
    pub fn new(name: impl Into<String>, x: Vec<f64>, y: Vec<f64>) -> Self {
        Self {
            name: name.into(),
            x,
            y,
            band: None,
            dashed: false,
            markers: false,
            scatter: false,
            color: None,
        }
    }

    /// A dashed theory curve (same as `new(..).dashed()`).
    pub fn theory(name: impl Into<String>, x: Vec<f64>, y: Vec<f64>) -> Self {
        Self::new(name, x, y).dashed()
    }

    /// Adds a band between `lower` and `upper` (e.g. mean ± 1 std).
    pub fn band(mut self, lower: Vec<f64>, upper: Vec<f64>) -> Self {
        self.band = Some((lower, upper));
        self
    }

    /// Adds the band `y ± std`.
    pub fn with_std(self, std: &[f64]) -> Self {
        let lower = self.y.iter().zip(std).map(|(y, s)| y - s).collect();
        let upper = self.y.iter().zip(std).map(|(y, s)| y + s).collect();
        let n = std.len();
        let mut s = self.band(lower, upper);
        if n != s.y.len() {
            // Keep the mismatch visible to `write`'s shape check.
            s.band = Some((vec![f64::NAN; n], vec![f64::NAN; n]));
        }
        s
    }

    /// Dashed line.
    pub fn dashed(mut self) -> Self {
        self.dashed = true;
        self
    }

    /// Markers at the points.
    pub fn markers(mut self) -> Self {
        self.markers = true;
        self
    }

    /// Markers only, no line.
    pub fn scatter(mut self) -> Self {
        self.scatter = true;
        self.markers = true;
        self
    }

    /// Uses palette slot `slot` instead of the series' index.
    pub fn color(mut self, slot: usize) -> Self {
        self.color = Some(slot);
        self
    }
}

/// A line chart (see the module documentation).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LineChart {
    /// Title.
    pub title: String,
    /// x-axis label.
    pub x_label: String,
    /// y-axis label.
    pub y_label: String,
    /// Logarithmic x axis.
    pub log_x: bool,
    /// Logarithmic y axis.
    pub log_y: bool,
    /// The curves, drawn in order.
    pub series: Vec<Series>,
}

impl LineChart {
    /// An empty chart with a title.
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            ..Self::default()
        }
    }

    /// Sets the x-axis label.
    pub fn x_label(mut self, label: impl Into<String>) -> Self {
        self.x_label = label.into();
        self
    }

    /// Sets the y-axis label.
    pub fn y_label(mut self, label: impl Into<String>) -> Self {
        self.y_label = label.into();
        self
    }

    /// Logarithmic x axis.
    pub fn log_x(mut self, on: bool) -> Self {
        self.log_x = on;
        self
    }

    /// Logarithmic y axis.
    pub fn log_y(mut self, on: bool) -> Self {
        self.log_y = on;
        self
    }

    /// Appends a series.
    pub fn series(mut self, s: Series) -> Self {
        self.series.push(s);
        self
    }

    /// Appends a series in place.
    pub fn push(&mut self, s: Series) {
        self.series.push(s);
    }

    /// Writes `dir/stem.svg` and `dir/stem.png` and returns their paths.
    ///
    /// # Errors
    /// Mis-shaped series, nothing left to draw after dropping non-finite points, or a
    /// drawing/I/O failure.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<[PathBuf; 2], ExperimentError> {
        let svg = dir.join(format!("{stem}.svg"));
        let err = |m: String| plot_err(&svg, m);
        let prepared = self.prepare().map_err(err)?;
        render(dir, stem, &LineFig(self, prepared))
    }

    fn prepare(&self) -> Result<Vec<Prepared>, String> {
        let ok_x = |x: f64| x.is_finite() && (!self.log_x || x > 0.0);
        let ok_y = |y: f64| y.is_finite() && (!self.log_y || y > 0.0);
        let mut out = Vec::new();
        for (i, s) in self.series.iter().enumerate() {
            if s.x.len() != s.y.len() {
                return Err(format!(
                    "series '{}': {} x values but {} y values",
                    s.name,
                    s.x.len(),
                    s.y.len()
                ));
            }
            if let Some((lo, hi)) = &s.band
                && (lo.len() != s.x.len() || hi.len() != s.x.len())
            {
                return Err(format!(
                    "series '{}': band of {}/{} values for {} points",
                    s.name,
                    lo.len(),
                    hi.len(),
                    s.x.len()
                ));
            }
            let points: Vec<(f64, f64)> =
                s.x.iter()
                    .zip(&s.y)
                    .map(|(&x, &y)| (x, y))
                    .filter(|&(x, y)| ok_x(x) && ok_y(y))
                    .collect();
            let band: Vec<(f64, f64, f64)> = match &s.band {
                Some((lo, hi)) => (0..s.x.len())
                    .map(|k| (s.x[k], lo[k], hi[k]))
                    .filter(|&(x, l, h)| ok_x(x) && ok_y(l) && ok_y(h))
                    .collect(),
                None => Vec::new(),
            };
            if points.is_empty() {
                continue;
            }
            out.push(Prepared {
                index: i,
                points,
                band,
            });
        }
        if out.is_empty() {
            return Err("no finite point to draw (every series empty after filtering)".into());
        }
        Ok(out)
    }

    fn draw_on<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        prepared: &[Prepared],
    ) -> Result<(), String> {
        let xs = prepared.iter().flat_map(|p| {
            p.points
                .iter()
                .map(|q| q.0)
                .chain(p.band.iter().map(|b| b.0))
        });
        let ys = prepared.iter().flat_map(|p| {
            p.points
                .iter()
                .map(|q| q.1)
                .chain(p.band.iter().flat_map(|b| [b.1, b.2]))
        });
        let (x0, x1) = padded_range(xs, self.log_x);
        let (y0, y1) = padded_range(ys, self.log_y);
        match (self.log_x, self.log_y) {
            (false, false) => self.draw_in(root, prepared, x0..x1, y0..y1),
            (true, false) => self.draw_in(root, prepared, (x0..x1).log_scale(), y0..y1),
            (false, true) => self.draw_in(root, prepared, x0..x1, (y0..y1).log_scale()),
            (true, true) => {
                self.draw_in(root, prepared, (x0..x1).log_scale(), (y0..y1).log_scale())
            }
        }
    }

    fn draw_in<DB, X, Y>(
        &self,
        root: &DrawingArea<DB, Shift>,
        prepared: &[Prepared],
        x_spec: X,
        y_spec: Y,
    ) -> Result<(), String>
    where
        DB: DrawingBackend,
        X: AsRangedCoord<Value = f64>,
        Y: AsRangedCoord<Value = f64>,
        X::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
        Y::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
    {
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(x_spec, y_spec)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc(self.x_label.as_str())
            .y_desc(self.y_label.as_str())
            .x_label_formatter(&|v| fmt_tick(*v))
            .y_label_formatter(&|v| fmt_tick(*v))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| e.to_string())?;
        // Bands first, so lines are drawn over them.
        for p in prepared {
            if p.band.len() < 2 {
                continue;
            }
            let color = palette(self.series[p.index].color.unwrap_or(p.index));
            let mut poly: Vec<(f64, f64)> = p.band.iter().map(|b| (b.0, b.2)).collect();
            poly.extend(p.band.iter().rev().map(|b| (b.0, b.1)));
            chart
                .draw_series(std::iter::once(Polygon::new(
                    poly,
                    color.mix(0.18).filled(),
                )))
                .map_err(|e| e.to_string())?;
        }
        let mut any_label = false;
        for p in prepared {
            let s = &self.series[p.index];
            let color = palette(s.color.unwrap_or(p.index));
            let style = ShapeStyle {
                color: color.to_rgba(),
                filled: false,
                stroke_width: 2,
            };
            let anno = if s.scatter {
                chart
                    .draw_series(p.points.iter().map(|&q| Circle::new(q, 2, color.filled())))
                    .map_err(|e| e.to_string())?
            } else if s.dashed {
                chart
                    .draw_series(DashedLineSeries::new(p.points.clone(), 8, 5, style))
                    .map_err(|e| e.to_string())?
            } else {
                chart
                    .draw_series(LineSeries::new(p.points.clone(), style))
                    .map_err(|e| e.to_string())?
            };
            if !s.name.is_empty() {
                any_label = true;
                let dashed = s.dashed;
                // A legend sample: three dashes, or three touching segments (one line).
                let (gap, len) = if dashed { (8, 5) } else { (7, 7) };
                anno.label(s.name.as_str()).legend(move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (len, 0)], style)
                        + PathElement::new(vec![(gap, 0), (gap + len, 0)], style)
                        + PathElement::new(vec![(2 * gap, 0), (2 * gap + len, 0)], style)
                });
            }
            if s.markers && !s.scatter {
                chart
                    .draw_series(p.points.iter().map(|&q| Circle::new(q, 3, color.filled())))
                    .map_err(|e| e.to_string())?;
            }
        }
        if any_label {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.5))
                .label_font(("sans-serif", 14))
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

struct LineFig<'a>(&'a LineChart, Vec<Prepared>);

impl Figure for LineFig<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        self.0.draw_on(root, &self.1)
    }
}

struct HeatFig<'a>(&'a Heatmap, Vec<Vec<f64>>, f64, f64);

impl Figure for HeatFig<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        self.0.draw_on(root, &self.1, self.2, self.3)
    }
}

struct ViolinFig<'a>(&'a ViolinPlot, Vec<Vec<f64>>);

impl Figure for ViolinFig<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        self.0.draw_on(root, &self.1)
    }
}

struct Prepared {
    index: usize,
    points: Vec<(f64, f64)>,
    band: Vec<(f64, f64, f64)>,
}

/// A heatmap of a `rows × cols` matrix (see the module documentation).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Heatmap {
    /// Title.
    pub title: String,
    /// x-axis (columns) label.
    pub x_label: String,
    /// y-axis (rows) label.
    pub y_label: String,
    /// One label per row (empty = row indices).
    pub row_labels: Vec<String>,
    /// One label per column (empty = column indices).
    pub col_labels: Vec<String>,
    /// The values, `values[row][col]`; NaN cells are grey.
    pub values: Vec<Vec<f64>>,
    /// Colour by `log10(value)` (non-positive values are grey).
    pub log_scale: bool,
    /// Label of the colour bar.
    pub colorbar_label: String,
}

impl Heatmap {
    /// A heatmap of `values[row][col]`.
    pub fn new(title: impl Into<String>, values: Vec<Vec<f64>>) -> Self {
        Self {
            title: title.into(),
            values,
            ..Self::default()
        }
    }

    /// Axis labels (columns, rows).
    pub fn axes(mut self, x_label: impl Into<String>, y_label: impl Into<String>) -> Self {
        self.x_label = x_label.into();
        self.y_label = y_label.into();
        self
    }

    /// Tick labels of rows and columns.
    pub fn labels(mut self, rows: Vec<String>, cols: Vec<String>) -> Self {
        self.row_labels = rows;
        self.col_labels = cols;
        self
    }

    /// Logarithmic colour scale.
    pub fn log_scale(mut self, on: bool) -> Self {
        self.log_scale = on;
        self
    }

    /// Label of the colour bar.
    pub fn colorbar_label(mut self, label: impl Into<String>) -> Self {
        self.colorbar_label = label.into();
        self
    }

    /// Writes `dir/stem.svg` and `dir/stem.png`.
    ///
    /// # Errors
    /// No rows or columns, ragged rows, label counts that do not match, no finite cell, or a
    /// drawing/I/O failure.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<[PathBuf; 2], ExperimentError> {
        let svg = dir.join(format!("{stem}.svg"));
        let rows = self.values.len();
        let cols = self.values.first().map_or(0, Vec::len);
        if rows == 0 || cols == 0 {
            return Err(plot_err(&svg, "heatmap has no cells".into()));
        }
        if let Some((i, r)) = self
            .values
            .iter()
            .enumerate()
            .find(|(_, r)| r.len() != cols)
        {
            return Err(plot_err(
                &svg,
                format!(
                    "ragged heatmap: row {i} has {} cells, row 0 has {cols}",
                    r.len()
                ),
            ));
        }
        if !self.row_labels.is_empty() && self.row_labels.len() != rows {
            return Err(plot_err(
                &svg,
                format!("{} row labels for {rows} rows", self.row_labels.len()),
            ));
        }
        if !self.col_labels.is_empty() && self.col_labels.len() != cols {
            return Err(plot_err(
                &svg,
                format!("{} column labels for {cols} columns", self.col_labels.len()),
            ));
        }
        let t: Vec<Vec<f64>> = self
            .values
            .iter()
            .map(|r| r.iter().map(|&v| self.transform(v)).collect())
            .collect();
        let finite = t.iter().flatten().copied().filter(|v| v.is_finite());
        let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
        if !lo.is_finite() {
            return Err(plot_err(&svg, "heatmap has no finite cell".into()));
        }
        render(dir, stem, &HeatFig(self, t, lo, hi))
    }

    fn transform(&self, v: f64) -> f64 {
        if self.log_scale {
            if v > 0.0 { v.log10() } else { f64::NAN }
        } else {
            v
        }
    }

    fn untransform(&self, t: f64) -> f64 {
        if self.log_scale { 10f64.powf(t) } else { t }
    }

    fn draw_on<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        t: &[Vec<f64>],
        lo: f64,
        hi: f64,
    ) -> Result<(), String> {
        let (rows, cols) = (t.len(), t[0].len());
        let (w, _) = root.dim_in_pixel();
        let (main, bar) = root.split_horizontally(w.saturating_sub(130));
        let span = if hi > lo { hi - lo } else { 1.0 };
        let row_label = |i: usize| {
            self.row_labels
                .get(i)
                .cloned()
                .unwrap_or_else(|| i.to_string())
        };
        let col_label = |j: usize| {
            self.col_labels
                .get(j)
                .cloned()
                .unwrap_or_else(|| j.to_string())
        };
        let mut chart = ChartBuilder::on(&main)
            .caption(&self.title, ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5..cols as f64 - 0.5, -0.5..rows as f64 - 0.5)
            .map_err(|e| e.to_string())?;
        // Cell k spans [k − ½, k + ½]: ticks at integers are cell centres.
        let centre = |v: &f64, n: usize, label: &dyn Fn(usize) -> String| {
            let k = v.round();
            if (v - k).abs() < 1e-6 && k >= 0.0 && (k as usize) < n {
                label(k as usize)
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(self.x_label.as_str())
            .y_desc(self.y_label.as_str())
            .x_labels(cols.min(12) + 1)
            .y_labels(rows.min(16) + 1)
            .x_label_formatter(&|v| centre(v, cols, &col_label))
            .y_label_formatter(&|v| centre(v, rows, &row_label))
            .draw()
            .map_err(|e| e.to_string())?;
        let cells = t.iter().enumerate().flat_map(|(i, r)| {
            r.iter().enumerate().map(move |(j, &v)| {
                let color = if v.is_finite() {
                    colormap((v - lo) / span)
                } else {
                    RGBColor(190, 190, 190)
                };
                let (x, y) = (j as f64, i as f64);
                Rectangle::new([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)], color.filled())
            })
        });
        chart.draw_series(cells).map_err(|e| e.to_string())?;
        // The colour bar, labelled in the original units.
        let mut cb = ChartBuilder::on(&bar)
            .margin_top(50)
            .margin_bottom(57)
            .margin_right(10)
            .y_label_area_size(75)
            .build_cartesian_2d(0f64..1.0, lo..(lo + span))
            .map_err(|e| e.to_string())?;
        cb.configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .y_desc(self.colorbar_label.as_str())
            .y_labels(6)
            .y_label_formatter(&|v| fmt_tick(self.untransform(*v)))
            .draw()
            .map_err(|e| e.to_string())?;
        let steps = 100;
        cb.draw_series((0..steps).map(|k| {
            let a = lo + span * k as f64 / steps as f64;
            let b = lo + span * (k + 1) as f64 / steps as f64;
            Rectangle::new(
                [(0.0, a), (1.0, b)],
                colormap(k as f64 / (steps - 1) as f64).filled(),
            )
        }))
        .map_err(|e| e.to_string())?;
        let min_max = format!(
            "min {}  max {}",
            fmt_tick(self.untransform(lo)),
            fmt_tick(self.untransform(hi))
        );
        bar.draw(&Text::new(
            min_max,
            (4, 22),
            ("sans-serif", 13).into_font().color(&BLACK),
        ))
        .map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// A perceptually ordered colour map (viridis, 6 anchors, linear interpolation), `t ∈ [0, 1]`.
pub fn colormap(t: f64) -> RGBColor {
    const ANCHORS: [(f64, f64, f64); 6] = [
        (68.0, 1.0, 84.0),
        (65.0, 68.0, 135.0),
        (42.0, 120.0, 142.0),
        (34.0, 168.0, 132.0),
        (122.0, 209.0, 81.0),
        (253.0, 231.0, 37.0),
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = t * (ANCHORS.len() - 1) as f64;
    let k = (x.floor() as usize).min(ANCHORS.len() - 2);
    let f = x - k as f64;
    let (a, b) = (ANCHORS[k], ANCHORS[k + 1]);
    let mix = |p: f64, q: f64| (p + (q - p) * f).round().clamp(0.0, 255.0) as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Violin plots of several groups of samples side by side (see the module documentation).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ViolinPlot {
    /// Title.
    pub title: String,
    /// x-axis label (under the group names).
    pub x_label: String,
    /// y-axis label.
    pub y_label: String,
    /// Logarithmic y axis (densities estimated on `log10` of the samples).
    pub log_y: bool,
    /// `(name, samples)` per group; group `i` is coloured `PALETTE[i]`.
    pub groups: Vec<(String, Vec<f64>)>,
}

impl ViolinPlot {
    /// An empty plot with a title.
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            ..Self::default()
        }
    }

    /// Axis labels.
    pub fn axes(mut self, x_label: impl Into<String>, y_label: impl Into<String>) -> Self {
        self.x_label = x_label.into();
        self.y_label = y_label.into();
        self
    }

    /// Logarithmic y axis.
    pub fn log_y(mut self, on: bool) -> Self {
        self.log_y = on;
        self
    }

    /// Appends a group.
    pub fn group(mut self, name: impl Into<String>, samples: Vec<f64>) -> Self {
        self.groups.push((name.into(), samples));
        self
    }

    /// Writes `dir/stem.svg` and `dir/stem.png`.
    ///
    /// # Errors
    /// No group, or no finite sample in any group (groups left empty after dropping
    /// non-finite samples are drawn as an empty slot), or a drawing/I/O failure.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<[PathBuf; 2], ExperimentError> {
        let svg = dir.join(format!("{stem}.svg"));
        if self.groups.is_empty() {
            return Err(plot_err(&svg, "violin plot has no group".into()));
        }
        // Work in t = y or t = log10(y).
        let t: Vec<Vec<f64>> = self
            .groups
            .iter()
            .map(|(_, s)| {
                let mut v: Vec<f64> = s
                    .iter()
                    .copied()
                    .filter(|y| y.is_finite() && (!self.log_y || *y > 0.0))
                    .map(|y| if self.log_y { y.log10() } else { y })
                    .collect();
                v.sort_by(f64::total_cmp);
                v
            })
            .collect();
        if t.iter().all(Vec::is_empty) {
            return Err(plot_err(&svg, "no finite sample in any group".into()));
        }
        render(dir, stem, &ViolinFig(self, t))
    }

    fn draw_on<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        t: &[Vec<f64>],
    ) -> Result<(), String> {
        let all = t.iter().flatten().copied();
        let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
        let pad = if hi > lo { 0.08 * (hi - lo) } else { 0.5 };
        let (lo, hi) = (lo - pad, hi + pad);
        let g = t.len();
        let names: Vec<String> = self.groups.iter().map(|(n, _)| n.clone()).collect();
        let log_y = self.log_y;
        let untr = move |v: f64| if log_y { 10f64.powf(v) } else { v };
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5f64..g as f64 - 0.5, lo..hi)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc(self.x_label.as_str())
            .y_desc(self.y_label.as_str())
            .x_labels(2 * g + 1)
            .x_label_formatter(&|v| {
                let k = v.round();
                if (v - k).abs() < 1e-6 && k >= 0.0 && (k as usize) < g {
                    names[k as usize].clone()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v| fmt_tick(untr(*v)))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, s) in t.iter().enumerate() {
            if s.is_empty() {
                continue;
            }
            let color = palette(i);
            let c = i as f64;
            let (q1, med, q3) = (quantile(s, 0.25), quantile(s, 0.5), quantile(s, 0.75));
            let (min, max) = (s[0], s[s.len() - 1]);
            if max > min {
                let outline = violin_outline(s, c, 0.4);
                chart
                    .draw_series(std::iter::once(Polygon::new(
                        outline.clone(),
                        color.mix(0.35).filled(),
                    )))
                    .map_err(|e| e.to_string())?;
                let mut closed = outline;
                if let Some(&first) = closed.first() {
                    closed.push(first);
                }
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        closed,
                        color.stroke_width(1),
                    )))
                    .map_err(|e| e.to_string())?;
            }
            // Whisker, interquartile bar and median.
            chart
                .draw_series([
                    PathElement::new(vec![(c, min), (c, max)], BLACK.stroke_width(1)),
                    PathElement::new(vec![(c, q1), (c, q3)], BLACK.stroke_width(5)),
                    PathElement::new(
                        vec![(c - 0.12, med), (c + 0.12, med)],
                        WHITE.stroke_width(3),
                    ),
                ])
                .map_err(|e| e.to_string())?;
            // The samples themselves (a strip), small and translucent.
            chart
                .draw_series(s.iter().enumerate().map(|(k, &v)| {
                    let jitter = ((k * 7919) % 13) as f64 / 13.0 - 0.5;
                    Circle::new(
                        (c + 0.5 + 0.06 * jitter - 0.5, v),
                        2,
                        BLACK.mix(0.35).filled(),
                    )
                }))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// The outline of a violin at `center`: Gaussian kernel density (Silverman's bandwidth)
/// mirrored, with half-width `half_width` at the density's maximum.
fn violin_outline(sorted: &[f64], center: f64, half_width: f64) -> Vec<(f64, f64)> {
    let n = sorted.len() as f64;
    let mean = sorted.iter().sum::<f64>() / n;
    let sd = (sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    let iqr = quantile(sorted, 0.75) - quantile(sorted, 0.25);
    let spread = if iqr > 0.0 { sd.min(iqr / 1.34) } else { sd };
    let (min, max) = (sorted[0], sorted[sorted.len() - 1]);
    let h = (0.9 * spread * n.powf(-0.2)).max((max - min) * 1e-3);
    let grid = 60;
    let ys: Vec<f64> = (0..=grid)
        .map(|k| min + (max - min) * k as f64 / grid as f64)
        .collect();
    let dens: Vec<f64> = ys
        .iter()
        .map(|y| {
            sorted
                .iter()
                .map(|v| (-0.5 * ((y - v) / h).powi(2)).exp())
                .sum::<f64>()
        })
        .collect();
    let top = dens.iter().copied().fold(0.0, f64::max).max(1e-300);
    let mut pts: Vec<(f64, f64)> = ys
        .iter()
        .zip(&dens)
        .map(|(&y, &d)| (center + half_width * d / top, y))
        .collect();
    pts.extend(
        ys.iter()
            .zip(&dens)
            .rev()
            .map(|(&y, &d)| (center - half_width * d / top, y)),
    );
    pts
}

/// Linear-interpolation quantile of sorted data.
fn quantile(sorted: &[f64], p: f64) -> f64 {
    let x = p * (sorted.len() - 1) as f64;
    let k = x.floor() as usize;
    let f = x - k as f64;
    if k + 1 < sorted.len() {
        sorted[k] * (1.0 - f) + sorted[k + 1] * f
    } else {
        sorted[k]
    }
}

/// Something drawable on any plotters backend.
trait Figure {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String>;
}

/// Renders one drawing into `dir/stem.svg` and `dir/stem.png` (creating `dir`). A panic
/// inside plotters (e.g. a font failure) is caught and reported as an error.
fn render<F: Figure>(dir: &Path, stem: &str, fig: &F) -> Result<[PathBuf; 2], ExperimentError> {
    std::fs::create_dir_all(dir).map_err(crate::io_err(dir))?;
    let svg = dir.join(format!("{stem}.svg"));
    let png = dir.join(format!("{stem}.png"));
    for (path, is_svg) in [(&svg, true), (&png, false)] {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if is_svg {
                let root = SVGBackend::new(path, PNG_SIZE).into_drawing_area();
                root.fill(&WHITE).map_err(|e| e.to_string())?;
                fig.draw(&root)?;
                root.present().map_err(|e| e.to_string())
            } else {
                let root = BitMapBackend::new(path, PNG_SIZE).into_drawing_area();
                root.fill(&WHITE).map_err(|e| e.to_string())?;
                fig.draw(&root)?;
                root.present().map_err(|e| e.to_string())
            }
        }));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(m)) => return Err(plot_err(path, m)),
            Err(_) => return Err(plot_err(path, "plotters panicked while drawing".into())),
        }
    }
    Ok([svg, png])
}

fn plot_err(path: &Path, message: String) -> ExperimentError {
    ExperimentError::Plot {
        path: path.display().to_string(),
        message,
    }
}

/// The data range of `values` with a 5 % margin (in log space on a log axis); a degenerate
/// range is widened.
fn padded_range(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if log {
        let (a, b) = (lo.log10(), hi.log10());
        let pad = if b > a { 0.05 * (b - a) } else { 0.5 };
        (10f64.powf(a - pad), 10f64.powf(b + pad))
    } else {
        let pad = if hi > lo {
            0.05 * (hi - lo)
        } else {
            0.5 * lo.abs().max(1.0)
        };
        (lo - pad, hi + pad)
    }
}

/// Compact tick labels: plain decimals in `[1e-3, 1e5)`, scientific otherwise.
pub fn fmt_tick(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        let s = format!("{v:.1e}");
        s.replace(".0e", "e")
    } else {
        let s = format!("{v:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    }
}
