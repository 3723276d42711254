//! Delta files: round trips, and every kind of bad file or base giving its error, never a panic.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use super::*;
use crate::{AdapterConfig, DictionaryKind, LassoOptions, TensorBase};

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A tiny base with a 3x3 conv, a 1x1 conv and a linear layer.
fn base() -> TensorBase {
    TensorBase::new(
        "tiny/base",
        [
            ("down.conv1".to_string(), random(&[8, 4, 3, 3], 1)),
            ("down.shortcut".to_string(), random(&[8, 4, 1, 1], 2)),
            ("attn.to_q".to_string(), random(&[8, 12], 3)),
        ],
    )
}

fn configs() -> Vec<AdapterConfig> {
    let mut v: Vec<AdapterConfig> = Method::ALL.into_iter().map(AdapterConfig::new).collect();
    v.push(AdapterConfig {
        dictionary: DictionaryKind::Lasso(LassoOptions {
            lambda: 0.02,
            iterations: 2,
            ..Default::default()
        }),
        ..AdapterConfig::new(Method::AtomsRec)
    });
    v.push(AdapterConfig {
        atoms: Some(1),
        dictionary: DictionaryKind::Lasso(LassoOptions::default()),
        ..AdapterConfig::new(Method::Atoms)
    });
    for c in &mut v {
        c.rank = 2;
    }
    v
}

