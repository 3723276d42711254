//! `loss.png`: the loss curve of a run, with plotters. Raw losses (light) and their moving
//! average (dark) on the left axis, the learning rate on the right one, validation steps as
//! vertical lines, axes with ticks and labels, and a title naming the subject, the method and
//! the base model. The text is drawn with the DejaVu Sans Mono font built into the binary
//! (`assets/fonts`), so no system font is needed.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::{Error, Result};

const W: u32 = 960;
const H: u32 = 540;
const FONT: &str = "sans-serif";
/// The moving average's decay.
const SMOOTHING: f64 = 0.9;

/// One step's numbers, as `metrics.jsonl` records them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepPoint {
    /// The step (1-based).
    pub step: usize,
    /// Its loss.
    pub loss: f64,
    /// Its learning rate.
    pub lr: f64,
}

/// What the plot shows.
#[derive(Clone, Debug)]
pub struct LossCurve {
    /// The title (subject, method, base model).
    pub title: String,
    /// The steps, in order.
    pub points: Vec<StepPoint>,
    /// Steps after which validation images were sampled.
    pub validation_steps: Vec<usize>,
}

/// The steps of a `metrics.jsonl` (lines with `step`, `loss` and `lr`).
pub fn read_points(metrics: &str) -> Vec<StepPoint> {
    metrics
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some(StepPoint {
                step: v.get("step")?.as_u64()? as usize,
                loss: v.get("loss")?.as_f64()?,
                lr: v.get("lr")?.as_f64()?,
            })
        })
        .collect()
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        const BYTES: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSansMono.ttf");
        // the font is built in and known to parse; were it not, text would be left out
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, BYTES);
    });
}

/// The exponential moving average of `v` (decay [`SMOOTHING`]).
fn smoothed(v: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut acc = None;
    v.iter()
        .map(|&(x, y)| {
            let s = acc.map_or(y, |a: f64| SMOOTHING * a + (1.0 - SMOOTHING) * y);
            acc = Some(s);
            (x, s)
        })
        .collect()
}

/// `lo..hi` padded by 5% (a flat range gets some height).
fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let span = if hi > lo { hi - lo } else { lo.abs().max(1e-3) };
    (lo - 0.05 * span)..(hi + 0.05 * span)
}

