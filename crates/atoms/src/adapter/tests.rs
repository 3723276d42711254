//! Adapter invariants: exact start, gradients equal to finite differences, the math of `dW`
//! against a direct evaluation of DESIGN.md's formulas, parameter counts.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use super::*;
use crate::dictionary::LassoOptions;
use crate::Dictionary;

fn lasso() -> DictionaryKind {
    DictionaryKind::Lasso(LassoOptions {
        lambda: 0.05,
        iterations: 3,
        ..Default::default()
    })
}

/// Every method, with the atoms methods on both dictionaries and at `m < d`.
fn configs() -> Vec<(String, AdapterConfig)> {
    let mut out = Vec::new();
    for method in Method::ALL {
        let base = AdapterConfig {
            seed: 7,
            rank: 2,
            lora_alpha: 3.0,
            ..AdapterConfig::new(method)
        };
        out.push((method.to_string(), base.clone()));
        if matches!(method, Method::Atoms | Method::AtomsRec) {
            out.push((
                format!("{method} lasso"),
                AdapterConfig {
                    dictionary: lasso(),
                    ..base.clone()
                },
            ));
            out.push((
                format!("{method} m=1"),
                AdapterConfig {
                    atoms: Some(1),
                    ..base.clone()
                },
            ));
        }
    }
    out
}

/// Weight shapes: 3x3 conv, 1x1 conv, non-square kernel, linear in 4x4 blocks.
const SHAPES: [&[usize]; 4] = [&[6, 4, 3, 3], &[5, 3, 1, 1], &[4, 3, 3, 2], &[8, 12]];

fn random(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn bits(t: &Tensor) -> Vec<u64> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F64 => t
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect(),
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        other => panic!("{other:?}"),
    }
}

fn layer_weights(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut w = random(shape, seed, DType::F64);
    // Give kernels correlated taps so dictionaries are not trivial.
    if shape.len() == 4 {
        w = (w.clone() + w.roll(1, 3).unwrap().affine(0.5, 0.0).unwrap()).unwrap();
    }
    w.to_dtype(dtype).unwrap()
}

/// Sets every parameter of `a` to random values, so that every gradient is non-zero.
fn randomize(a: &LayerAdapter, seed: u64) {
    for (k, v) in a.vars().iter().enumerate() {
        let r = random(v.dims(), seed + k as u64, v.dtype())
            .affine(0.3, 0.0)
            .unwrap();
        v.set(&r).unwrap();
    }
}

#[test]
fn every_adapter_starts_exactly_at_the_base_weight() {
    for dtype in [DType::F32, DType::F64, DType::F16] {
        for shape in SHAPES {
            let w = layer_weights(shape, 1, dtype);
            for (name, cfg) in configs() {
                let a = LayerAdapter::new(&cfg, "layer", &w).unwrap();
                let w2 = a.effective_weight(&w, 1.0).unwrap();
                assert_eq!(w2.dtype(), dtype);
                assert_eq!(w2.dims(), shape);
                assert_eq!(
                    bits(&w2),
                    bits(&w),
                    "{name} {shape:?} {dtype:?}: W' != W at init"
                );
                let w3 = a.effective_weight(&w, 0.7).unwrap();
                assert_eq!(
                    bits(&w3),
                    bits(&w),
                    "{name} {shape:?} {dtype:?}: scaled W' != W at init"
                );
            }
        }
    }
}

#[test]
fn scale_zero_gives_the_base_and_scale_is_linear() {
    for shape in SHAPES {
        let w = layer_weights(shape, 2, DType::F64);
        for (name, cfg) in configs() {
            let a = LayerAdapter::new(&cfg, "layer", &w).unwrap();
            randomize(&a, 11);
            assert_eq!(
                bits(&a.effective_weight(&w, 0.0).unwrap()),
                bits(&w),
                "{name}"
            );
            let d1 = (a.effective_weight(&w, 1.0).unwrap() - &w).unwrap();
            let d2 = (a.effective_weight(&w, 2.5).unwrap() - &w).unwrap();
            let nz = d1
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(
                nz > 1e-3,
                "{name} {shape:?}: randomized adapter changes nothing"
            );
            let err = (d2 - d1.affine(2.5, 0.0).unwrap()).unwrap().abs().unwrap();
            let err = err.max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(
                err < 1e-12 * (1.0 + nz),
                "{name} {shape:?}: scale not linear ({err})"
            );
        }
    }
}

