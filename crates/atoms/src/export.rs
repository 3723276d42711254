//! A delta as an adapter file the stock loaders of A1111 (>= 1.5, built-in LyCORIS) and ComfyUI
//! read: kohya / LyCORIS key names (`lora_unet_<diffusers module path, dots as underscores>`),
//! either the exact weight change (`.diff`, LyCORIS "full") or its best rank-r approximation as
//! a LoCon (`.lora_down.weight [r, ci, kh, kw]`, `.lora_up.weight [co, r, 1, 1]`, `.alpha`).
//!
//! The rank-r approximation is the truncated SVD of each layer's change `dW` seen as a
//! `[co, ci*kh*kw]` matrix (Eckart-Young), computed from the eigenvectors of the smaller Gram
//! matrix in f64; its relative error `||dW - up down|| / ||dW||` (Frobenius) is exactly the root
//! of the discarded eigenvalues' share.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::dictionary::svd::top_eigenvectors;
use crate::Result;

/// The file's format.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Format {
    /// The exact change of each layer (`<module>.diff`), as large as the layers.
    Diff,
    /// A LoCon: each change at rank `rank`, or at the smallest rank whose relative error is at
    /// most `max_error` (a layer whose LoCon at that rank would be no smaller than its exact
    /// change is stored as a `.diff`).
    Locon {
        /// A fixed rank (capped at each layer's full rank).
        rank: Option<usize>,
        /// The largest relative error a layer may keep when the rank is chosen per layer.
        max_error: f64,
    },
}

/// What happened to one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerExport {
    /// The diffusers layer name.
    pub layer: String,
    /// Its kohya module name.
    pub module: String,
    /// The rank kept (LoCon), `None` for an exact diff.
    pub rank: Option<usize>,
    /// `||dW - approximation|| / ||dW||` (0 for a diff, and for a layer that did not change).
    pub rel_error: f64,
    /// `||dW||`, Frobenius.
    pub norm: f64,
}

/// An exported adapter: tensors by kohya key, and the per-layer report.
pub struct Exported {
    /// `(key, tensor)`, f32.
    pub tensors: Vec<(String, Tensor)>,
    /// One entry per layer, in order.
    pub layers: Vec<LayerExport>,
}

impl Exported {
    /// The relative error over all layers together: `sqrt(sum err^2 / sum ||dW||^2)`.
    pub fn overall_error(&self) -> f64 {
        let (num, den) = self.layers.iter().fold((0.0, 0.0), |(n, d), l| {
            (n + (l.rel_error * l.norm).powi(2), d + l.norm.powi(2))
        });
        if den == 0.0 {
            0.0
        } else {
            (num / den).sqrt()
        }
    }

    /// Bundles a delta's learned token embedding (pivotal tuning) the way A1111 (>= 1.7) and
    /// ComfyUI read an embedding inside a LoRA file: `bundle_emb.<trigger>.string_to_param.*`
    /// `[1, hidden]` for one text encoder (SD 1.x/2.x), `bundle_emb.<trigger>.clip_l` and
    /// `.clip_g` for SDXL's two. The trigger is then the embedding's name in prompts.
    pub fn bundle_embeddings(&mut self, delta: &crate::Delta) -> Result<()> {
        let e = delta.embeddings();
        if e.is_empty() {
            return Ok(());
        }
        let trigger = delta.meta().trigger.clone().unwrap_or_default();
        let names: &[(&str, &str)] = if e.len() == 1 {
            &[("text_encoder", "string_to_param.*")]
        } else {
            &[("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")]
        };
        for (encoder, key) in names {
            let row = e.get(*encoder).ok_or_else(|| {
                crate::Error::meta("token embedding", format!("none for {encoder}"))
            })?;
            self.tensors
                .push((format!("bundle_emb.{trigger}.{key}"), row.unsqueeze(0)?));
        }
        Ok(())
    }

    /// The safetensors file, with `metadata`.
    pub fn to_bytes(&self, metadata: HashMap<String, String>) -> Result<Vec<u8>> {
        crate::io::safetensors_f32(self.tensors.iter().map(|(k, t)| (k.clone(), t)), metadata)
    }

    /// The file [`Exported::to_bytes`] makes, written to `path` atomically and streamed from
    /// the tensors (an exact diff of SD 1.5's convs is 2.4 GB); returns its size.
    pub fn write(&self, path: &std::path::Path, metadata: HashMap<String, String>) -> Result<u64> {
        crate::io::write_safetensors_f32(path, &self.tensors, metadata)
    }
}

