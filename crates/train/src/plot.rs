//! The loss curve as a PNG: raw losses in light blue, their moving average in dark blue, on a
//! white canvas with axes (no text: the numbers are in `metrics.jsonl`).

use std::path::Path;

use crate::Result;

const W: usize = 800;
const H: usize = 400;
const PAD: usize = 30;

struct Canvas(Vec<u8>);

impl Canvas {
    fn dot(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.0[i..i + 3].copy_from_slice(&c);
        }
    }

    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let n = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
        for k in 0..=n {
            self.dot(x0 + (x1 - x0) * k / n, y0 + (y1 - y0) * k / n, c);
        }
    }
}

/// Draws `losses` (one per step) to `path`.
pub fn write_loss_curve(path: &Path, losses: &[f64]) -> Result<()> {
    let mut c = Canvas(vec![255; W * H * 3]);
    let (x0, y0, x1, y1) = (PAD as i64, (H - PAD) as i64, (W - PAD) as i64, PAD as i64);
    c.line((x0, y0), (x1, y0), [120, 120, 120]);
    c.line((x0, y0), (x0, y1), [120, 120, 120]);
    let finite: Vec<f64> = losses.iter().copied().filter(|x| x.is_finite()).collect();
    if finite.len() >= 2 {
        let (lo, hi) = finite
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        let span = if hi > lo { hi - lo } else { 1.0 };
        let px = |i: usize, v: f64| -> (i64, i64) {
            let x = x0 + ((x1 - x0) as f64 * i as f64 / (finite.len() - 1) as f64) as i64;
            let y = y0 - ((y0 - y1) as f64 * (v - lo) / span) as i64;
            (x, y)
        };
        let mut ema = finite[0];
        let mut prev_raw = px(0, finite[0]);
        let mut prev_ema = prev_raw;
        for (i, &v) in finite.iter().enumerate().skip(1) {
            ema = 0.9 * ema + 0.1 * v;
            let (r, e) = (px(i, v), px(i, ema));
            c.line(prev_raw, r, [150, 190, 240]);
            c.line(prev_ema, e, [20, 60, 160]);
            prev_raw = r;
            prev_ema = e;
        }
    }
    let text = format!(
        "atomtune loss curve: {} steps, min {:.5}",
        losses.len(),
        finite.iter().cloned().fold(f64::NAN, f64::min)
    );
    sample::png_io::write_png(path, W, H, &c.0, &text)?;
    Ok(())
}
