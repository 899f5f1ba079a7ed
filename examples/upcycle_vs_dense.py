"""Does sparse upcycling pay? Continue a dense checkpoint dense, or upcycled to a Switch MoE.

A byte-level GPT-2 (vocabulary 256, built from a config: nothing to download) learns the
Python standard library's own source files, every ``*.py`` of the running interpreter's
stdlib in sorted order (every 20th file held out for validation). Phase 1 trains it dense
for ``--dense-steps`` steps. From that checkpoint two arms continue for ``--arm-steps``
steps each, on the same batches in the same order:

  dense     the model as it is;
  upcycled  the same model converted with ``moeify.convert`` (8 experts, every other
            FFN, capacity factor 1.25, experts copied from the dense FFN plus 1% noise),
            with ``moeify.aux_loss`` added to the loss.

Each arm starts a fresh AdamW with the same hyper-parameters (the phase-1 optimizer state
is not carried over: the upcycled model has parameters the dense one lacks) and the same
schedule: a short linear warmup, then a cosine decay to a tenth of the peak rate.
Validation loss (mean cross-entropy per byte, in nats, over a fixed set of held-out
batches) is measured every ``--eval-every`` steps; the script plots it against steps and
against training seconds, and prints the final losses, the training tokens/s of each arm
(wall time of the training steps only), the parameter counts and a verdict computed from
those numbers.

    python examples/upcycle_vs_dense.py                # ~10 min on 2 CPU cores, writes
                                                       # examples/upcycle_vs_dense.png
    python examples/upcycle_vs_dense.py --quick --png /tmp/upcycle.png   # < 1 min smoke run
"""

from __future__ import annotations

import os

# The OpenMP threads sleep instead of spinning while they wait: on a machine shared with
# other work, spinning threads slow every step down several times over.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

import moeify  # noqa: E402

VALIDATION_EVERY_NTH_FILE = 20
TIE_NATS = 0.005  # differences smaller than this are reported as a tie


@dataclass(frozen=True)
class Settings:
    n_layer: int
    n_embd: int
    n_head: int
    seq_len: int
    batch_size: int
    dense_steps: int
    arm_steps: int
    eval_every: int
    eval_batches: int
    lr: float
    warmup: int


FULL = Settings(n_layer=4, n_embd=128, n_head=4, seq_len=128, batch_size=16, dense_steps=600,
                arm_steps=600, eval_every=50, eval_batches=16, lr=2e-3, warmup=30)
QUICK = Settings(n_layer=2, n_embd=32, n_head=2, seq_len=32, batch_size=8, dense_steps=30,
                 arm_steps=30, eval_every=10, eval_batches=4, lr=3e-3, warmup=5)


@dataclass
class Curve:
    """Validation losses of one run at the steps it was evaluated, and the training
    seconds spent before each evaluation."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    dropped: list[float] = field(default_factory=list)  # MoE: fraction dropped per step


# --- data ----------------------------------------------------------------------------------


def stdlib_files() -> tuple[Path, list[Path]]:
    """The stdlib directory and its ``*.py`` files (no installed packages), sorted."""
    root = Path(json.__file__).resolve().parent.parent
    skip = {"site-packages", "dist-packages"}
    files = [p for p in root.rglob("*.py")
             if p.is_file() and not skip & set(p.relative_to(root).parts)]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_corpus() -> tuple[torch.Tensor, torch.Tensor, str]:
    """Train and validation bytes (files joined by a 0 byte) and a one-line summary."""
    root, files = stdlib_files()
    train, val = [], []
    for i, path in enumerate(files):
        held_out = i % VALIDATION_EVERY_NTH_FILE == VALIDATION_EVERY_NTH_FILE - 1
        (val if held_out else train).append(path.read_bytes())
    train_bytes, val_bytes = (torch.frombuffer(bytearray(b"\0".join(parts)), dtype=torch.uint8)
                              for parts in (train, val))
    summary = (f"corpus: {len(files):,} stdlib files under {root}, {len(train_bytes):,} train "
               f"bytes / {len(val_bytes):,} validation bytes ({len(val)} held-out files)")
    return train_bytes, val_bytes, summary


def sample_batch(data: torch.Tensor, s: Settings, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - s.seq_len, (s.batch_size,), generator=generator)
    return torch.stack([data[i:i + s.seq_len] for i in starts.tolist()]).long()


# --- model and training --------------------------------------------------------------------


def build_model(s: Settings) -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(
        vocab_size=256, n_positions=s.seq_len, n_embd=s.n_embd, n_layer=s.n_layer,
        n_head=s.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_optimizer(model, s: Settings, steps: int, decay: bool):
    """AdamW with a linear warmup, then constant (phase 1) or a cosine decay to lr / 10."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95),
                                  weight_decay=0.01)

    def factor(step: int) -> float:
        if step < s.warmup:
            return (step + 1) / s.warmup
        if not decay:
            return 1.0
        progress = (step - s.warmup) / max(1, steps - s.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in batches]
    model.train()
    return sum(losses) / len(losses)


