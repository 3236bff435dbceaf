"""GPU check, for one CUDA machine, in under 8 minutes: fedlora's GPU paths against its CPU ones.

1. **Same round on the GPU as on the CPU**: a tiny Llama's shared-adapter training
   (3 steps, float32, TF32 off) on ``cuda`` and on ``cpu`` from the same seed; the largest
   difference of the resulting adapter tensors must stay under ``TOLERANCE``.
2. **Formats**: SmolLM2-135M (client 0 of the Shakespeare preset) and MiniLM (client 0 of
   bbc-news) in float32, a bfloat16 base, bfloat16 with bf16 autocast, and a 4-bit NF4
   base (bitsandbytes): step time, peak GPU memory and the held-out metric
   (`simulations/bench_precision.py --device cuda`).
3. **Four simulated clients sharing one GPU** (``--gpus-per-client 0.25``): two rounds of
   the Shakespeare preset in float32 and with a bfloat16 base; round times and perplexity.

Usage (after ``pip install -e ".[gpu]"`` for bitsandbytes):

    python simulations/gpu_check.py [--steps 16] [--skip-federation]

Exits non-zero if a check fails. Without CUDA it says so and exits 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

TOLERANCE = 1e-4


def same_round_on_both() -> float:
    """Largest difference between the adapter trained on the GPU and on the CPU."""
    import torch

    from fedlora.config import RunConfig
    from fedlora.lora.adapters import activate, adapter_state
    from fedlora.models import GLOBAL, build_model
    from fedlora.train import tokenize, train_steps

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    texts = [f"the {i}th line of a tiny play, spoken twice over" for i in range(16)]
    states = {}
    for device in ("cpu", "cuda"):
        cfg = RunConfig.from_flat({"model": "tiny-llama", "task": "causal-lm", "device": device})
        loaded = build_model(cfg.model, 1, seed=0)
        data = tokenize(loaded.tokenizer, texts, None, 32)
        activate(loaded.model, [GLOBAL], trainable=[GLOBAL])
        train_steps(loaded.model, data, steps=3, batch_size=8, learning_rate=1e-2, seed=0)
        states[device] = adapter_state(loaded.model, GLOBAL)
    return max(float((states["cpu"][k] - states["cuda"][k]).abs().max()) for k in states["cpu"])


def federation(base_dtype: str) -> tuple[list[float], float, float]:
    """Two rounds of the Shakespeare preset, 4 clients on one GPU: round seconds, perplexity, wall."""
    import fedlora

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = fedlora.run(
            preset="shakespeare",
            clients=4,
            rounds=2,
            out=Path(tmp) / "run",
            gpus_per_client=0.25,
            cpus_per_client=1,
            device="cuda",
            base_dtype=base_dtype,
            local_only_baseline=False,
        )
        wall = time.perf_counter() - start
    ends = [r["wall_s"] for r in result.summary["rounds"]]
    rounds = [b - a for a, b in zip([0.0, *ends[:-1]], ends, strict=True)]
    return rounds, result.summary["final"]["personalized_perplexity"], wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=16, help="measured training steps per format")
    parser.add_argument("--skip-federation", action="store_true", help="only checks 1 and 2")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU here; nothing to check")
        return 2
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    failures = []
    worst = same_round_on_both()
    print(
        f"1. tiny Llama, 3 steps: largest adapter difference GPU vs CPU {worst:.2e} (tolerance {TOLERANCE:g})"
    )
    if not worst < TOLERANCE:
        failures.append("GPU and CPU rounds differ")
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_precision import table

    print("2. formats on the GPU")
    for name in ("smollm2", "minilm"):
        rows = table(name, args.steps, "cuda")
        if not all(math.isfinite(r["test_loss"]) for r in rows.values()):
            failures.append(f"{name}: a format gave a non-finite held-out loss")
    if not args.skip_federation:
        print("3. four simulated clients on one GPU (--gpus-per-client 0.25), Shakespeare preset, 2 rounds")
        for dtype in ("float32", "bfloat16"):
            rounds, perplexity, wall = federation(dtype)
            shown = ", ".join(f"{t:.1f}" for t in rounds)
            print(f"   base {dtype}: round seconds {shown}; perplexity {perplexity:.1f}; {wall:.0f} s in all")
            if not math.isfinite(perplexity):
                failures.append(f"federation with a {dtype} base: perplexity {perplexity}")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
