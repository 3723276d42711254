//! `bf16_products.rs`'s tests again, with every left operand tiled for AMX and its products on
//! the emulated tile unit (`ops::cpu_bf16::amx::set_emulated`): the ops' products (linears and
//! their gradients, kept weights, convs and theirs, attention's blocks) through the tile
//! kernel's packing, blocking and addressing, on any CPU with AVX512-BF16. Its own binary: the
//! switches are process-wide.

#[path = "bf16_products.rs"]
mod products;

/// A linear in this binary runs its products on the tiles.
#[test]
fn the_products_here_run_on_tiles() {
    use candle_core::{Device, Tensor};
    if !ops::cpu_bf16::supported() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    ops::cpu_bf16::set_enabled(true);
    ops::cpu_bf16::amx::set_emulated(true);
    let before = ops::cpu_bf16::amx::tiled_runs();
    let x = Tensor::ones((64, 256), candle_core::DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::ones((96, 256), candle_core::DType::F32, &Device::Cpu).unwrap();
    let y = ops::linear::linear(&x, &w, None).unwrap();
    assert_eq!(y.to_vec2::<f32>().unwrap()[63][95], 256.0);
    assert!(ops::cpu_bf16::amx::tiled_runs() > before);
}
