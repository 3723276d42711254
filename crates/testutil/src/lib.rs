//! Test helpers shared by atomtune's crates (a dev-dependency only).
//!
//! - [`shared_path`]: the one way tests find `../shared` (fixtures, datasets), with a clear
//!   message when it is absent;
//! - [`fixture`]: a fixture folder that has the parts a test needs (shared, else the copy
//!   under `tests/data/fixtures`);
//! - [`data_path`]: small files committed under `tests/data/`;
//! - [`unet_convs`]: the convolution weights of a diffusers `UNet2DConditionModel` with SD 1.x
//!   block structure, listed from its config the way diffusers builds them;
//! - [`peak_rss_gb`], [`status_gb`]: the process's memory, for the benchmark programs;
//! - [`seeded_values`]: numbers for tests that need some nobody chose.
#![deny(missing_docs)]

use std::path::{Path, PathBuf};

/// `n` seeded values in [-0.5, 0.5), the same for the same seed: inputs and adapter files for
/// tests that need numbers nobody chose.
pub fn seeded_values(n: usize, seed: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let x = (i + 7).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(31);
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `tests/data/<rel>` in the workspace (small files committed with the project).
pub fn data_path(rel: &str) -> PathBuf {
    workspace_root().join("tests/data").join(rel)
}

/// The shared folder: `$ATOMTUNE_SHARED`, else `../shared` beside the workspace.
pub fn shared_dir() -> PathBuf {
    match std::env::var_os("ATOMTUNE_SHARED") {
        Some(p) => PathBuf::from(p),
        None => workspace_root().join("../shared"),
    }
}

/// `<shared>/<rel>` if it exists. If it does not, says so on stderr and returns `None` so the
/// test can return early; with `ATOMTUNE_REQUIRE_SHARED=1` (set by `.ci/run` when the folder is
/// there) a missing file fails the test instead.
pub fn shared_path(rel: &str) -> Option<PathBuf> {
    let p = shared_dir().join(rel);
    if p.exists() {
        return Some(p);
    }
    missing(&p)
}

/// The folder of fixture `name` holding every path in `needs` (relative to it): the shared one
/// if it has them all, else the partial copy under `tests/data/fixtures/<name>` if that has them
/// all (the project carries tiny-sd-2block's UNet and reference outputs so a fresh clone tests
/// the UNet). Otherwise skips or fails as [`shared_path`] does.
pub fn fixture(name: &str, needs: &[&str]) -> Option<PathBuf> {
    let rel = format!("fixtures/{name}");
    let shared = shared_dir().join(&rel);
    let copy = data_path(&rel);
    for root in [&shared, &copy] {
        if needs.iter().all(|n| root.join(n).exists()) && root.exists() {
            return Some(root.clone());
        }
    }
    let lacking = needs
        .iter()
        .find(|n| !shared.join(n).exists())
        .map(|n| shared.join(n))
        .unwrap_or(shared);
    missing(&lacking)
}

fn missing(p: &Path) -> Option<PathBuf> {
    let msg = format!(
        "{} not found: this test needs the shared fixtures (set ATOMTUNE_SHARED to the folder holding fixtures/)",
        p.display()
    );
    if std::env::var("ATOMTUNE_REQUIRE_SHARED").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("skipped: {msg}");
    None
}

/// The block structure of an SD 1.x-style UNet (the keys of its diffusers `config.json` that
/// decide its convolutions).
#[derive(Clone, Debug)]
pub struct UnetShape {
    /// `in_channels`.
    pub in_channels: usize,
    /// `out_channels`.
    pub out_channels: usize,
    /// `block_out_channels`.
    pub block_out_channels: Vec<usize>,
    /// `layers_per_block`.
    pub layers_per_block: usize,
    /// Which down blocks are `CrossAttnDownBlock2D` (the others `DownBlock2D`).
    pub down_cross_attn: Vec<bool>,
    /// Which up blocks are `CrossAttnUpBlock2D` (the others `UpBlock2D`).
    pub up_cross_attn: Vec<bool>,
    /// Whether `proj_in`/`proj_out` are linear (`use_linear_projection`, SD 2.x) or 1x1 convs.
    pub linear_projection: bool,
}

impl UnetShape {
    /// SD 1.5 (`stable-diffusion-v1-5/stable-diffusion-v1-5`, `unet/config.json`).
    pub fn sd15() -> Self {
        UnetShape {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            down_cross_attn: vec![true, true, true, false],
            up_cross_attn: vec![false, true, true, true],
            linear_projection: false,
        }
    }

    /// The `tiny-sd15-shape` fixture: SD 1.5's structure at widths 32/64/64/64.
    pub fn tiny_sd15_shape() -> Self {
        UnetShape {
            block_out_channels: vec![32, 64, 64, 64],
            ..Self::sd15()
        }
    }
}

/// Every convolution weight of the UNet, `(layer name, [co, ci, kh, kw])`, in diffusers naming.
pub fn unet_convs(u: &UnetShape) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    let w = &u.block_out_channels;
    let nb = w.len();
    let resnet = |out: &mut Vec<(String, Vec<usize>)>, name: String, cin: usize, cout: usize| {
        out.push((format!("{name}.conv1"), vec![cout, cin, 3, 3]));
        out.push((format!("{name}.conv2"), vec![cout, cout, 3, 3]));
        if cin != cout {
            out.push((format!("{name}.conv_shortcut"), vec![cout, cin, 1, 1]));
        }
    };
    let attn = |out: &mut Vec<(String, Vec<usize>)>, name: String, c: usize| {
        if !u.linear_projection {
            out.push((format!("{name}.proj_in"), vec![c, c, 1, 1]));
            out.push((format!("{name}.proj_out"), vec![c, c, 1, 1]));
        }
    };
    out.push(("conv_in".to_string(), vec![w[0], u.in_channels, 3, 3]));
    for i in 0..nb {
        let cin = if i == 0 { w[0] } else { w[i - 1] };
        for j in 0..u.layers_per_block {
            resnet(
                &mut out,
                format!("down_blocks.{i}.resnets.{j}"),
                if j == 0 { cin } else { w[i] },
                w[i],
            );
            if u.down_cross_attn[i] {
                attn(&mut out, format!("down_blocks.{i}.attentions.{j}"), w[i]);
            }
        }
        if i + 1 < nb {
            out.push((
                format!("down_blocks.{i}.downsamplers.0.conv"),
                vec![w[i], w[i], 3, 3],
            ));
        }
    }
    let top = w[nb - 1];
    resnet(&mut out, "mid_block.resnets.0".into(), top, top);
    attn(&mut out, "mid_block.attentions.0".into(), top);
    resnet(&mut out, "mid_block.resnets.1".into(), top, top);
    let rev: Vec<usize> = w.iter().rev().copied().collect();
    for i in 0..nb {
        let cout = rev[i];
        let prev = if i == 0 { top } else { rev[i - 1] };
        let skip_in = rev[(i + 1).min(nb - 1)];
        let layers = u.layers_per_block + 1;
        for j in 0..layers {
            let skip = if j == layers - 1 { skip_in } else { cout };
            let res_in = if j == 0 { prev } else { cout };
            resnet(
                &mut out,
                format!("up_blocks.{i}.resnets.{j}"),
                res_in + skip,
                cout,
            );
            if u.up_cross_attn[i] {
                attn(&mut out, format!("up_blocks.{i}.attentions.{j}"), cout);
            }
        }
        if i + 1 < nb {
            out.push((
                format!("up_blocks.{i}.upsamplers.0.conv"),
                vec![cout, cout, 3, 3],
            ));
        }
    }
    out.push(("conv_out".to_string(), vec![u.out_channels, w[0], 3, 3]));
    out
}

/// A memory line of `/proc/self/status` (`VmHWM:`, `VmRSS:`) in GB; NaN where there is none.
pub fn status_gb(key: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0 / 1024.0)
}

/// The process's peak resident memory so far (`VmHWM`), in GB.
pub fn peak_rss_gb() -> f64 {
    status_gb("VmHWM:")
}
