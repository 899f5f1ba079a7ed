"""Which upcycling recipe pays? Continue a dense checkpoint dense, or upcycled four ways.

A byte-level GPT-2 (vocabulary 256, built from a config: nothing to download) learns the
Python standard library's own source files, every ``*.py`` of the running interpreter's
stdlib in sorted order (every 20th file held out for validation). Phase 1 trains it dense
for ``--dense-steps`` steps. From that checkpoint the arms continue for ``--arm-steps``
steps each, on the same batches in the same order:

  dense     the model as it is;
  copy      sparse upcycling: ``moeify.convert`` with 8 experts copied from the dense FFN
            plus 1% noise, top-1 (every other FFN, capacity factor 1.25);
  drop      Drop-Upcycling (Nakamura et al., ICLR 2025): 8 copies, each with a different
            half of its hidden neurons re-initialized (``init="drop"``, r = 0.5), top-1;
  granular  granular upcycling (He et al. 2024): each FFN split in 2 halves, 8 copies of
            them = 16 experts, top-2 (``granularity=2``): the dense FFN's FLOPs per token;
  fine      fine-grained: each FFN split in 4 quarters, 8 copies = 32 experts, top-4
            (``granularity=4``), balanced without an auxiliary loss (DeepSeek-V3's
            per-expert selection bias, ``bias_balancing=True`` with ``aux_loss_coef=0``,
            updated after every optimizer step by `moeify.balance_experts`);

every upcycled arm with ``moeify.aux_loss`` added to the loss (for ``fine`` only its
router z-loss). Each arm starts a fresh
AdamW with the same hyper-parameters (the phase-1 optimizer state is not carried over:
the upcycled models have parameters the dense one lacks) and the same schedule: a short
linear warmup, then a cosine decay to a tenth of the peak rate. The arms run interleaved,
one step of each in turn, so load from elsewhere on the machine slows them alike.
Validation loss (mean cross-entropy per byte, in nats, over a fixed set of held-out
batches) is measured every ``--eval-every`` steps; the script plots it against steps and
against training seconds, and prints a table: final losses (equal steps), losses at equal
training time (the fastest arm's total), training tokens/s, parameters, dropped tokens
and the load imbalance (busiest expert's tokens over the mean, per layer, averaged over
the layers and the last tenth of the steps), with a verdict per arm computed from those
numbers.

    python examples/upcycle_vs_dense.py                # ~20 min on 2 CPU cores, writes
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
RECIPES = ("copy", "drop", "granular", "fine")  # the upcycled arms, see the docstring


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
    imbalance: list[float] = field(default_factory=list)  # MoE: max / mean load per step


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


@dataclass
class Arm:
    """One way to continue the checkpoint: its model, optimizer and validation curve."""

    name: str
    description: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    batches: torch.Generator
    curve: Curve = field(default_factory=Curve)
    params: tuple[int, int] = (0, 0)  # total, active per token

    @property
    def moe(self) -> bool:
        return bool(moeify.switch_layers(self.model))

    def step(self, s: Settings, data: torch.Tensor) -> None:
        start = time.perf_counter()
        input_ids = sample_batch(data, s, self.batches)
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        if self.moe:
            loss = loss + moeify.aux_loss(self.model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.curve.train_seconds += time.perf_counter() - start
        if self.moe:
            stats = moeify.routing_stats(self.model)
            self.curve.dropped.append(sum(x.dropped_fraction for x in stats) / len(stats))
            self.curve.imbalance.append(sum(load_imbalance(x.tokens_per_expert)
                                            for x in stats) / len(stats))

    def record(self, step: int, val_batches: list[torch.Tensor]) -> None:
        c = self.curve
        c.steps.append(step)
        c.losses.append(evaluate(self.model, val_batches))
        c.seconds.append(c.train_seconds)
        print(f"  {self.name:8s} step {step:5d}  val loss {c.losses[-1]:.4f}  "
              f"train time {c.train_seconds:6.1f} s", flush=True)


def load_imbalance(tokens_per_expert: tuple[int, ...]) -> float:
    """The busiest expert's load over the mean load (1: perfectly balanced)."""
    mean = sum(tokens_per_expert) / len(tokens_per_expert)
    return max(tokens_per_expert) / mean if mean else float("nan")


