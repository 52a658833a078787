//! The loss curve of a run as a PNG, drawn at the end from `metrics.jsonl`.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::error::TrainError;
use crate::metrics::read_losses;

/// Embedded so that the plot has text on machines without fonts.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Draws train loss (line) and eval loss (points) against the step into `png`.
pub fn loss_curve(metrics: &Path, png: &Path) -> Result<(), TrainError> {
    let train = read_losses(metrics, "train")?;
    let eval = read_losses(metrics, "eval")?;
    draw(&train, &eval, png).map_err(|e| TrainError::Io {
        path: png.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

fn draw(
    train: &[(u64, f64)],
    eval: &[(u64, f64)],
    png: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    // Registering twice is harmless; the font must be known before the first text is drawn.
    let _ = register_font("sans-serif", FontStyle::Normal, FONT);
    let points = train.iter().chain(eval);
    let max_step = points.clone().map(|p| p.0).max().unwrap_or(1).max(1);
    let (lo, hi) = points.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    let (lo, hi) = if lo.is_finite() {
        (lo.min(0.0), hi * 1.05 + 1e-9)
    } else {
        (0.0, 1.0)
    };

    let root = BitMapBackend::new(png, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("qwen-sft loss", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0u64..max_step, lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss per supervised token")
        .draw()?;
    chart
        .draw_series(LineSeries::new(train.iter().copied(), BLUE.stroke_width(2)))?
        .label("train")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    if !eval.is_empty() {
        chart
            .draw_series(eval.iter().map(|&p| Circle::new(p, 4, RED.filled())))?
            .label("eval")
            .legend(|(x, y)| Circle::new((x + 10, y), 4, RED.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
