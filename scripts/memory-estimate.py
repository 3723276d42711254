#!/usr/bin/env python3
"""What an `atoms` training step keeps for its backward, by arithmetic, for SD 1.5 at 512x512 and
SDXL at 1024x1024 in f16: the activations the graph holds, counted tensor by tensor as our UNet
and its ops (crates/ops, the portable forms a GPU runs) create them.

    scripts/memory-estimate.py [--check GRAPH_GB]

The count per block (elements per image, `E(c, s)` = c s^2, `n` = s^2 tokens):
- resnet (cin -> cout): GN+SiLU(x) E(cin); conv1 (bias inside) E(cout); + time embedding E(cout);
  GN+SiLU E(cout); conv2 E(cout); shortcut conv E(cout) when cin != cout; residual sum E(cout).
- transformer (c, depth): GN E(c); proj_in E(c); tokens copy E(c); per block 27 n c
  (self-attention: LN, q, k, v, attention, to_out, residual = 7; cross-attention: LN, q, attention,
  to_out, residual = 5; feed-forward: LN, proj 8, GEGLU 4, out, residual = 15); map copy E(c);
  proj_out E(c); residual E(c).
- down/up samplers, skip concatenations, conv_in, norm_out, conv_out as they come.
With gradient checkpointing of every block, only block outputs and the glue between blocks stay.
`--check` compares the SD 1.5 figure at batch 1 with a measured one
(`ATOMTUNE_KERNELS=portable cargo bench -p atomtune-models --bench sd15 -- --mode graph --latent 64
--batch 1 --dtype f16`).

The peak of a step adds to these the rest of the pipeline (text encoders in f16, the VAE in f32,
loaded for the latent and text caches), and what the backward holds on top of the kept
activations: gradients in flight, attention's score chunks (128 MB each, a few at a time), and with
checkpointing one block's recomputed activations. That last part is measured for SD 1.5 (peak RSS
of the portable f16 step on the CPU minus the RSS before it minus the kept activations:
`SD15_BENCH_MEM=1 ATOMTUNE_KERNELS=portable cargo bench -p atomtune-models --bench sd15 -- --mode
train --latent 64 --steps 1 --dtype f16 [--batch 2] [--checkpointing]`); for SDXL it is estimated
as 0.5 GB without checkpointing, and with it as the largest block's activations plus 0.5 GB. A
CUDA context and cuBLAS's workspace (about 0.5 GB) come on top on a GPU.
"""
import argparse

BYTES = 2  # f16


def E(c, s):
    return c * s * s


def resnet(cin, cout, s, ckpt):
    if ckpt:
        return E(cout, s)
    return E(cin, s) + 5 * E(cout, s) + (E(cout, s) if cin != cout else 0)


def transformer(c, s, depth, ckpt):
    if ckpt:
        return E(c, s)
    return 6 * E(c, s) + depth * 27 * E(c, s)


def unet(levels, mid_depth, s0, ckpt):
    """levels: [(channels, transformer depth or 0, has_downsample)], encoder order; layers per
    block 2, decoder 3 resnets per level with skip connections, as in diffusers."""
    total = E(levels[0][0], s0)  # conv_in
    skips = [(levels[0][0], s0)]
    s = s0
    cin = levels[0][0]
    for c, depth, down in levels:
        for _ in range(2):
            total += resnet(cin, c, s, ckpt)
            cin = c
            if depth:
                total += transformer(c, s, depth, ckpt)
            skips.append((c, s))
        if down:
            s //= 2
            total += E(c, s)
            skips.append((c, s))
    c = levels[-1][0]
    total += resnet(c, c, s, ckpt) + transformer(c, s, mid_depth, ckpt) + resnet(c, c, s, ckpt)
    for i, (c, depth, down) in reversed(list(enumerate(levels))):
        for _ in range(3):
            sc, _ = skips.pop()
            total += E(cin + sc, s)  # concatenation
            total += resnet(cin + sc, c, s, ckpt)
            cin = c
            if depth:
                total += transformer(c, s, depth, ckpt)
        if i > 0:
            s *= 2
            total += 2 * E(c, s)  # upsample, then its conv
    total += E(levels[0][0], s0) + E(4, s0)  # norm_out + SiLU, conv_out
    return total


MODELS = {
    # SD 1.5: every level but the last has attention (depth 1); mid depth 1; 512 px.
    # UNet 860M parameters in f16; text encoder 123M in f16, VAE 84M in f32.
    "SD 1.5 at 512x512": dict(
        levels=[(320, 1, True), (640, 1, True), (1280, 1, True), (1280, 0, False)],
        mid=1, side=64, unet_gb=1.72, rest_gb=0.25 + 0.33,
        # measured backward transients, GB, by (batch, checkpointing)
        transient={(1, False): 0.25, (2, False): 0.31, (1, True): 0.38, (2, True): 0.57},
    ),
    # SDXL base: no attention at the first level, 2 and 10 transformer layers below; 1024 px.
    # UNet 2.57G parameters in f16; text encoders 123M + 695M in f16, VAE 84M in f32.
    "SDXL at 1024x1024": dict(
        levels=[(320, 0, True), (640, 2, True), (1280, 10, False)],
        mid=10, side=128, unet_gb=5.14, rest_gb=1.64 + 0.33, transient={},
    ),
}


def largest_block(levels, mid, s0):
    """Activations of the largest single resnet or transformer block, per image (checkpointing
    recomputes one block at a time)."""
    best, s = 0, s0
    for c, depth, down in levels:
        best = max(best, resnet(c, c, s, False) + E(c, s))
        if depth:
            best = max(best, transformer(c, s, depth, False))
        if down:
            s //= 2
    return max(best, transformer(levels[-1][0], s, mid, False))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", type=float, help="measured SD 1.5 graph GB at batch 1, f16")
    a = ap.parse_args()
    print("| model | batch | checkpointing | UNet (f16) | text encoders, VAE | activations kept "
          "(counted) | backward on top | sum |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in MODELS.items():
        for batch in (1, 2):
            for ckpt in (False, True):
                act = batch * unet(m["levels"], m["mid"], m["side"], ckpt) * BYTES / 1e9
                measured = m["transient"].get((batch, ckpt))
                if measured is not None:
                    extra, how = measured, "measured"
                elif ckpt:
                    block = batch * largest_block(m["levels"], m["mid"], m["side"]) * BYTES / 1e9
                    extra, how = block + 0.5, "estimated"
                else:
                    extra, how = 0.5, "estimated"
                total = m["unet_gb"] + m["rest_gb"] + act + extra
                print(f"| {name} | {batch} | {'all' if ckpt else 'off'} | {m['unet_gb']:.2f} GB "
                      f"| {m['rest_gb']:.2f} GB | {act:.2f} GB | {extra:.2f} GB ({how}) "
                      f"| **{total:.1f} GB** |")
    if a.check:
        m = MODELS["SD 1.5 at 512x512"]
        est = unet(m["levels"], m["mid"], m["side"], False) * BYTES / 1e9
        print(f"\nSD 1.5 batch 1: counted {est:.3f} GB, measured {a.check:.3f} GB "
              f"({est / a.check:.2f}x)")


if __name__ == "__main__":
    main()