def make_arm(name: str, description: str, model: torch.nn.Module, s: Settings, steps: int,
             seed: int, decay: bool, params: tuple[int, int] = (0, 0)) -> Arm:
    optimizer, schedule = make_optimizer(model, s, steps, decay)
    if any(layer.config.bias_balancing for _, layer in moeify.switch_layers(model)):
        moeify.balance_experts(model, optimizer)  # the bias moves after every step
    return Arm(name, description, model, optimizer, schedule,
               torch.Generator().manual_seed(seed), params=params)


def train(arms: list[Arm], s: Settings, steps: int, first_step: int, data: torch.Tensor,
          val_batches: list[torch.Tensor]) -> None:
    """``steps`` steps of every arm, interleaved step by step (whatever else runs on the
    machine slows every arm alike), each on its own batch stream; every arm is evaluated
    every ``eval_every`` steps."""
    for arm in arms:
        arm.model.train()
        arm.record(first_step, val_batches)
    for step in range(1, steps + 1):
        for arm in arms:
            arm.step(s, data)
        if step % s.eval_every == 0 or step == steps:
            for arm in arms:
                arm.record(first_step + step, val_batches)


# --- reporting -----------------------------------------------------------------------------


def interpolate(curve: Curve, seconds: float) -> float:
    """Validation loss of ``curve`` after ``seconds`` of training (linear in between)."""
    points = list(zip(curve.seconds, curve.losses))
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if t0 <= seconds <= t1:
            return l0 if t1 == t0 else l0 + (l1 - l0) * (seconds - t0) / (t1 - t0)
    return curve.losses[-1]


def compared(diff: float, what: str) -> str:
    if abs(diff) < TIE_NATS:
        return f"ties dense {what} ({diff:+.4f} nats)"
    if diff > 0:
        return f"beats dense by {diff:.4f} nats {what}"
    return f"loses to dense by {-diff:.4f} nats {what}"


