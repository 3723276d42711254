//! Fuzzes the delta reader: any bytes must give a `Delta` or an error, never a panic, and a
//! delta that parses must also survive the checks against a base, adapter construction and
//! re-serialisation.
#![no_main]

use std::sync::OnceLock;

use atoms::{Adapter, Delta, TensorBase};
use candle_core::{Device, Tensor};
use libfuzzer_sys::fuzz_target;

/// The base the seeds were made on (see `fuzz/README.md`): layers of the shapes a delta meets.
fn base() -> &'static TensorBase {
    static BASE: OnceLock<TensorBase> = OnceLock::new();
    BASE.get_or_init(|| {
        let layer = |name: &str, shape: &[usize]| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|i| ((i * 7919) % 201) as f32 / 100.0 - 1.0).collect();
            (name.to_string(), Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
        };
        TensorBase::new(
            "fuzz/base",
            [
                layer("down.conv1", &[8, 4, 3, 3]),
                layer("down.shortcut", &[8, 4, 1, 1]),
                layer("attn.to_q", &[8, 12]),
            ],
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(delta) = Delta::from_bytes(data) else {
        return;
    };
    let _ = delta.num_params();
    let bytes = delta.to_bytes().expect("a parsed delta serialises");
    Delta::from_bytes(&bytes).expect("a serialised delta parses");
    if delta.check_base(base(), false).is_ok() {
        let adapters = delta.adapters(base()).expect("adapters of a delta that fits its base");
        for (layer, a) in &adapters {
            let w = atoms::BaseWeights::weight(base(), layer).unwrap();
            a.effective_weight(&w, 1.0).expect("W' of a delta that fits");
        }
    }
});
