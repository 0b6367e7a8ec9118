//! The figure of a sweep with `--vary`: test error against the first varied key (evenly spaced
//! values: a log scale when they are geometric), a line per normalizer with error bars over
//! seeds, one panel per combination of the other keys' values. A cell with diverged runs gets a
//! cross at the top of its panel, so that where a setting breaks training stays visible.

use crate::plot::{draw_line, save_figure, y_range, COLORS};
use crate::report_vary::{cell, lines, Layout};
use crate::results::SummaryRow;
use crate::vary;
use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// The file name (without extension) of the figure for varied key `key`.
pub fn stem(key: &str) -> String {
    format!("error_vs_{key}")
}

/// Writes `error_vs_<key>.svg` and `.png` into `dir`.
pub fn error_vs_setting(
    rows: &[SummaryRow],
    norms: &[String],
    sizes: &[usize],
    dir: &Path,
) -> Result<()> {
    let layout = Layout::of(rows);
    let panels = layout.panels.len().max(1);
    let cols = panels.min(3);
    let grid = (panels.div_ceil(cols), cols);
    let size = (560 * grid.1 as u32 + 240, 480 * grid.0 as u32);
    save_figure!(
        dir,
        &stem(&layout.key),
        size,
        draw(rows, norms, sizes, &layout, grid)
    )
}

fn draw<DB: DrawingBackend>(
    area: DrawingArea<DB, Shift>,
    rows: &[SummaryRow],
    norms: &[String],
    sizes: &[usize],
    layout: &Layout,
    grid: (usize, usize),
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the figure: {e:?}");
    area.fill(&WHITE).map_err(err)?;
    for (i, (panel, sub)) in layout
        .panels
        .iter()
        .zip(area.split_evenly(grid))
        .enumerate()
    {
        draw_panel(sub, rows, norms, sizes, layout, panel, i == 0)?;
    }
    area.present().map_err(err)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn draw_panel<DB: DrawingBackend>(
    area: DrawingArea<DB, Shift>,
    rows: &[SummaryRow],
    norms: &[String],
    sizes: &[usize],
    layout: &Layout,
    panel: &vary::Setting,
    legend: bool,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the figure: {e:?}");
    let (y_lo, y_hi) = y_range(rows);
    let n = layout.values.len();
    let title = if panel.is_empty() {
        format!("Test error vs. {}", layout.key)
    } else {
        vary::label(panel)
    };
    let scale = if layout.geometric() {
        "log scale"
    } else {
        "values evenly spaced"
    };
    let mut chart = ChartBuilder::on(&area)
        .caption(title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(-0.3..(n as f64 - 0.7).max(0.3), y_lo..y_hi)
        .map_err(err)?;
    let values = layout.values.clone();
    chart
        .configure_mesh()
        .x_desc(format!(
            "{} ({scale}); × at the top: diverged runs",
            layout.key
        ))
        .y_desc("test error (%)")
        .x_labels(n.max(2))
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                values.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for (i, (label, norm, b)) in lines(norms, sizes).into_iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let cells: Vec<(f64, Option<&SummaryRow>)> = layout
            .values
            .iter()
            .enumerate()
            .map(|(j, v)| (j as f64, cell(rows, &norm, b, &layout.setting(v, panel))))
            .collect();
        let points: Vec<(f64, f64, f64)> = cells
            .iter()
            .filter_map(|(x, c)| {
                c.filter(|c| c.n > 0)
                    .map(|c| (*x, c.test_error_mean, c.test_error_std))
            })
            .collect();
        draw_line(&mut chart, &points, color, legend.then_some(label))?;
        let top = y_hi - (y_hi - y_lo) * 0.03;
        chart
            .draw_series(
                cells
                    .iter()
                    .filter(|(_, c)| c.is_some_and(|c| c.n_diverged > 0))
                    .map(|(x, _)| Cross::new((*x, top), 6, color.stroke_width(2))),
            )
            .map_err(err)?;
    }
    if legend {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(err)?;
    }
    Ok(())
}