/// Draws `curve` into an RGB buffer of `W x H`.
fn draw(buf: &mut [u8], c: &LossCurve) -> std::result::Result<(), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    register_font();
    let root = BitMapBackend::with_buffer(buf, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let raw: Vec<(f64, f64)> = c
        .points
        .iter()
        .filter(|p| p.loss.is_finite())
        .map(|p| (p.step as f64, p.loss))
        .collect();
    let lr: Vec<(f64, f64)> = c.points.iter().map(|p| (p.step as f64, p.lr)).collect();
    let first = c.points.first().map_or(0, |p| p.step) as f64;
    let last = (c.points.last().map_or(1, |p| p.step) as f64).max(first + 1.0);
    let (lo, hi) = raw
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &(_, y)| (a.min(y), b.max(y)));
    let loss_range = if raw.is_empty() {
        0.0..1.0
    } else {
        padded(lo, hi)
    };
    let lr_max = lr.iter().map(|p| p.1).fold(0.0, f64::max);
    let lr_range = 0.0..if lr_max > 0.0 { lr_max * 1.1 } else { 1.0 };
    let mut chart = ChartBuilder::on(&root)
        .caption(&c.title, (FONT, 20))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .right_y_label_area_size(84)
        .build_cartesian_2d(first..last, loss_range.clone())
        .map_err(|x| e(&x))?
        .set_secondary_coord(first..last, lr_range);
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.3}"))
        .draw()
        .map_err(|x| e(&x))?;
    chart
        .configure_secondary_axes()
        .y_desc("learning rate")
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .y_label_formatter(&|y| format!("{y:.1e}"))
        .draw()
        .map_err(|x| e(&x))?;
    let green = RGBColor(40, 150, 60);
    for (k, &s) in c.validation_steps.iter().enumerate() {
        let x = s as f64;
        let line = [(x, loss_range.start), (x, loss_range.end)];
        let drawn = chart
            .draw_series(LineSeries::new(line, green.stroke_width(1)))
            .map_err(|x| e(&x))?;
        if k == 0 {
            drawn
                .label("validation images")
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], green));
        }
    }
    let light = RGBColor(150, 190, 240);
    let dark = RGBColor(20, 60, 160);
    let orange = RGBColor(230, 120, 20);
    chart
        .draw_series(LineSeries::new(raw.iter().copied(), light))
        .map_err(|x| e(&x))?
        .label("loss")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], light));
    chart
        .draw_series(LineSeries::new(smoothed(&raw), dark.stroke_width(2)))
        .map_err(|x| e(&x))?
        .label(format!("loss, moving average ({SMOOTHING})"))
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], dark.stroke_width(2)));
    chart
        .draw_secondary_series(LineSeries::new(lr, orange))
        .map_err(|x| e(&x))?
        .label("learning rate (right axis)")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], orange));
    chart
        .configure_series_labels()
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// Draws `curve` to the PNG `path` (written to a temporary file, then renamed).
pub fn write_loss_curve(path: &Path, curve: &LossCurve) -> Result<()> {
    let mut buf = vec![255u8; (W * H * 3) as usize];
    draw(&mut buf, curve).map_err(|e| Error::Config(format!("drawing the loss plot: {e}")))?;
    let finite = curve.points.iter().filter(|p| p.loss.is_finite());
    let text = format!(
        "{}: {} steps, min loss {:.5}",
        curve.title,
        curve.points.len(),
        finite.map(|p| p.loss).fold(f64::NAN, f64::min)
    );
    sample::png_io::write_png(path, W as usize, H as usize, &buf, &text)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plot has its three curves' colours, tick labels and a title (dark text pixels in
    /// the caption band and beside the axes), and the validation line.
    #[test]
    fn the_plot_has_curves_labels_and_a_title() {
        let points: Vec<StepPoint> = (1..=200)
            .map(|s| StepPoint {
                step: s,
                loss: 0.2 + 0.8 / (s as f64).sqrt() + 0.05 * ((s * 7) as f64).sin(),
                lr: 1e-3 * (s as f64 / 200.0).min(1.0),
            })
            .collect();
        let curve = LossCurve {
            title: "sks dog: atoms on tiny-sd15-shape".into(),
            points,
            validation_steps: vec![100, 200],
        };
        let mut buf = vec![255u8; (W * H * 3) as usize];
        draw(&mut buf, &curve).unwrap();
        let px = |x: u32, y: u32| {
            let i = ((y * W + x) * 3) as usize;
            [buf[i], buf[i + 1], buf[i + 2]]
        };
        let count = |rows: std::ops::Range<u32>,
                     cols: std::ops::Range<u32>,
                     f: &dyn Fn([u8; 3]) -> bool| {
            rows.flat_map(|y| cols.clone().map(move |x| (x, y)))
                .filter(|&(x, y)| f(px(x, y)))
                .count()
        };
        let all = |f: &dyn Fn([u8; 3]) -> bool| count(0..H, 0..W, f);
        assert!(all(&|p| p == [20, 60, 160]) > 200, "the moving average");
        assert!(all(&|p| p == [150, 190, 240]) > 200, "the raw loss");
        assert!(all(&|p| p == [230, 120, 20]) > 200, "the learning rate");
        assert!(all(&|p| p == [40, 150, 60]) > 100, "validation lines");
        let dark = |p: [u8; 3]| p.iter().all(|&c| c < 100);
        assert!(count(0..40, 0..W, &dark) > 100, "a title");
        assert!(
            count(0..H, 0..60, &dark) > 100,
            "loss tick labels and their name"
        );
        assert!(
            count(0..H, W - 80..W, &dark) > 100,
            "learning-rate tick labels"
        );
        assert!(
            count(H - 44..H, 0..W, &dark) > 100,
            "step tick labels and their name"
        );
        // without any step it still draws (empty axes)
        let empty = LossCurve {
            points: Vec::new(),
            validation_steps: Vec::new(),
            ..curve
        };
        draw(&mut vec![255u8; (W * H * 3) as usize], &empty).unwrap();
    }
}