/// `dW` by DESIGN.md's formulas, evaluated element by element in f64 from the adapter's own
/// tensors and the dictionary's coefficients.
fn reference_delta(a: &LayerAdapter, w: &Tensor, cfg: &AdapterConfig) -> Vec<f64> {
    let layout = *a.layout();
    let t: std::collections::HashMap<_, _> = a.tensors().unwrap().into_iter().collect();
    let v = |s: &str| t[s].flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let (n, d) = (layout.num_filters(), layout.filter_dim());
    match a.method() {
        Method::Atoms | Method::AtomsRec => {
            let atoms = v("atoms");
            let m = atoms.len() / d;
            let dict = Dictionary::from_atoms(atoms, m, d, cfg.dictionary).unwrap();
            let alpha = dict.coefficients(&layout.filters_f64(w).unwrap()).unwrap();
            let g = layout.groups();
            // dD for filter row r: the layer's dD, or dD[group of r] for atoms-rec.
            let dd: Vec<f64> = if a.method() == Method::Atoms {
                (0..g).flat_map(|_| v("delta")).collect()
            } else {
                let (beta, d1) = (v("beta"), v("d1"));
                let m1 = beta.len() / (g * m);
                let mut dd = vec![0f64; g * m * d];
                for i in 0..g {
                    for l in 0..m {
                        for k in 0..m1 {
                            for j in 0..d {
                                dd[(i * m + l) * d + j] +=
                                    beta[(i * m + l) * m1 + k] * d1[(l * m1 + k) * d + j];
                            }
                        }
                    }
                }
                dd
            };
            let mut out = vec![0f64; n * d];
            for r in 0..n {
                let i = r % g; // filters are output-major, so the input group is r mod g
                for l in 0..m {
                    for j in 0..d {
                        out[r * d + j] += alpha[r * m + l] * dd[(i * m + l) * d + j];
                    }
                }
            }
            let f = Tensor::from_vec(out, (n, d), &Device::Cpu).unwrap();
            layout
                .from_filters(&f)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        }
        Method::Lora => {
            let (down, up) = (v("lora_down"), v("lora_up"));
            let co = layout.channels().0;
            let r = up.len() / co;
            let k = down.len() / r;
            let mut out = vec![0f64; co * k];
            for o in 0..co {
                for c in 0..k {
                    for q in 0..r {
                        out[o * k + c] +=
                            up[o * r + q] * down[q * k + c] * cfg.lora_alpha / r as f64;
                    }
                }
            }
            out
        }
        Method::Full => v("diff"),
    }
}

