//! The fused attention op alone at SD 1.5's first level (4096 positions, 8 heads of 40, f32):
//! forward and backward seconds for each score-chunk size, the numbers behind `CHUNK_BYTES`.
//! With `ATOMTUNE_CPU_BF16=1` on a CPU with AVX512-BF16 the op runs its bf16 products in
//! blocks of its own (`attention/bf16.rs`), whatever the chunk size: every line times the same.
//!
//! ```text
//! cargo bench -p atomtune-ops --bench attention -- [--positions N] [--keys M] [--runs N]
//! ```
//!
//! `--keys 77`: a cross-attention's keys and values (77 text tokens; default: self-attention).
//!
//! One JSON line per chunk size: median forward and backward seconds over `--runs` (default 5).

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run() -> ops::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| v.parse().expect("a number"))
    };
    let (n, runs, heads, d) = (flag("--positions", 4096), flag("--runs", 5).max(1), 8, 40);
    let m = flag("--keys", n);
    let var = |n| Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, n, heads * d), &Device::Cpu)?);
    let (q, k, v) = (var(n)?, var(m)?, var(m)?);
    let w = Tensor::randn(0f32, 1.0, (1, n, heads * d), &Device::Cpu)?.to_dtype(DType::F32)?;
    let scale = 1.0 / (d as f64).sqrt();
    for kib in [128, 256, 512, 1024, 2048, 4096, 8192] {
        let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
        for _ in 0..=runs {
            let t = Instant::now();
            let o = ops::attention::attention_chunked(&q, &k, &v, heads, scale, kib << 10)?;
            let loss = (o * &w)?.sum_all()?;
            fwd.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            loss.backward()?;
            bwd.push(t.elapsed().as_secs_f64());
        }
        // the first run warms the allocator up
        let (f, b) = (median(fwd[1..].to_vec()), median(bwd[1..].to_vec()));
        println!(
            "{{\"chunk_kib\": {kib}, \"positions\": {n}, \"keys\": {m}, \"heads\": {heads}, \"head_dim\": {d}, \"fwd_s\": {f:.4}, \"bwd_s\": {b:.4}, \"total_s\": {:.4}}}",
            f + b
        );
    }
    Ok(())
}

fn main() -> ops::Result<()> {
    ops::tune_process();
    ops::on_compute_thread(run)
}