/// The kohya (`ss_*`) and SAI model-spec (`modelspec.*`) metadata A1111's and ComfyUI's lists
/// read, for an export of `delta` (its base family, trigger) named `title`.
pub fn metadata(
    delta: &crate::DeltaMeta,
    exported: &Exported,
    format: Format,
    title: &str,
) -> HashMap<String, String> {
    let (version, spec) = match delta.base_architecture.as_deref() {
        Some("sdxl") => ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
        Some("sd2") => ("sd_v2", "stable-diffusion-v2-768-v"),
        _ => ("sd_v1", "stable-diffusion-v1"),
    };
    let max_rank = exported.layers.iter().filter_map(|l| l.rank).max();
    let algo = match format {
        Format::Diff => "full",
        Format::Locon { .. } => "locon",
    };
    let trigger = delta.trigger.clone().unwrap_or_default();
    let mut m = HashMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_string(), v);
    };
    put("ss_network_module", "lycoris.kohya".into());
    put(
        "ss_network_args",
        serde_json::json!({"algo": algo, "conv_dim": max_rank, "conv_alpha": max_rank}).to_string(),
    );
    if let Some(r) = max_rank {
        put("ss_network_dim", r.to_string());
        put("ss_network_alpha", r.to_string());
    }
    put("ss_base_model_version", version.into());
    put("ss_sd_model_name", delta.base_model.clone());
    put("ss_output_name", title.into());
    if !trigger.is_empty() {
        put(
            "ss_tag_frequency",
            serde_json::json!({ title: { trigger.clone(): 1 } }).to_string(),
        );
        put("modelspec.trigger_phrase", trigger);
    }
    if let Some(s) = delta.steps {
        put("ss_steps", s.to_string());
    }
    put("modelspec.sai_model_spec", "1.0.0".into());
    put("modelspec.architecture", format!("{spec}/lora"));
    put(
        "modelspec.implementation",
        "https://github.com/KohakuBlueleaf/LyCORIS".into(),
    );
    put("modelspec.title", title.into());
    put("atomtune.method", delta.config.method.to_string());
    put(
        "atomtune.relative_error",
        format!("{:.6}", exported.overall_error()),
    );
    m
}

/// The kohya / LyCORIS module name of a diffusers UNet layer: `lora_unet_` and the path with
/// dots as underscores (`down_blocks.0.resnets.0.conv1` -> `lora_unet_down_blocks_0_resnets_0_conv1`).
pub fn module_name(layer: &str) -> String {
    format!("lora_unet_{}", layer.replace('.', "_"))
}

/// The best rank-r approximation of `dw` (`[co, ...]`, seen as `[co, rest]`): `(up [co, r],
/// down [r, rest], r, relative error)`, with `r = rank` (capped at the full rank) or the smallest
/// rank whose relative error is at most `max_error`.
pub fn low_rank(
    dw: &Tensor,
    rank: Option<usize>,
    max_error: f64,
) -> Result<(Tensor, Tensor, usize, f64)> {
    let co = dw.dim(0)?;
    let m = dw
        .flatten_from(1)?
        .to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?;
    let n = m.dim(1)?;
    // the smaller Gram matrix: its eigenvectors are the left (or right) singular vectors
    let left = co <= n;
    let g = if left {
        m.matmul(&m.t()?)?
    } else {
        m.t()?.matmul(&m)?
    };
    let k = g.dim(0)?;
    let gv = g.flatten_all()?.to_vec1::<f64>()?;
    // rows: the eigenvectors, largest eigenvalue first
    let (rows, values) = top_eigenvectors(&gv, k, k)?;
    let values: Vec<f64> = values.iter().map(|v| v.max(0.0)).collect();
    let total: f64 = values.iter().sum();
    let err_at = |r: usize| -> f64 {
        if total <= 0.0 {
            0.0
        } else {
            (values[r..].iter().sum::<f64>() / total).max(0.0).sqrt()
        }
    };
    let r = match rank {
        Some(r) => r.clamp(1, k),
        None => (1..=k).find(|&r| err_at(r) <= max_error).unwrap_or(k),
    };
    // [k, r]: the top r eigenvectors as columns
    let b = Tensor::from_vec(rows[..r * k].to_vec(), (r, k), &Device::Cpu)?
        .t()?
        .contiguous()?;
    let (up, down) = if left {
        (b.clone(), b.t()?.matmul(&m)?)
    } else {
        (m.matmul(&b)?, b.t()?.contiguous()?)
    };
    Ok((
        up.to_dtype(DType::F32)?,
        down.to_dtype(DType::F32)?,
        r,
        err_at(r),
    ))
}

