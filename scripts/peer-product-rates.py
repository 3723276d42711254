#!/usr/bin/env python3
"""PyTorch's rates at the shapes of our `linear_rate` and `conv_rate` examples, on this machine:
a linear layer's forward with bf16 operands (oneDNN), the same under `torch.autocast("cpu",
torch.bfloat16)` (f32 weight converted at each call, as the peer runs), and a 3x3 conv under
autocast. 2 threads, median of 7 runs after 2 warm-ups.

    ../peer-venv/bin/python scripts/peer-product-rates.py
"""
import time

import torch

torch.set_num_threads(2)


def median_time(f, runs=7):
    for _ in range(2):
        f()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return sorted(times)[runs // 2]


def autocast(f):
    def run():
        with torch.autocast("cpu", torch.bfloat16):
            f()
    return run


for m, k, n in [(256, 1280, 1280), (512, 1280, 1280), (512, 1280, 10240), (512, 5120, 1280),
                (2048, 640, 640), (2048, 640, 5120), (8192, 320, 320)]:
    x, w = torch.randn(1, m, k), torch.randn(n, k)
    xb, wb = x.bfloat16(), w.bfloat16()
    flops = 2 * m * k * n
    db = median_time(lambda: torch.nn.functional.linear(xb, wb))
    da = median_time(autocast(lambda: torch.nn.functional.linear(x, w)))
    print(f"linear {m} {k} {n}: bf16 {db * 1e3:.1f} ms {flops / db / 1e12:.3f} TFLOP/s, "
          f"autocast {da * 1e3:.1f} ms {flops / da / 1e12:.3f} TFLOP/s")

for c, o, side in [(320, 320, 64), (640, 320, 64), (640, 640, 32), (1280, 1280, 16), (1280, 1280, 8)]:
    x, w = torch.randn(1, c, side, side), torch.randn(o, c, 3, 3) * 0.05
    flops = 2 * o * c * 9 * side * side
    d32 = median_time(lambda: torch.nn.functional.conv2d(x, w, padding=1))
    da = median_time(autocast(lambda: torch.nn.functional.conv2d(x, w, padding=1)))
    print(f"conv 1x{c}x{side}x{side} -> {o}: f32 {d32 * 1e3:.1f} ms {flops / d32 / 1e12:.3f} "
          f"TFLOP/s, autocast {da * 1e3:.1f} ms {flops / da / 1e12:.3f} TFLOP/s")
