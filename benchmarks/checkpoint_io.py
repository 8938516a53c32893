"""What distrust of files costs: verified checkpoints and the per-step finiteness check.

For the paper's HMM transformer (9L/8H/256, ~7.4M parameters) and the 2-core bijection model,
with a real AdamW state (one optimizer step taken), times (median of --repeats runs, after one
warm-up), each pair measured back to back in the same process:
  * save:  ``torch.save`` of the training state to memory, against ``RunDir.save_checkpoint``'s
           bytes (the finiteness scan, the SHA-256 of the content, then ``torch.save``);
  * load:  ``torch.load(weights_only=True)`` of those bytes, against ``load_checkpoint_file``
           (the same load, then the hash check);
  * step:  one training step of the Trainer's loop (forward, backward, clip, AdamW), against the
           check of the weights it now runs after every step (max |w| of every parameter).
Prints a Markdown table; the numbers in BENCHMARKS.md come from this script.

Usage: python benchmarks/checkpoint_io.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import platform
import tempfile
from pathlib import Path

import torch
from _timing import median_time_s

from windtunnel.presets import get_preset
from windtunnel.runs import RunDir, load_checkpoint_file
from windtunnel.train import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, {platform.processor() or 'cpu'}")
    print()
    print("| model | parameters | checkpoint (MB) | torch.save (ms) | verified save (ms) | torch.load (ms) | verified load (ms) | train step (ms) | weight check (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, batch in (("hmm/transformer/paper", 8), ("bijection/transformer/cpu", 128)):
        task, model, preset = key.split("/")
        experiment = get_preset(task, model, preset)
        experiment = dataclasses.replace(experiment, train=dataclasses.replace(experiment.train, batch_size=batch, eval_size=8, eval_batch_size=8, device="cpu"))
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(experiment, Path(tmp) / "run")
            trainer.fit(stop_at=1)
            state = trainer.state_dict()
            run = RunDir(Path(tmp) / "bench")

            def plain_save() -> bytes:
                buffer = io.BytesIO()
                torch.save(state, buffer)
                return buffer.getvalue()

            plain = plain_save()
            verified = run._checkpoint_bytes(state)
            path = Path(tmp) / "verified.pt"
            path.write_bytes(verified)
            t_save = median_time_s(plain_save, args.repeats)
            t_vsave = median_time_s(lambda: run._checkpoint_bytes(state), args.repeats)
            t_load = median_time_s(lambda: torch.load(io.BytesIO(plain), map_location="cpu", weights_only=True), args.repeats)
            t_vload = median_time_s(lambda: load_checkpoint_file(path), args.repeats)
            trainer.config = dataclasses.replace(trainer.config, steps=10**6, eval_every=10**6, checkpoint_every=10**6, log_every=10**6)
            trainer.run = None

            def step() -> None:
                trainer._fit(stop_at=trainer.step + 1, progress=False)

            t_step = median_time_s(step, args.repeats)
            t_check = median_time_s(trainer._weights_finite, args.repeats)
            n_params = sum(p.numel() for p in trainer.model.parameters())
            print(f"| {key} (batch {batch}) | {n_params:,} | {len(verified) / 1e6:.1f} | {t_save * 1e3:.1f} | {t_vsave * 1e3:.1f} | "
                  f"{t_load * 1e3:.1f} | {t_vload * 1e3:.1f} | {t_step * 1e3:.1f} | {t_check * 1e3:.2f} |")


if __name__ == "__main__":
    main()
