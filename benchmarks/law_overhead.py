"""Cost of the closed-form routing law against one autograd backward of the same head.

For each sequence length T, times (median of --repeats runs, after one warm-up):
  * closed form: windtunnel.dynamics.attention_gradients(q, k, v, u, mask=causal), which
    recomputes the pattern and returns alpha, b, E[b], advantage, R, dS, dV, dQ, dK;
  * autograd:    the same head's forward pass (softmax, causal mask) plus one backward pass
    giving dQ, dK, dV for the upstream gradient u.
Prints a Markdown table; the numbers in BENCHMARKS.md come from this script.

Usage: python benchmarks/law_overhead.py [--lengths 128 512 2048] [--repeats 5] [--heads 4]
"""

from __future__ import annotations

import argparse
import math
import platform

import torch
from _timing import median_time_s

from windtunnel.dynamics import attention_gradients



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-head", type=int, default=32)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, dtype {args.dtype}, batch 1, heads {args.heads}, "
          f"d_head {args.d_head}, median of {args.repeats}")
    print("| T | closed form (ms) | autograd fwd+bwd (ms) | ratio |")
    print("|---|---|---|---|")
    for t in args.lengths:
        shape = (1, args.heads, t, args.d_head)
        q, k, v, u = (torch.randn(*shape, generator=gen, dtype=dtype) for _ in range(4))
        mask = torch.ones(t, t, dtype=torch.bool).tril()

        def closed():
            return attention_gradients(q, k, v, u, mask=mask)

        def autograd():
            qr, kr, vr = (x.clone().requires_grad_(True) for x in (q, k, v))
            scores = (qr @ kr.transpose(-1, -2)) / math.sqrt(args.d_head)
            alpha = torch.softmax(scores.masked_fill(~mask, -math.inf), -1)
            return torch.autograd.grad(alpha @ vr, (qr, kr, vr), grad_outputs=u)

        t_closed = median_time_s(closed, args.repeats)
        t_auto = median_time_s(autograd, args.repeats)
        print(f"| {t} | {1e3 * t_closed:.2f} | {1e3 * t_auto:.2f} | {t_closed / t_auto:.2f} |")


if __name__ == "__main__":
    main()
