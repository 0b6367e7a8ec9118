//! Figure 1 of the GroupNorm paper from a sweep: test error against batch size per step (log
//! scale, largest on the left), a line per normalizer with error bars over seeds. Written as SVG
//! and PNG with an embedded font (DejaVu Sans), so no system fonts are needed.

use crate::results::{SummaryRow, FIGURE};
use anyhow::{anyhow, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::Path;
use std::sync::Once;

/// Line colours: Tableau's ten, then black and navy, so that a sweep of up to twelve
/// normalizers (`results/remedies/` has eleven) draws no two lines alike.
pub const COLORS: [RGBColor; 12] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(0, 0, 0),
    RGBColor(0, 0, 128),
];

pub fn register_fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is a known-good TTF compiled into the binary; registering it cannot fail.
        let _ = register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

/// x coordinate of batch size `b`: log2(largest / b), so the largest batch sits at 0.
fn x_of(b: usize, largest: usize) -> f64 {
    (largest as f64 / b as f64).log2()
}

/// The y range: every mean ± std, padded by a tenth (at least a point), within 0–100%.
pub fn y_range(rows: &[SummaryRow]) -> (f64, f64) {
    let finite = rows.iter().filter(|r| r.n > 0);
    if finite.clone().next().is_none() {
        return (0.0, 100.0);
    }
    let y_max = finite
        .clone()
        .map(|r| r.test_error_mean + r.test_error_std)
        .fold(0.0, f64::max);
    let y_min = finite
        .map(|r| r.test_error_mean - r.test_error_std)
        .fold(f64::MAX, f64::min);
    let pad = ((y_max - y_min) * 0.1).max(1.0);
    ((y_min - pad).max(0.0), (y_max + pad).min(100.0))
}

/// `norm`'s (x, mean, std) at each batch size that has finished runs.
fn points(
    rows: &[SummaryRow],
    norm: &str,
    sizes: &[usize],
    largest: usize,
) -> Vec<(f64, f64, f64)> {
    sizes
        .iter()
        .filter_map(|&b| {
            rows.iter()
                .find(|r| r.norm == norm && r.batch_size == b && r.n > 0)
        })
        .map(|r| {
            (
                x_of(r.batch_size, largest),
                r.test_error_mean,
                r.test_error_std,
            )
        })
        .collect()
}

/// The figure: axes, then for each normalizer its line, points and error bars, then the legend.
fn draw<DB: DrawingBackend>(
    area: DrawingArea<DB, Shift>,
    rows: &[SummaryRow],
    norms: &[String],
    sizes: &[usize],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the figure: {e:?}");
    area.fill(&WHITE).map_err(err)?;
    let largest = *sizes.first().unwrap_or(&32);
    let x_max = sizes
        .iter()
        .map(|&b| x_of(b, largest))
        .fold(0.0, f64::max)
        .max(1.0);
    let (y_lo, y_hi) = y_range(rows);
    let mut chart = ChartBuilder::on(&area)
        .caption("Test error vs. batch size per step", ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(-0.25..x_max + 0.25, y_lo..y_hi)
        .map_err(err)?;
    let ticks = sizes.len().max(2);
    chart
        .configure_mesh()
        .x_desc("batch size per step (log scale)")
        .y_desc("test error (%)")
        .x_labels(ticks)
        .x_label_formatter(&|x| {
            let b = largest as f64 / 2f64.powf(*x);
            if (b - b.round()).abs() < 1e-6 {
                format!("{}", b.round())
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(err)?;
    for (i, norm) in norms.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points = points(rows, norm, sizes, largest);
        draw_line(&mut chart, &points, color, Some(norm.clone()))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(err)?;
    area.present().map_err(err)?;
    Ok(())
}

/// Draws one line of (x, mean, std) points with a marker and an error bar at each, named in the
/// legend when `label` is given.
pub fn draw_line<DB: DrawingBackend>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    points: &[(f64, f64, f64)],
    color: RGBColor,
    label: Option<String>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the figure: {e:?}");
    let series = chart
        .draw_series(LineSeries::new(
            points.iter().map(|p| (p.0, p.1)),
            color.stroke_width(2),
        ))
        .map_err(err)?;
    if let Some(label) = label {
        series.label(label).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
        });
    }
    chart
        .draw_series(
            points
                .iter()
                .map(|p| Circle::new((p.0, p.1), 4, color.filled())),
        )
        .map_err(err)?;
    chart
        .draw_series(points.iter().map(|p| {
            ErrorBar::new_vertical(p.0, p.1 - p.2, p.1, p.1 + p.2, color.stroke_width(1), 8)
        }))
        .map_err(err)?;
    Ok(())
}

/// Draws a figure with `$draw(area, args...)` into `$dir/$stem.svg` and `$dir/$stem.png`, each
/// through a temporary file of this process's own.
macro_rules! save_figure {
    ($dir:expr, $stem:expr, $size:expr, $draw:ident($($arg:expr),*)) => {{
        $crate::plot::register_fonts();
        let (dir, stem): (&std::path::Path, &str) = ($dir, $stem);
        let mut svg = String::new();
        $draw(
            plotters::prelude::SVGBackend::with_string(&mut svg, $size).into_drawing_area(),
            $($arg),*
        )?;
        $crate::results::write_atomic(&dir.join(format!("{stem}.svg")), svg.as_bytes())?;
        let png_tmp = dir.join(format!("{stem}.png.{}.tmp.png", std::process::id()));
        $draw(
            plotters::prelude::BitMapBackend::new(&png_tmp, $size).into_drawing_area(),
            $($arg),*
        )?;
        std::fs::rename(&png_tmp, dir.join(format!("{stem}.png")))?;
        anyhow::Ok(())
    }};
}
pub(crate) use save_figure;

/// Writes `error_vs_batch.svg` and `error_vs_batch.png` into `dir`.
pub fn error_vs_batch(
    rows: &[SummaryRow],
    norms: &[String],
    sizes: &[usize],
    dir: &Path,
) -> Result<()> {
    save_figure!(dir, FIGURE, (800, 560), draw(rows, norms, sizes))
}