/// A trained-looking delta of `config` on `base`: adapters with random parameters.
fn delta(config: &AdapterConfig, base: &TensorBase) -> (Delta, BTreeMap<String, LayerAdapter>) {
    let adapters: BTreeMap<String, LayerAdapter> = base
        .weights()
        .iter()
        .map(|(k, w)| (k.clone(), LayerAdapter::new(config, k, w).unwrap()))
        .collect();
    for (i, a) in adapters.values().enumerate() {
        for (j, v) in a.vars().iter().enumerate() {
            v.set(&random(v.dims(), 100 + 10 * i as u64 + j as u64))
                .unwrap();
        }
    }
    let mut meta = DeltaMeta::new(config.clone(), base.id());
    meta.trigger = Some("sks".into());
    meta.class = Some("dog".into());
    meta.steps = Some(12);
    meta.seed = Some(3);
    let d =
        Delta::from_adapters(meta, adapters.iter().map(|(k, a)| (k.as_str(), a)), base).unwrap();
    (d, adapters)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn deltas_round_trip_through_a_file_bit_for_bit() {
    let base = base();
    let dir = tempfile::tempdir().unwrap();
    for config in configs() {
        let (d, adapters) = delta(&config, &base);
        let path = dir.path().join("delta.safetensors");
        d.write(&path).unwrap();
        let back = Delta::read(&path).unwrap();
        assert_eq!(back.meta(), d.meta(), "{config:?}");
        assert_eq!(back.layers().len(), 3);
        for (layer, tensors) in d.layers() {
            for (suffix, t) in tensors {
                assert_eq!(
                    bits(&back.layers()[layer][suffix]),
                    bits(t),
                    "{layer}.{suffix}"
                );
            }
        }
        // The adapters rebuilt from the file make the very same effective weights.
        let fit = back.check_base(&base, true).unwrap();
        assert!(fit.is_exact());
        let rebuilt = back.adapters(&base).unwrap();
        for (layer, a) in &adapters {
            let w = base.weight(layer).unwrap();
            let w1 = a.effective_weight(&w, 0.9).unwrap();
            let w2 = rebuilt[layer].effective_weight(&w, 0.9).unwrap();
            assert_eq!(bits(&w1), bits(&w2), "{config:?} {layer}");
            assert_eq!(rebuilt[layer].num_params(), a.num_params());
        }
        assert_eq!(
            back.num_params(),
            adapters.values().map(|a| a.num_params()).sum::<usize>()
        );
    }
}

#[test]
fn atoms_delta_of_a_small_layer_is_small() {
    let base = TensorBase::new("b", [("conv".to_string(), random(&[32, 32, 3, 3], 4))]);
    let (d, _) = delta(&AdapterConfig::new(Method::Atoms), &base);
    let bytes = d.to_bytes().unwrap();
    // 2 x 81 f32 plus a header: well under 2 KB.
    assert!(bytes.len() < 2048, "{} bytes", bytes.len());
    assert_eq!(d.num_params(), 81);
}

#[test]
fn every_truncation_and_garbage_is_an_error_not_a_panic() {
    let base = base();
    for config in configs() {
        let bytes = delta(&config, &base).0.to_bytes().unwrap();
        for cut in 0..bytes.len() {
            assert!(
                Delta::from_bytes(&bytes[..cut]).is_err(),
                "cut at {cut} of {}",
                bytes.len()
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Delta::from_bytes(&longer).is_err());
    }
    assert!(matches!(
        Delta::from_bytes(b"hello world, not a delta"),
        Err(Error::Safetensors(_))
    ));
    assert!(Delta::from_bytes(&u64::MAX.to_le_bytes()).is_err());
}

/// Re-serialises a delta with its metadata and tensors edited; tensors are (name, dtype, shape,
/// bytes).
fn rewrite(
    d: &Delta,
    edit_meta: impl FnOnce(&mut HashMap<String, String>),
    edit: impl FnMut(&mut (String, safetensors::Dtype, Vec<usize>, Vec<u8>)),
) -> Vec<u8> {
    let bytes = d.to_bytes().unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut meta = d.meta().to_metadata();
    edit_meta(&mut meta);
    let mut items: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    items.iter_mut().for_each(edit);
    let views: Vec<_> = items
        .iter()
        .map(|(n, dt, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, Some(meta)).unwrap()
}

fn atoms_delta() -> Delta {
    delta(&AdapterConfig::new(Method::Atoms), &base()).0
}

#[test]
fn a_wrong_dtype_is_named() {
    let bytes = rewrite(
        &atoms_delta(),
        |_| {},
        |(n, dt, _, b)| {
            if n == "down.conv1.delta" {
                *dt = safetensors::Dtype::I32;
                let _ = b;
            }
        },
    );
    match Delta::from_bytes(&bytes) {
        Err(Error::Dtype { tensor, .. }) => assert_eq!(tensor, "down.conv1.delta"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn wrong_shapes_are_named_with_the_expected_shape() {
    // Inconsistent within the file: delta [9, 9] -> [3, 27] (same size) next to atoms [9, 9].
    let bytes = rewrite(
        &atoms_delta(),
        |_| {},
        |(n, _, s, _)| {
            if n == "down.conv1.delta" {
                *s = vec![3, 27];
            }
        },
    );
    match Delta::from_bytes(&bytes) {
        Err(Error::TensorShape {
            tensor,
            found,
            expected,
        }) => {
            assert_eq!(tensor, "down.conv1.delta");
            assert_eq!((found, expected), (vec![3, 27], vec![9, 9]));
        }
        other => panic!("{other:?}"),
    }
    // Consistent in the file but not with the base: the base's conv has 3x2 kernels.
    let d = atoms_delta();
    let mut other = base().weights().clone();
    other.insert("down.conv1".into(), random(&[8, 4, 3, 2], 1));
    let other = TensorBase::new("other/arch", other);
    match d.check_base(&other, false) {
        Err(Error::TensorShape {
            tensor, expected, ..
        }) => {
            assert_eq!(tensor, "down.conv1.atoms");
            assert_eq!(expected, vec![9, 6]);
        }
        r => panic!("{r:?}"),
    }
    assert!(d.adapters(&other).is_err());
    // A LoRA of the wrong rank for its own hyper-parameters.
    let lora = delta(
        &AdapterConfig {
            rank: 2,
            ..AdapterConfig::new(Method::Lora)
        },
        &base(),
    )
    .0;
    let bytes = rewrite(
        &lora,
        |m| {
            m.insert(
                "hparams".into(),
                m["hparams"].replace("\"rank\":2", "\"rank\":3"),
            );
        },
        |_| {},
    );
    assert!(matches!(
        Delta::from_bytes(&bytes),
        Err(Error::TensorShape { .. })
    ));
}

#[test]
fn unknown_and_unexpected_names_are_errors() {
    let d = atoms_delta();
    let mut w = base().weights().clone();
    w.remove("attn.to_q");
    let smaller = TensorBase::new("smaller", w);
    match d.check_base(&smaller, false) {
        Err(Error::UnknownLayer { layer }) => assert_eq!(layer, "attn.to_q"),
        r => panic!("{r:?}"),
    }
    let bytes = rewrite(
        &d,
        |_| {},
        |(n, ..)| {
            if n == "down.conv1.delta" {
                *n = "down.conv1.lora_up".into();
            }
        },
    );
    let e = Delta::from_bytes(&bytes).unwrap_err();
    assert!(matches!(e, Error::UnexpectedTensor { .. }), "{e}");
    assert!(e.to_string().contains("down.conv1.lora_up"), "{e}");
    // A layer with only some of its tensors.
    let bytes = rewrite(
        &d,
        |m| {
            let mut fp: BTreeMap<String, String> =
                serde_json::from_str(&m["fingerprints"]).unwrap();
            fp.insert("extra".into(), "0".into());
            m.insert("fingerprints".into(), serde_json::to_string(&fp).unwrap());
        },
        |(n, ..)| {
            if n == "down.conv1.delta" {
                *n = "extra.atoms".into();
            }
        },
    );
    assert!(matches!(
        Delta::from_bytes(&bytes),
        Err(Error::MissingTensor { .. })
    ));
}

#[test]
fn format_errors_name_what_is_wrong() {
    let d = atoms_delta();
    let newer = rewrite(
        &d,
        |m| {
            m.insert("format_version".into(), "7".into());
        },
        |_| {},
    );
    assert!(matches!(
        Delta::from_bytes(&newer),
        Err(Error::FormatVersion {
            found: 7,
            supported: 1
        })
    ));
    let foreign = rewrite(
        &d,
        |m| {
            m.insert("format".into(), "pt".into());
        },
        |_| {},
    );
    assert!(matches!(
        Delta::from_bytes(&foreign),
        Err(Error::NotADelta { .. })
    ));
    let no_fp = rewrite(
        &d,
        |m| {
            m.insert("fingerprints".into(), "{}".into());
        },
        |_| {},
    );
    let e = Delta::from_bytes(&no_fp).unwrap_err();
    assert!(e.to_string().contains("no fingerprint for layer"), "{e}");
    let nan = rewrite(
        &d,
        |_| {},
        |(n, _, _, b)| {
            if n == "down.conv1.delta" {
                b[..4].copy_from_slice(&f32::NAN.to_le_bytes());
            }
        },
    );
    let e = Delta::from_bytes(&nan).unwrap_err();
    assert!(e.to_string().contains("NaN"), "{e}");
}

#[test]
fn a_different_base_warns_by_default_and_is_refused_when_strict() {
    let d = atoms_delta();
    let mut w = base().weights().clone();
    let tuned = (w["down.shortcut"].clone() * 1.01).unwrap();
    w.insert("down.shortcut".into(), tuned);
    let derived = TensorBase::new("someone/derived", w);
    let fit = d.check_base(&derived, false).unwrap();
    assert_eq!(fit.differing_layers, vec!["down.shortcut".to_string()]);
    let warning = fit.warning(&d).unwrap();
    assert!(
        warning.contains("tiny/base") && warning.contains("someone/derived"),
        "{warning}"
    );
    let e = d.check_base(&derived, true).unwrap_err();
    assert!(
        matches!(e, Error::FingerprintMismatch { count: 1, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("--strict"), "{e}");
    // ...and the f16 variant of the same base is the same base.
    let half = TensorBase::new(
        "fp16",
        base()
            .weights()
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(DType::F16).unwrap())),
    );
    assert!(d.check_base(&half, true).unwrap().is_exact());
}

#[test]
fn merge_bakes_weighted_deltas_that_stack() {
    let base = base();
    let (d1, a1) = delta(&AdapterConfig::new(Method::Atoms), &base);
    let (d2, a2) = delta(
        &AdapterConfig {
            rank: 2,
            ..AdapterConfig::new(Method::Lora)
        },
        &base,
    );
    let (zero, _) = merge(&base, &[(&d1, 0.0)], true).unwrap();
    for (layer, w) in &zero {
        assert_eq!(
            bits(w),
            bits(&base.weight(layer).unwrap()),
            "weight 0 changes {layer}"
        );
    }
    let (merged, fits) = merge(&base, &[(&d1, 0.5), (&d2, -1.5)], false).unwrap();
    assert_eq!(fits.len(), 2);
    assert_eq!(merged.len(), 3);
    for (layer, got) in &merged {
        let w = base.weight(layer).unwrap();
        let want = ((&w + a1[layer].delta_weight(&w, 0.5).unwrap()).unwrap()
            + a2[layer].delta_weight(&w, -1.5).unwrap())
        .unwrap();
        let err = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(err < 1e-5, "{layer}: {err}");
        let moved = (got - &w)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(moved > 1e-3, "{layer} did not change");
    }
}