#[test]
fn delta_weight_matches_the_formulas_of_the_design() {
    for shape in SHAPES {
        let w = layer_weights(shape, 3, DType::F64);
        for (name, cfg) in configs() {
            let a = LayerAdapter::new(&cfg, "layer", &w).unwrap();
            randomize(&a, 5);
            let got = a
                .delta_weight(&w, 1.0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let want = reference_delta(&a, &w, &cfg);
            let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
            assert!(scale > 0.0, "{name}");
            for (g, r) in got.iter().zip(&want) {
                assert!(
                    (g - r).abs() <= 1e-12 * scale,
                    "{name} {shape:?}: {g} vs {r}"
                );
            }
            let eff = (a.effective_weight(&w, 1.0).unwrap() - &w).unwrap();
            let eff = eff.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for (g, r) in eff.iter().zip(&want) {
                assert!(
                    (g - r).abs() <= 1e-12 * scale + 1e-15,
                    "{name} {shape:?}: W' - W {g} vs {r}"
                );
            }
        }
    }
}

/// `L = sum(layer(x; W') * R)` for a conv (padding 1) or a linear layer.
fn loss(a: &LayerAdapter, w: &Tensor, x: &Tensor, r: &Tensor) -> Tensor {
    let wp = a.effective_weight(w, 0.8).unwrap();
    let y = if w.rank() == 4 {
        x.conv2d(&wp, 1, 1, 1, 1).unwrap()
    } else {
        candle_core::Tensor::matmul(x, &wp.t().unwrap()).unwrap()
    };
    (y * r).unwrap().sum_all().unwrap()
}

#[test]
fn gradients_equal_central_finite_differences_in_f64() {
    for shape in SHAPES {
        let w = layer_weights(shape, 4, DType::F64);
        let x = if shape.len() == 4 {
            random(&[2, shape[1], 6, 5], 8, DType::F64)
        } else {
            random(&[3, shape[1]], 8, DType::F64)
        };
        let y_shape = if shape.len() == 4 {
            x.conv2d(&w, 1, 1, 1, 1).unwrap().dims().to_vec()
        } else {
            vec![3, shape[0]]
        };
        let r = random(&y_shape, 9, DType::F64);
        for (name, cfg) in configs() {
            let a = LayerAdapter::new(&cfg, "layer", &w).unwrap();
            randomize(&a, 6);
            let grads = loss(&a, &w, &x, &r).backward().unwrap();
            for (k, var) in a.vars().iter().enumerate() {
                let g = grads
                    .get(var)
                    .unwrap_or_else(|| panic!("{name} {shape:?}: no gradient for parameter {k}"));
                let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let v0 = var
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                // L is linear in each parameter tensor, so central differences carry no truncation
                // error and a large step keeps round-off small.
                let h = 1e-2;
                let mut fd = Vec::with_capacity(v0.len());
                for i in 0..v0.len() {
                    let mut v = v0.clone();
                    let mut at = |delta: f64| {
                        v[i] = v0[i] + delta;
                        var.set(&Tensor::from_slice(&v, var.dims(), &Device::Cpu).unwrap())
                            .unwrap();
                        loss(&a, &w, &x, &r).to_scalar::<f64>().unwrap()
                    };
                    fd.push((at(h) - at(-h)) / (2.0 * h));
                }
                var.set(&Tensor::from_slice(&v0, var.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                let norm = fd.iter().map(|x| x * x).sum::<f64>().sqrt();
                let err = g
                    .iter()
                    .zip(&fd)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f64>()
                    .sqrt();
                assert!(
                    norm > 1e-8,
                    "{name} {shape:?}: zero gradient for parameter {k}"
                );
                assert!(
                    err / norm < 1e-6,
                    "{name} {shape:?} param {k}: relative error {}",
                    err / norm
                );
            }
        }
    }
}

#[test]
fn parameter_counts_follow_the_design() {
    let w = layer_weights(&[6, 4, 3, 3], 1, DType::F32);
    let lin = layer_weights(&[8, 12], 1, DType::F32);
    let count =
        |cfg: &AdapterConfig, w: &Tensor| LayerAdapter::new(cfg, "l", w).unwrap().num_params();
    let c = |m| AdapterConfig::new(m);
    assert_eq!(count(&c(Method::Atoms), &w), 81);
    assert_eq!(
        count(
            &AdapterConfig {
                atoms: Some(4),
                ..c(Method::Atoms)
            },
            &w
        ),
        36
    );
    // ci*m*m1 + m*m1*d
    assert_eq!(count(&c(Method::AtomsRec), &w), 4 * 9 * 3 + 9 * 3 * 9);
    // r*(ci*k*k + co)
    assert_eq!(count(&c(Method::Lora), &w), 4 * (4 * 9 + 6));
    assert_eq!(count(&c(Method::Full), &w), 6 * 4 * 9);
    assert_eq!(count(&c(Method::Atoms), &lin), 16 * 16);
    assert_eq!(count(&c(Method::AtomsRec), &lin), 3 * 16 * 3 + 16 * 3 * 16);
    for (_, cfg) in configs() {
        for shape in SHAPES {
            let w = layer_weights(shape, 1, DType::F32);
            assert_eq!(
                count(&cfg, &w),
                cfg.num_params(shape).unwrap(),
                "{cfg:?} {shape:?}"
            );
        }
    }
}

#[test]
fn layer_initialisation_depends_on_seed_and_name_only() {
    let w = layer_weights(&[6, 4, 3, 3], 1, DType::F32);
    let cfg = AdapterConfig {
        seed: 3,
        ..AdapterConfig::new(Method::Lora)
    };
    let get = |cfg: &AdapterConfig, name: &str| {
        bits(&LayerAdapter::new(cfg, name, &w).unwrap().vars()[0])
    };
    assert_eq!(get(&cfg, "a"), get(&cfg, "a"));
    assert_ne!(get(&cfg, "a"), get(&cfg, "b"));
    assert_ne!(
        get(&cfg, "a"),
        get(
            &AdapterConfig {
                seed: 4,
                ..cfg.clone()
            },
            "a"
        )
    );
}

#[test]
fn bad_configurations_are_errors() {
    let w = layer_weights(&[6, 4, 3, 3], 1, DType::F32);
    let lin = layer_weights(&[6, 10], 1, DType::F32);
    let c = AdapterConfig::new;
    let err =
        |cfg: AdapterConfig, w: &Tensor| LayerAdapter::new(&cfg, "l", w).unwrap_err().to_string();
    let m = |m| AdapterConfig {
        atoms: Some(m),
        ..c(Method::Atoms)
    };
    assert!(err(m(0), &w).contains("at least 1"));
    // m > d is clamped to d: a 1x1 conv has one-number filters whatever m the user asks for.
    let k1 = layer_weights(&[6, 4, 1, 1], 1, DType::F32);
    assert_eq!(LayerAdapter::new(&m(4), "l", &k1).unwrap().num_params(), 1);
    assert_eq!(LayerAdapter::new(&m(10), "l", &w).unwrap().num_params(), 81);
    assert!(err(
        AdapterConfig {
            rank: 7,
            ..c(Method::Lora)
        },
        &w
    )
    .contains("lora rank"));
    assert!(err(
        AdapterConfig {
            rank: 0,
            ..c(Method::Lora)
        },
        &w
    )
    .contains("lora rank"));
    assert!(err(c(Method::Atoms), &lin).contains("does not divide"));
    let a = LayerAdapter::new(&c(Method::Atoms), "l", &w).unwrap();
    assert!(a.effective_weight(&lin, 1.0).is_err());
}