def print_results(s: Settings, arms: list[Arm]) -> None:
    tokens = s.arm_steps * s.batch_size * s.seq_len
    dense = next(arm for arm in arms if arm.name == "dense")
    same_time = min(arm.curve.train_seconds for arm in arms)
    tps = {arm.name: tokens / arm.curve.train_seconds for arm in arms}
    print(f"\nresults after {s.dense_steps} dense + {s.arm_steps} steps per arm "
          f"({tokens:,} training tokens per arm); equal time = {same_time:.1f} s of training "
          "(the fastest arm's total, losses interpolated)")
    print()
    print("| arm | experts | final val loss | dense - arm | val loss at equal time | "
          "dense - arm | train tokens/s | vs dense | parameters total / active | dropped | "
          "load max / mean |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for arm in arms:
        c = arm.curve
        at_time = interpolate(c, same_time)
        dropped = f"{100 * sum(c.dropped) / len(c.dropped):.1f}%" if c.dropped else "-"
        last = c.imbalance[-max(1, len(c.imbalance) // 10):]
        imbalance = f"{sum(last) / len(last):.2f}" if c.imbalance else "-"
        print(f"| {arm.name} | {arm.description} | {c.losses[-1]:.4f} | "
              f"{dense.curve.losses[-1] - c.losses[-1]:+.4f} | {at_time:.4f} | "
              f"{interpolate(dense.curve, same_time) - at_time:+.4f} | {tps[arm.name]:,.0f} | "
              f"{tps[arm.name] / tps['dense']:.2f} | {arm.params[0]:,} / {arm.params[1]:,} | "
              f"{dropped} | {imbalance} |")
    print()
    for arm in arms:
        if arm is dense:
            continue
        steps = compared(dense.curve.losses[-1] - arm.curve.losses[-1], "at equal steps")
        time_ = compared(interpolate(dense.curve, same_time) - interpolate(arm.curve, same_time),
                         "at equal time")
        print(f"verdict {arm.name}: {steps}; {time_}; val loss at conversion "
              f"{arm.curve.losses[0]:.4f} vs dense {dense.curve.losses[0]:.4f}")


COLORS = {"dense": "tab:blue", "copy": "tab:orange", "drop": "tab:green",
          "granular": "tab:red", "fine": "tab:purple"}


def plot(path: Path, s: Settings, phase1: Curve, arms: list[Arm]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    by_step.plot(phase1.steps, phase1.losses, color="0.4", label="phase 1: dense")
    for arm in arms:
        by_step.plot(arm.curve.steps, arm.curve.losses, color=COLORS.get(arm.name),
                     label=f"{arm.name}: {arm.description} (final {arm.curve.losses[-1]:.4f})")
        by_time.plot(arm.curve.seconds, arm.curve.losses, color=COLORS.get(arm.name),
                     marker=".", label=arm.name)
    by_step.axvline(s.dense_steps, color="0.6", linestyle="--", linewidth=1)
    later = phase1.losses[len(phase1.losses) // 3:] + [x for a in arms for x in a.curve.losses]
    low, high = min(later), max(later)
    by_step.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    by_step.set(xlabel="training step", ylabel="validation loss (nats / byte)",
                title="validation loss vs. steps")
    by_step.legend(fontsize=8)
    by_time.set(xlabel="training seconds after the checkpoint (this CPU)",
                ylabel="validation loss (nats / byte)", title="validation loss vs. time")
    by_time.legend(fontsize=8)
    fig.suptitle(f"byte-level GPT-2 ({s.n_layer} layers, d={s.n_embd}) on the Python stdlib: "
                 "dense vs. upcycling recipes")
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
    parser.add_argument("--noise", type=float, default=0.01, help="copy arm's noise")
    parser.add_argument("--drop-ratio", type=float, default=0.5, help="drop arm's ratio")
    parser.add_argument("--arms", nargs="+", choices=["dense", *RECIPES],
                        default=["dense", *RECIPES],
                        help="which continuations to compare (dense always runs)")
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
    first = make_arm("dense", "-", model, s, s.dense_steps, args.seed, decay=False)
    train([first], s, s.dense_steps, 0, train_bytes, val_batches)
    phase1 = first.curve

    arm_seed = args.seed + 1  # every arm draws the same batches in the same order
    arms = [make_arm("dense", "none (continued dense)", model, s, s.arm_steps, arm_seed,
                     decay=True, params=(count_parameters(model), count_parameters(model)))]
    common = dict(every=2, capacity_factor=args.capacity, gate=args.gate, expert_dropout=0.0,
                  seed=args.seed)
    recipes = {
        "copy": (f"{args.experts} copies + {args.noise:g} noise, top-1",
                 dict(num_experts=args.experts, noise=args.noise)),
        "drop": (f"{args.experts}, Drop-Upcycling r={args.drop_ratio:g}, top-1",
                 dict(num_experts=args.experts, init="drop", drop_ratio=args.drop_ratio)),
        "granular": (f"{args.experts} x 2 halves, top-2",
                     dict(num_experts=2 * args.experts, top_k=2, granularity=2)),
        "fine": (f"{args.experts} x 4 quarters, top-4, bias balancing",
                 dict(num_experts=4 * args.experts, top_k=4, granularity=4,
                      bias_balancing=True, aux_loss_coef=0.0)),
    }
    assert sorted(recipes) == sorted(RECIPES)
    for name in args.arms:
        if name == "dense":
            continue
        description, options = recipes[name]
        upcycled = copy.deepcopy(model)
        report = moeify.convert(upcycled, moeify.MoEConfig(**common, **options),
                                seq_len=s.seq_len).report
        print(f"arm {name}:\n{report}")
        assert count_parameters(upcycled) == report.params_moe
        arms.append(make_arm(name, description, upcycled, s, s.arm_steps, arm_seed, decay=True,
                             params=(report.params_moe, report.active_params_per_token)))
    print(f"arms: {', '.join(a.name for a in arms)}; {s.arm_steps} steps each from step "
          f"{s.dense_steps}, fresh AdamW each (lr {s.lr}, warmup {s.warmup}, cosine to "
          "lr/10), interleaved step by step")
    train(arms, s, s.arm_steps, s.dense_steps, train_bytes, val_batches)

    print_results(s, arms)
    path = png_path(args)
    plot(path, s, phase1, arms)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
