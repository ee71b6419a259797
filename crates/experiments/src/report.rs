//! Markdown and HTML reports.
//!
//! A [`Report`] is a list of [`Block`]s — headings, paragraphs, tables, figures and a table of
//! claims (paper or theory against measurement) — rendered twice from the same structure:
//! `report.md` (GitHub Markdown) and `report.html` (self-contained, minimal CSS, every piece
//! of text HTML-escaped). Paragraphs are Markdown source in `report.md`; in the HTML they are
//! escaped text, with only `` `code` `` spans, `**bold**` and blank-line paragraph breaks
//! rendered (no Markdown parser is involved).
//!
//! ```
//! use experiments::report::{Claim, Report, Verdict};
//! let dir = std::env::temp_dir().join("report-doc-example");
//! Report::new("Rank collapse")
//!     .paragraph("Seed 002, reproduced.")
//!     .section("Spectral gap")
//!     .figure("spectral_gap", "σ₁ and √n·σ₂ against n")
//!     .claims(vec![Claim::new("σ₁(A) → 1", "1", "1.003", "±0.01", Verdict::Agrees)])
//!     .write(&dir)
//!     .unwrap();
//! assert!(dir.join("report.html").exists());
//! ```

use crate::{ExperimentError, io_err};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Whether a measurement agrees with its prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Within the tolerance.
    Agrees,
    /// Outside the tolerance.
    DoesNotAgree,
    /// Not comparable (qualitative, or not measured in this run).
    NotApplicable,
}

impl Verdict {
    /// `Agrees` if `ok`, else `DoesNotAgree`.
    pub fn from_bool(ok: bool) -> Self {
        if ok { Self::Agrees } else { Self::DoesNotAgree }
    }

    /// `agrees`, `does not agree`, `n/a`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Agrees => "agrees",
            Self::DoesNotAgree => "does not agree",
            Self::NotApplicable => "n/a",
        }
    }
}

/// One row of a claims table.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Claim {
    /// The statement (e.g. "Theorem 2: σ₁(A) → 1").
    pub claim: String,
    /// What the paper or the theory predicts.
    pub predicted: String,
    /// What was measured.
    pub measured: String,
    /// The tolerance the comparison used.
    pub tolerance: String,
    /// The verdict.
    pub verdict: Verdict,
}

impl Claim {
    /// A claim row.
    pub fn new(
        claim: impl Into<String>,
        predicted: impl Into<String>,
        measured: impl Into<String>,
        tolerance: impl Into<String>,
        verdict: Verdict,
    ) -> Self {
        Self {
            claim: claim.into(),
            predicted: predicted.into(),
            measured: measured.into(),
            tolerance: tolerance.into(),
            verdict,
        }
    }

    /// A numeric claim: agrees when `|measured − predicted| ≤ abs_tol + rel_tol·|predicted|`;
    /// a non-finite measurement does not agree. The tolerance column reads `±abs` and/or
    /// `±rel %`.
    pub fn numeric(
        claim: impl Into<String>,
        predicted: f64,
        measured: f64,
        abs_tol: f64,
        rel_tol: f64,
    ) -> Self {
        let bound = abs_tol + rel_tol * predicted.abs();
        let ok = measured.is_finite() && (measured - predicted).abs() <= bound;
        let tolerance = match (abs_tol > 0.0, rel_tol > 0.0) {
            (true, true) => format!("±{} + {}%", fmt_num(abs_tol), fmt_num(100.0 * rel_tol)),
            (true, false) => format!("±{}", fmt_num(abs_tol)),
            (false, true) => format!("±{}%", fmt_num(100.0 * rel_tol)),
            (false, false) => "exact".into(),
        };
        Self::new(
            claim,
            fmt_num(predicted),
            fmt_num(measured),
            tolerance,
            Verdict::from_bool(ok),
        )
    }
}

/// Four significant digits, scientific outside `[1e-3, 1e5)`.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.3e}")
    } else {
        let decimals = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
        let s = format!("{v:.decimals$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    }
}

/// One piece of a report.
#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    /// A heading (level 2 = section, 3 = subsection).
    Heading {
        /// 2 or 3 (clamped to 1..=6).
        level: u8,
        /// Text.
        text: String,
    },
    /// A paragraph of Markdown text.
    Paragraph(String),
    /// A table.
    Table {
        /// Column names.
        header: Vec<String>,
        /// Rows (short rows are padded with empty cells).
        rows: Vec<Vec<String>>,
    },
    /// A figure `stem.svg` (relative to the report's directory) with a caption.
    Figure {
        /// Path stem relative to the report (`figs/gap` → `figs/gap.svg`).
        stem: String,
        /// Caption.
        caption: String,
    },
    /// A claims table.
    Claims(Vec<Claim>),
}

/// A report (see the module documentation).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Report {
    /// Title (the level-1 heading).
    pub title: String,
    /// Content, in order.
    pub blocks: Vec<Block>,
}