def train(model, s: Settings, steps: int, first_step: int, data: torch.Tensor,
          val_batches: list[torch.Tensor], seed: int, decay: bool, label: str) -> Curve:
    """Train ``steps`` steps on batches drawn with ``seed``; evaluate every eval_every."""
    moe = bool(moeify.switch_layers(model))
    optimizer, schedule = make_optimizer(model, s, steps, decay)
    generator = torch.Generator().manual_seed(seed)
    curve = Curve()

    def record(step: int) -> None:
        curve.steps.append(first_step + step)
        curve.losses.append(evaluate(model, val_batches))
        curve.seconds.append(curve.train_seconds)
        print(f"  {label:8s} step {first_step + step:5d}  val loss {curve.losses[-1]:.4f}  "
              f"train time {curve.train_seconds:6.1f} s", flush=True)

    model.train()
    record(0)
    for step in range(1, steps + 1):
        start = time.perf_counter()
        input_ids = sample_batch(data, s, generator)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        if moe:
            loss = loss + moeify.aux_loss(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        curve.train_seconds += time.perf_counter() - start
        if moe:
            stats = moeify.routing_stats(model)
            curve.dropped.append(sum(x.dropped_fraction for x in stats) / len(stats))
        if step % s.eval_every == 0 or step == steps:
            record(step)
    return curve


# --- reporting -----------------------------------------------------------------------------


def interpolate(curve: Curve, seconds: float) -> float:
    """Validation loss of ``curve`` after ``seconds`` of training (linear in between)."""
    points = list(zip(curve.seconds, curve.losses))
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if t0 <= seconds <= t1:
            return l0 if t1 == t0 else l0 + (l1 - l0) * (seconds - t0) / (t1 - t0)
    return curve.losses[-1]


def verdict(dense: float, upcycled: float, speed_ratio: float) -> str:
    diff = dense - upcycled
    speed = f"at {speed_ratio:.2f}x the dense arm's tokens/s"
    if abs(diff) < TIE_NATS:
        return f"verdict: a tie at this scale ({diff:+.4f} nats), {speed}"
    if diff > 0:
        return f"verdict: upcycled beats dense by {diff:.4f} nats at equal steps, {speed}"
    return f"verdict: dense is ahead by {-diff:.4f} nats at this scale, {speed}"


def print_results(s: Settings, dense: Curve, moe: Curve, params: dict[str, int]) -> None:
    tokens = s.arm_steps * s.batch_size * s.seq_len
    tps_dense, tps_moe = tokens / dense.train_seconds, tokens / moe.train_seconds
    final_dense, final_moe = dense.losses[-1], moe.losses[-1]
    same_time = min(dense.train_seconds, moe.train_seconds)
    dropped = 100 * sum(moe.dropped) / max(1, len(moe.dropped))
    print(f"\nresults after {s.dense_steps} dense + {s.arm_steps} steps per arm "
          f"({tokens:,} training tokens per arm)")
    print(f"final val loss   dense {final_dense:.4f}   upcycled {final_moe:.4f}   "
          f"difference (dense - upcycled) {final_dense - final_moe:+.4f} nats")
    print(f"train tokens/s   dense {tps_dense:,.0f}   upcycled {tps_moe:,.0f}   "
          f"ratio {tps_moe / tps_dense:.2f}")
    print(f"parameters       dense {params['dense']:,}   upcycled {params['moe']:,} total / "
          f"{params['active']:,} active per token")
    print(f"upcycled arm     {dropped:.1f}% of tokens dropped by capacity in training (mean "
          f"over layers and steps); val loss at conversion {moe.losses[0]:.4f} vs dense "
          f"{dense.losses[0]:.4f}")
    print(f"equal train time ({same_time:.1f} s, interpolated)   dense "
          f"{interpolate(dense, same_time):.4f}   upcycled {interpolate(moe, same_time):.4f}")
    print(verdict(final_dense, final_moe, tps_moe / tps_dense))


def plot(path: Path, s: Settings, phase1: Curve, dense: Curve, moe: Curve) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    by_step.plot(phase1.steps, phase1.losses, color="0.4", label="phase 1: dense")
    by_step.plot(dense.steps, dense.losses, color="tab:blue",
                 label=f"dense arm (final {dense.losses[-1]:.4f})")
    by_step.plot(moe.steps, moe.losses, color="tab:orange",
                 label=f"upcycled arm, 8 experts (final {moe.losses[-1]:.4f})")
    by_step.axvline(s.dense_steps, color="0.6", linestyle="--", linewidth=1)
    later = phase1.losses[len(phase1.losses) // 3:] + dense.losses + moe.losses
    low, high = min(later), max(later)
    by_step.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    by_step.set(xlabel="training step", ylabel="validation loss (nats / byte)",
                title="validation loss vs. steps")
    by_step.legend()
    by_time.plot(dense.seconds, dense.losses, color="tab:blue", marker=".", label="dense arm")
    by_time.plot(moe.seconds, moe.losses, color="tab:orange", marker=".", label="upcycled arm")
    by_time.set(xlabel="training seconds after the checkpoint (this CPU)",
                ylabel="validation loss (nats / byte)", title="validation loss vs. time")
    by_time.legend()
    fig.suptitle(f"byte-level GPT-2 ({s.n_layer} layers, d={s.n_embd}) on the Python stdlib: "
                 f"dense vs. sparse upcycling")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (< 1 min)")
    parser.add_argument("--png", type=Path, default=None,
                        help="where to write the plot (default: next to this script; with "
                             "--quick, a temporary directory)")
    parser.add_argument("--dense-steps", type=int, help="phase-1 dense steps")
    parser.add_argument("--arm-steps", type=int, help="steps of each arm after the checkpoint")
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--capacity", type=float, default=1.25)
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--gate", choices=["softmax", "normalized"], default="softmax")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    return parser.parse_args()


def settings_from(args: argparse.Namespace) -> Settings:
    s = QUICK if args.quick else FULL
    overrides = {"dense_steps": args.dense_steps, "arm_steps": args.arm_steps,
                 "eval_every": args.eval_every}
    return replace(s, **{k: v for k, v in overrides.items() if v is not None})


def png_path(args: argparse.Namespace) -> Path:
    if args.png is not None:
        return args.png
    if args.quick:
        return Path(tempfile.mkdtemp(prefix="upcycle_vs_dense_")) / "upcycle_vs_dense.png"
    return Path(__file__).resolve().with_suffix(".png")


def main() -> None:
    args = parse_args()
    s = settings_from(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_bytes, val_bytes, summary = load_corpus()
    print(summary)
    val_generator = torch.Generator().manual_seed(10_000 + args.seed)
    val_batches = [sample_batch(val_bytes, s, val_generator) for _ in range(s.eval_batches)]

    model = build_model(s)
    print(f"model: byte-level GPT-2, {s.n_layer} layers, d {s.n_embd}, {s.n_head} heads, "
          f"sequences of {s.seq_len} bytes, batches of {s.batch_size}; "
          f"{count_parameters(model):,} parameters; {torch.get_num_threads()} threads")
    print(f"phase 1: dense for {s.dense_steps} steps (AdamW lr {s.lr}, warmup {s.warmup})")
    phase1 = train(model, s, s.dense_steps, 0, train_bytes, val_batches, seed=args.seed,
                   decay=False, label="dense")

    upcycled = copy.deepcopy(model)
    config = moeify.MoEConfig(num_experts=args.experts, every=2, capacity_factor=args.capacity,
                              noise=args.noise, gate=args.gate, expert_dropout=0.0,
                              seed=args.seed)
    report = moeify.convert(upcycled, config, seq_len=s.seq_len).report
    print(report)
    assert count_parameters(upcycled) == report.params_moe
    params = {"dense": count_parameters(model), "moe": report.params_moe,
              "active": report.active_params_per_token}

    arm_seed = args.seed + 1  # both arms draw the same batches in the same order
    print(f"arms: {s.arm_steps} steps each from step {s.dense_steps}, fresh AdamW each "
          f"(lr {s.lr}, warmup {s.warmup}, cosine to lr/10)")
    dense = train(model, s, s.arm_steps, s.dense_steps, train_bytes, val_batches,
                  seed=arm_seed, decay=True, label="dense")
    moe = train(upcycled, s, s.arm_steps, s.dense_steps, train_bytes, val_batches,
                seed=arm_seed, decay=True, label="upcycled")

    print_results(s, dense, moe, params)
    path = png_path(args)
    plot(path, s, phase1, dense, moe)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
