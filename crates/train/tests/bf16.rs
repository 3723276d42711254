//! Training with bf16 matrix products and bf16 conv and linear weights on the CPU (`--dtype
//! bf16`, `ops::cpu_bf16`) on the tiny fixture: 20 steps track the f32 run's losses, and learning happens. One test in its own
//! binary: the switch is process-wide.

mod common;

use atoms::Method;
use common::{config, fixture, photos};
use train::Trainer;

/// The losses of `steps` training steps from the same seed, and the evaluation loss before and
/// after.
fn run(bf16: bool, steps: usize) -> (Vec<f64>, f64, f64) {
    let (fx, imgs) = (fixture().unwrap(), photos(3).unwrap());
    let out = tempfile::tempdir().unwrap();
    models::cpu_bf16::set_enabled(bf16);
    // as `atomtune` runs bf16: conv and linear weights kept in bf16 too
    let opts = models::LoadOptions {
        bf16_weights: bf16,
        ..Default::default()
    };
    let sd = models::StableDiffusion::load(fx.to_str().unwrap(), &opts).unwrap();
    let cfg = config(imgs.path(), out.path(), Method::Atoms, 3e-3, steps);
    let mut t = Trainer::prepare(&sd, cfg, None, &mut |_| {}).unwrap();
    let set = t.eval_set(&[150, 450, 750], 1).unwrap();
    let before = t.eval_loss(&set).unwrap();
    let losses = (0..steps).map(|_| t.train_step().unwrap().loss).collect();
    let after = t.eval_loss(&set).unwrap();
    models::cpu_bf16::set_enabled(false);
    (losses, before, after)
}

/// Each of 20 steps' losses within 3% of the f32 run's (same seed, examples, timesteps and
/// noise; bf16 rounds each product's operands to 8 bits of mantissa), not all equal to it, and
/// the evaluation loss falls by 5% or more as it does in f32 (the learning test).
#[test]
fn bf16_training_tracks_f32_and_learns() {
    if !models::cpu_bf16::supported() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    if fixture().is_none() || photos(1).is_none() {
        return;
    }
    let (f32_losses, _, _) = run(false, 20);
    let (bf16_losses, _, _) = run(true, 20);
    let worst = f32_losses
        .iter()
        .zip(&bf16_losses)
        .map(|(a, b)| (a - b).abs() / a)
        .fold(0f64, f64::max);
    eprintln!("largest relative loss difference over 20 steps: {worst:.2e}");
    assert!(
        worst < 3e-2,
        "bf16 losses {bf16_losses:?} vs f32 {f32_losses:?}"
    );
    assert!(
        worst > 0.0,
        "the bf16 run equals the f32 one: did bf16 run?"
    );
    let (_, before, after) = run(true, 25);
    assert!(
        after < 0.95 * before,
        "bf16: evaluation loss {before} -> {after} after 25 steps"
    );
}