impl Report {
    /// An empty report.
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            blocks: Vec::new(),
        }
    }

    /// Appends a section heading (level 2).
    pub fn section(mut self, text: impl Into<String>) -> Self {
        self.push(Block::Heading {
            level: 2,
            text: text.into(),
        });
        self
    }

    /// Appends a subsection heading (level 3).
    pub fn subsection(mut self, text: impl Into<String>) -> Self {
        self.push(Block::Heading {
            level: 3,
            text: text.into(),
        });
        self
    }

    /// Appends a paragraph (Markdown text).
    pub fn paragraph(mut self, text: impl Into<String>) -> Self {
        self.push(Block::Paragraph(text.into()));
        self
    }

    /// Appends a table.
    pub fn table(mut self, header: Vec<String>, rows: Vec<Vec<String>>) -> Self {
        self.push(Block::Table { header, rows });
        self
    }

    /// Appends a figure reference (`stem.svg`, relative to the report directory).
    pub fn figure(mut self, stem: impl Into<String>, caption: impl Into<String>) -> Self {
        self.push(Block::Figure {
            stem: stem.into(),
            caption: caption.into(),
        });
        self
    }

    /// Appends a claims table.
    pub fn claims(mut self, claims: Vec<Claim>) -> Self {
        self.push(Block::Claims(claims));
        self
    }

    /// Appends any block in place.
    pub fn push(&mut self, block: Block) {
        self.blocks.push(block);
    }

    /// Every claim in the report, in order.
    pub fn all_claims(&self) -> Vec<&Claim> {
        self.blocks
            .iter()
            .filter_map(|b| match b {
                Block::Claims(c) => Some(c.iter()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// The Markdown rendering.
    pub fn to_markdown(&self) -> String {
        let mut out = format!("# {}\n\n", md_inline(&self.title));
        for b in &self.blocks {
            match b {
                Block::Heading { level, text } => {
                    let l = (*level).clamp(1, 6) as usize;
                    let _ = write!(out, "{} {}\n\n", "#".repeat(l), md_inline(text));
                }
                Block::Paragraph(p) => {
                    out.push_str(p.trim_end());
                    out.push_str("\n\n");
                }
                Block::Table { header, rows } => md_table(&mut out, header, rows),
                Block::Figure { stem, caption } => {
                    let _ = write!(
                        out,
                        "![{}]({}.svg)\n\n*{}*\n\n",
                        md_inline(caption),
                        stem,
                        md_inline(caption)
                    );
                }
                Block::Claims(claims) => {
                    let (header, rows) = claims_table(claims);
                    md_table(&mut out, &header, &rows);
                }
            }
        }
        out
    }

    /// The HTML rendering (a complete, self-contained document).
    pub fn to_html(&self) -> String {
        let mut out =
            String::from("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
        let _ = writeln!(out, "<title>{}</title>", esc(&self.title));
        out.push_str(CSS);
        out.push_str("</head>\n<body>\n");
        let _ = writeln!(out, "<h1>{}</h1>", esc(&self.title));
        for b in &self.blocks {
            match b {
                Block::Heading { level, text } => {
                    let l = (*level).clamp(1, 6);
                    let _ = writeln!(out, "<h{l}>{}</h{l}>", html_inline(text));
                }
                Block::Paragraph(p) => {
                    for para in p.split("\n\n").filter(|s| !s.trim().is_empty()) {
                        let _ = writeln!(out, "<p>{}</p>", html_inline(para.trim()));
                    }
                }
                Block::Table { header, rows } => html_table(&mut out, header, rows, None),
                Block::Figure { stem, caption } => {
                    let _ = writeln!(
                        out,
                        "<figure><img src=\"{}.svg\" alt=\"{}\"><figcaption>{}</figcaption></figure>",
                        esc(stem),
                        esc(caption),
                        html_inline(caption)
                    );
                }
                Block::Claims(claims) => {
                    let (header, rows) = claims_table(claims);
                    let classes: Vec<&str> = claims
                        .iter()
                        .map(|c| match c.verdict {
                            Verdict::Agrees => "agrees",
                            Verdict::DoesNotAgree => "disagrees",
                            Verdict::NotApplicable => "na",
                        })
                        .collect();
                    html_table(&mut out, &header, &rows, Some(&classes));
                }
            }
        }
        out.push_str("</body>\n</html>\n");
        out
    }

    /// Writes `dir/report.md` and `dir/report.html` (creating `dir`) and returns their paths.
    ///
    /// # Errors
    /// I/O failures.
    pub fn write(&self, dir: &Path) -> Result<[PathBuf; 2], ExperimentError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let md = dir.join("report.md");
        let html = dir.join("report.html");
        std::fs::write(&md, self.to_markdown()).map_err(io_err(&md))?;
        std::fs::write(&html, self.to_html()).map_err(io_err(&html))?;
        Ok([md, html])
    }
}

const CSS: &str = "<style>
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; max-width: 1000px;
       margin: 2em auto; padding: 0 1em; line-height: 1.5; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
tr.agrees td:last-child { background: #e3f5e1; }
tr.disagrees td:last-child { background: #fbe3e3; }
tr.na td:last-child { background: #f4f4f4; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-style: italic; color: #555; }
code { background: #f4f4f4; padding: 0 0.2em; }
</style>
";

fn claims_table(claims: &[Claim]) -> (Vec<String>, Vec<Vec<String>>) {
    let header = ["claim", "predicted", "measured", "tolerance", "verdict"]
        .map(String::from)
        .to_vec();
    let rows = claims
        .iter()
        .map(|c| {
            vec![
                c.claim.clone(),
                c.predicted.clone(),
                c.measured.clone(),
                c.tolerance.clone(),
                c.verdict.label().to_string(),
            ]
        })
        .collect();
    (header, rows)
}

/// Escapes a table cell / inline text for Markdown: `|` and newlines would break a table.
fn md_inline(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn md_table(out: &mut String, header: &[String], rows: &[Vec<String>]) {
    let cols = header
        .len()
        .max(rows.iter().map(Vec::len).max().unwrap_or(0));
    if cols == 0 {
        return;
    }
    let cell = |r: &[String], j: usize| r.get(j).map(|s| md_inline(s)).unwrap_or_default();
    out.push('|');
    for j in 0..cols {
        let _ = write!(out, " {} |", cell(header, j));
    }
    out.push_str("\n|");
    for _ in 0..cols {
        out.push_str("---|");
    }
    out.push('\n');
    for r in rows {
        out.push('|');
        for j in 0..cols {
            let _ = write!(out, " {} |", cell(r, j));
        }
        out.push('\n');
    }
    out.push('\n');
}

fn html_table(out: &mut String, header: &[String], rows: &[Vec<String>], classes: Option<&[&str]>) {
    let cols = header
        .len()
        .max(rows.iter().map(Vec::len).max().unwrap_or(0));
    if cols == 0 {
        return;
    }
    out.push_str("<table>\n<thead><tr>");
    for j in 0..cols {
        let _ = write!(
            out,
            "<th>{}</th>",
            header.get(j).map(|s| html_inline(s)).unwrap_or_default()
        );
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for (i, r) in rows.iter().enumerate() {
        match classes.and_then(|c| c.get(i)) {
            Some(c) => {
                let _ = write!(out, "<tr class=\"{c}\">");
            }
            None => out.push_str("<tr>"),
        }
        for j in 0..cols {
            let _ = write!(
                out,
                "<td>{}</td>",
                r.get(j).map(|s| html_inline(s)).unwrap_or_default()
            );
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody>\n</table>\n");
}

/// Escapes `& < > " '` for HTML text and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// Escaped inline text with `` `code` `` and `**bold**` spans rendered; unmatched markers are
/// kept literally.
fn html_inline(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while !rest.is_empty() {
        let code = rest.find('`');
        let bold = rest.find("**");
        let next = match (code, bold) {
            (Some(c), Some(b)) if b < c => Some((b, "**", "strong")),
            (Some(c), _) => Some((c, "`", "code")),
            (None, Some(b)) => Some((b, "**", "strong")),
            (None, None) => None,
        };
        let Some((at, marker, tag)) = next else {
            out.push_str(&esc(rest));
            break;
        };
        let after = &rest[at + marker.len()..];
        match after.find(marker) {
            Some(end) if end > 0 => {
                out.push_str(&esc(&rest[..at]));
                let _ = write!(out, "<{tag}>{}</{tag}>", esc(&after[..end]));
                rest = &after[end + marker.len()..];
            }
            _ => {
                out.push_str(&esc(&rest[..at + marker.len()]));
                rest = after;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_rendering_escapes_and_spans() {
        assert_eq!(
            html_inline("a < b & `x<y>` **z**"),
            "a &lt; b &amp; <code>x&lt;y&gt;</code> <strong>z</strong>"
        );
        assert_eq!(html_inline("odd ` tick"), "odd ` tick");
        assert_eq!(esc("\"'"), "&quot;&#39;");
    }

    #[test]
    fn numbers_are_compact() {
        assert_eq!(fmt_num(1.0), "1");
        assert_eq!(fmt_num(0.123456), "0.1235");
        assert_eq!(fmt_num(123.456), "123.5");
        assert_eq!(fmt_num(1.5e-7), "1.500e-7");
        assert_eq!(fmt_num(f64::NAN), "NaN");
    }

    #[test]
    fn numeric_claims() {
        let c = Claim::numeric("x", 1.0, 1.05, 0.0, 0.1);
        assert_eq!(c.verdict, Verdict::Agrees);
        let c = Claim::numeric("x", 1.0, 1.2, 0.05, 0.1);
        assert_eq!(c.verdict, Verdict::DoesNotAgree);
        let c = Claim::numeric("x", 1.0, f64::NAN, 1.0, 1.0);
        assert_eq!(c.verdict, Verdict::DoesNotAgree);
    }
}
