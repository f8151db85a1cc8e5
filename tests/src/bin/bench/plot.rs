//! SVG line charts of a measure against the number of Services (plotters).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::{
    coord::{Shift, ranged1d::AsRangedCoord, ranged1d::ValueFormatter},
    prelude::*,
};

/// One contender's points (Services, value).
pub struct Series {
    pub name: &'static str,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
}

/// Writes a chart of `series` against the number of Services (log scale) to `path`; the y axis is
/// logarithmic when `log_y` (measures spanning orders of magnitude, such as programming time).
pub fn chart(path: &Path, title: &str, y_label: &str, log_y: bool, series: &[Series]) -> Result<()> {
    let points = || series.iter().flat_map(|s| s.points.iter().copied());
    let (x_min, x_max) = points().fold((f64::MAX, f64::MIN), |(lo, hi), (x, _)| (lo.min(x), hi.max(x)));
    let (y_min, y_max) = points().fold((f64::MAX, f64::MIN), |(lo, hi), (_, y)| (lo.min(y), hi.max(y)));
    if x_min > x_max {
        return Err(anyhow!("nothing to plot for {title}"));
    }
    let root = SVGBackend::new(path, (760, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let x = (x_min * 0.8..x_max * 1.25).log_scale();
    if log_y {
        draw(&root, title, y_label, x, (y_min.max(1e-3) * 0.5..y_max * 2.0).log_scale(), series)
    } else {
        draw(&root, title, y_label, x, 0.0..y_max * 1.15, series)
    }?;
    root.present().map_err(|e| anyhow!("{e}"))
}

fn draw<X, Y>(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    title: &str,
    y_label: &str,
    x: X,
    y: Y,
    series: &[Series],
) -> Result<()>
where
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let err = |e: DrawingAreaErrorKind<_>| anyhow!("{e}");
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(76)
        .build_cartesian_2d(x, y)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("Services (× 10 endpoints)")
        .y_desc(y_label)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(err)?;
    for s in series {
        let style = s.color.stroke_width(2);
        chart
            .draw_series(LineSeries::new(s.points.clone(), style))
            .map_err(err)?
            .label(s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, s.color.filled()))).map_err(err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;
    Ok(())
}
