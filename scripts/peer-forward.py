#!/usr/bin/env python3
"""The PyTorch side of the SD 1.5 forward row in BENCHMARKS.md: diffusers' UNet with the peer's
SD 1.5 configuration and random weights, one no-grad forward per step at batch 1 (the peer's own
peer_sample.py runs batch 2, a guidance step). One JSON line, like the sd15 bench's.

  PEER_DIR=../shared/peer ../peer-venv/bin/python scripts/peer-forward.py --latent 64 --steps 3
"""
import argparse, json, os, resource, statistics, sys, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

sys.path.insert(0, os.environ.get("PEER_DIR", "../shared/peer"))
from peer_train import SD15_UNET  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**SD15_UNET).eval()
    x = torch.randn(a.batch, 4, a.latent, a.latent)
    ctx = torch.randn(a.batch, 77, 768)
    times = []
    with torch.no_grad():
        for _ in range(a.steps + 1):
            t = time.perf_counter()
            unet(x, torch.tensor([500]), ctx)
            times.append(time.perf_counter() - t)
    print(json.dumps(dict(
        peer=True, mode="forward", latent=a.latent, batch=a.batch,
        median_s=round(statistics.median(times[1:]), 3), each_s=[round(t, 3) for t in times[1:]],
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        torch=torch.__version__)))


if __name__ == "__main__":
    main()