/// Exports the weight changes `changes` (diffusers layer name, `dW` of the layer's weight
/// shape: `[co, ci, kh, kw]` or `[co, ci]`).
pub fn export(changes: &[(String, Tensor)], format: Format) -> Result<Exported> {
    let mut tensors = Vec::new();
    let mut layers = Vec::new();
    for (layer, dw) in changes {
        let module = module_name(layer);
        let norm = dw
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?
            .sqrt();
        match format {
            Format::Diff => {
                tensors.push((format!("{module}.diff"), dw.to_dtype(DType::F32)?));
                layers.push(LayerExport {
                    layer: layer.clone(),
                    module,
                    rank: None,
                    rel_error: 0.0,
                    norm,
                });
            }
            Format::Locon { rank, max_error } => {
                let (up, down, r, err) = low_rank(dw, rank, max_error)?;
                let (co, n) = (dw.dim(0)?, dw.elem_count() / dw.dim(0)?);
                if rank.is_none() && r * (co + n) >= co * n {
                    // a LoCon of the rank the error asks for is no smaller than the exact
                    // change: store the change (loaders read each module by its own keys)
                    tensors.push((format!("{module}.diff"), dw.to_dtype(DType::F32)?));
                    layers.push(LayerExport {
                        layer: layer.clone(),
                        module,
                        rank: None,
                        rel_error: 0.0,
                        norm,
                    });
                    continue;
                }
                let dims = dw.dims();
                let (up, down) = if dims.len() == 4 {
                    (
                        up.reshape((dims[0], r, 1, 1))?,
                        down.reshape((r, dims[1], dims[2], dims[3]))?,
                    )
                } else {
                    (up, down)
                };
                tensors.push((format!("{module}.lora_down.weight"), down));
                tensors.push((format!("{module}.lora_up.weight"), up));
                // alpha = rank: the loaders scale up @ down by alpha / rank = 1
                tensors.push((
                    format!("{module}.alpha"),
                    Tensor::new(r as f32, &Device::Cpu)?,
                ));
                layers.push(LayerExport {
                    layer: layer.clone(),
                    module,
                    rank: Some(r),
                    rel_error: err,
                    norm,
                });
            }
        }
    }
    Ok(Exported { tensors, layers })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| {
                let x = (i as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let n = b
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        (d / n).sqrt() as f64
    }

    /// An exactly rank-3 change is recovered at rank 3, and the reported errors are the errors
    /// of the products, for wide (conv) and tall matrices.
    #[test]
    fn low_rank_recovers_low_rank_changes_and_reports_its_error() {
        for (co, n) in [(6, 36), (40, 9)] {
            let dw = seeded(&[co, 3], 1).matmul(&seeded(&[3, n], 2)).unwrap();
            let (up, down, r, err) = low_rank(&dw, None, 1e-6).unwrap();
            assert_eq!(r, 3, "{co}x{n}");
            assert!(err < 1e-6 && rel(&up.matmul(&down).unwrap(), &dw) < 1e-5);
            let dw = seeded(&[co, n], 3);
            for rank in [1, 2, 4] {
                let (up, down, r, err) = low_rank(&dw, Some(rank), 0.0).unwrap();
                assert_eq!(r, rank);
                let actual = rel(&up.matmul(&down).unwrap(), &dw);
                assert!(
                    (actual - err).abs() < 1e-4,
                    "rank {rank}: {actual} vs {err}"
                );
            }
        }
    }

    #[test]
    fn kohya_names_and_shapes() {
        assert_eq!(
            module_name("down_blocks.0.resnets.0.conv1"),
            "lora_unet_down_blocks_0_resnets_0_conv1"
        );
        let dw = seeded(&[8, 4, 3, 3], 4);
        let e = export(
            &[("conv_in".into(), dw)],
            Format::Locon {
                rank: Some(2),
                max_error: 0.0,
            },
        )
        .unwrap();
        let dims: Vec<(&str, Vec<usize>)> = e
            .tensors
            .iter()
            .map(|(k, t)| (k.as_str(), t.dims().to_vec()))
            .collect();
        assert_eq!(
            dims,
            vec![
                ("lora_unet_conv_in.lora_down.weight", vec![2, 4, 3, 3]),
                ("lora_unet_conv_in.lora_up.weight", vec![8, 2, 1, 1]),
                ("lora_unet_conv_in.alpha", vec![]),
            ]
        );
    }
}
