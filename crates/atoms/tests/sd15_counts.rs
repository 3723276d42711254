//! Parameter counts on the real SD 1.5 UNet conv layout (DESIGN.md 1.1): `atoms` on the 52 3x3
//! convs is 4,212 numbers; with the 46 1x1 convs, 4,258.

use atoms::{AdapterConfig, Method};
use testutil::{data_path, unet_convs, UnetShape};

/// The layer list is the one diffusers builds: checked against the keys of the tiny-sd15-shape
/// fixture (made by diffusers), which shares SD 1.5's structure at smaller widths.
#[test]
fn the_conv_layer_list_matches_the_diffusers_fixture() {
    let keys = std::fs::read_to_string(data_path("tiny-sd15-shape-unet-keys.txt")).unwrap();
    let mut want: Vec<(String, Vec<usize>)> = keys
        .lines()
        .filter_map(|l| {
            let (name, shape) = l.split_once(' ')?;
            let layer = name.strip_suffix(".weight")?;
            let dims: Vec<usize> = shape
                .trim_matches(|c| c == '[' || c == ']')
                .split(", ")
                .map(|x| x.parse().unwrap())
                .collect();
            (dims.len() == 4).then(|| (layer.to_string(), dims))
        })
        .collect();
    let mut got = unet_convs(&UnetShape::tiny_sd15_shape());
    want.sort();
    got.sort();
    assert_eq!(got, want);
}

#[test]
fn atoms_on_sd15_convs_count_4212_and_4258() {
    let convs = unet_convs(&UnetShape::sd15());
    let k3: Vec<_> = convs.iter().filter(|(_, s)| s[2..] == [3, 3]).collect();
    let k1: Vec<_> = convs.iter().filter(|(_, s)| s[2..] == [1, 1]).collect();
    assert_eq!((k3.len(), k1.len(), convs.len()), (52, 46, 98));
    let cfg = AdapterConfig::new(Method::Atoms);
    let count = |layers: &[&(String, Vec<usize>)]| -> usize {
        layers.iter().map(|(_, s)| cfg.num_params(s).unwrap()).sum()
    };
    assert_eq!(count(&k3), 4_212);
    assert_eq!(count(&k3) + count(&k1), 4_258);
}

/// The other methods on the same 98 convs (expected values worked out by hand from DESIGN.md's
/// formulas: `ci*m*m1 + m*m1*d` for atoms-rec, `r*(ci*k*k + co)` for LoRA).
#[test]
fn other_methods_on_sd15_convs() {
    let convs = unet_convs(&UnetShape::sd15());
    let total = |cfg: AdapterConfig, k3_only: bool| -> usize {
        convs
            .iter()
            .filter(|(_, s)| !k3_only || s[2..] == [3, 3])
            .map(|(_, s)| cfg.num_params(s).unwrap())
            .sum()
    };
    assert_eq!(total(AdapterConfig::new(Method::AtomsRec), true), 1_516_104);
    assert_eq!(
        total(AdapterConfig::new(Method::AtomsRec), false),
        1_657_362
    );
    assert_eq!(total(AdapterConfig::new(Method::Lora), false), 2_526_880);
    assert_eq!(total(AdapterConfig::new(Method::Full), false), 589_027_840);
}
