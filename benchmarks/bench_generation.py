"""Text generation: ONNX Runtime (`OnnxGenerator`) vs Hugging Face ``generate()``.

The GPT-2 small architecture (the ``gpt2`` preset: 12 layers, d=768, fresh weights, as
``--random-init`` builds it offline) converted to 8 experts (every other FFN, eval
capacity factor 2.0), exported with `moeify.onnx.export_generation` for prompts of
``--prompt`` tokens. Each repeat generates ``--new`` tokens greedily for a batch of
random prompts (no eos: every run makes exactly that many) with HF and each exported
form, interleaved, on the same threads; reported: median tokens/s (batch x new tokens /
wall time) and the ratio ORT / HF, plus whether the greedy tokens agree. Target: ORT >=
1.5x HF. ``--moe-op``: the graphs' expert layers, ``static`` (fixed-capacity buffers)
and/or ``ort`` (ONNX Runtime's ``com.microsoft.MoE``, see `moeify.onnx.moe_op`); both
by default, each exported and timed. ``--dropless``: the model converted with dropless
routing, where the static prefill graph gives every expert a slot for every token.

    python benchmarks/bench_generation.py [--batches 1 4] [--prompt 64] [--new 64]
                                          [--moe-op static ort] [--quantize int4 int8]

``--quantize``: the experts of copies of the static graphs quantized (`moeify export --quantize`),
compared with float32: bytes, batch-1 tokens/s, and how often greedy decoding agrees over
32 fixed prompts of 8 to ``--prompt`` tokens (the first new token, and all of the first
``--new / 4``). Random weights make near-ties common, so agreement here is a floor for
trained weights, not an estimate.
"""

from __future__ import annotations

import os

# OpenMP threads (PyTorch) sleep instead of spinning between the timed calls, as ONNX
# Runtime's are told to (spinning=False): neither takes cores from the other's turn
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from harness import (  # noqa: E402
    RepeatPolicy,
    Stat,
    Target,
    interleave,
    print_table,
    print_targets,
    timed,
)

THREADS = 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2", help="a decoder-only preset id")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (all real)")
    parser.add_argument("--new", type=int, default=64, help="new tokens per sequence")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=None,
                        help="override the preset's layer count (smoke runs)")
    parser.add_argument("--dropless", action="store_true",
                        help="convert with dropless routing (the static graphs then give "
                             "every expert a slot per token of a group)")
    parser.add_argument("--moe-op", nargs="+", choices=["static", "ort"],
                        default=["static", "ort"],
                        help="expert layers of the graphs timed: static capacity buffers, "
                             "ONNX Runtime's com.microsoft.MoE, or both")
    parser.add_argument("--quantize", nargs="+", choices=["int4", "int8"], default=[],
                        help="also quantize the experts of the exported graphs and report "
                             "bytes, batch-1 tokens/s and greedy agreement with float32")
    args = parser.parse_args()

    import moeify
    from moeify.onnx import OnnxGenerator, export_generation
    from moeify.io.sources import build_hf, preset_config

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    config, model_class = preset_config(args.preset)
    if args.layers is not None:
        config.num_hidden_layers = args.layers
    model = build_hf(model_class, config)
    moeify.convert(model, moeify.MoEConfig(num_experts=args.experts, dropless=args.dropless))
    model.generation_config.eos_token_id = None  # every run makes --new tokens
    model.generation_config.pad_token_id = 0
    params = sum(p.numel() for p in model.parameters())
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {THREADS} threads; {args.preset} "
          f"({config.num_hidden_layers} layers) -> {args.experts} experts"
          f"{' (dropless)' if args.dropless else ''}, {params / 1e6:.0f}M "
          f"parameters; prompt {args.prompt}, {args.new} new tokens, greedy; {args.repeats} "
          f"interleaved repeats; load average {load[0]:.2f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        generators = {}
        for op in args.moe_op:
            seconds = timed(lambda: export_generation(model, f"{tmp}/{op}", seq_len=args.prompt,
                                                      moe_op=op))
            print(f"export --moe-op {op}: {seconds:.0f} s")
            generators[op] = OnnxGenerator(f"{tmp}/{op}", threads=THREADS, spinning=False)
        for batch in args.batches:
            ids = torch.randint(2, config.vocab_size, (batch, args.prompt),
                                generator=torch.Generator().manual_seed(batch))
            mask = torch.ones_like(ids)
            outputs = {}

            def hf() -> None:
                with torch.no_grad():
                    outputs["hf"] = model.generate(input_ids=ids, attention_mask=mask,
                                                   max_new_tokens=args.new,
                                                   do_sample=False).numpy()

            def ort(op: str) -> None:
                outputs[op] = generators[op].generate(ids.numpy(), mask.numpy(),
                                                      max_new_tokens=args.new, eos_token_id=[])

            # interleaved repeats, HF and each graph once per repeat; no warm-up
            times = interleave({"hf": hf, **{op: lambda op=op: ort(op) for op in generators}},
                               RepeatPolicy.fixed(args.repeats, warmups=0))
            tokens = batch * args.new
            stats = {k: Stat.of(v) for k, v in times.items()}
            speed = {k: tokens / s.median for k, s in stats.items()}
            spread = {k: f"{tokens / s.hi:.1f}-{tokens / s.lo:.1f}" for k, s in stats.items()}
            new_hf = outputs["hf"][:, args.prompt:]
            for op in generators:
                new_ort = outputs[op][:, args.prompt:]
                assert new_hf.shape == new_ort.shape == (batch, args.new), new_ort.shape
                rows.append((batch, op, speed["hf"], spread["hf"], speed[op], spread[op],
                             speed[op] / speed["hf"], float(np.mean(new_hf == new_ort))))
        quantized = []
        if args.quantize and "static" in generators:
            quantized = [compare_quantized(f"{tmp}/static", bits, generators["static"], args,
                                           config.vocab_size) for bits in args.quantize]
    print()
    print_table(["batch", "graphs (--moe-op)", "HF generate() tokens/s", "(min-max)",
                 "ORT tokens/s", "(min-max)", "ORT / HF", "greedy tokens equal"],
                [[batch, op, f"{hf:.1f}", hf_spread, f"{ort:.1f}", ort_spread, f"{ratio:.2f}",
                  f"{agree:.1%}"] for batch, op, hf, hf_spread, ort, ort_spread, ratio, agree
                 in rows], "rlrrrrrr")
    print()
    print_targets([Target.check(ratio >= 1.5, f"batch {batch}, --moe-op {op}: ORT tokens/s "
                                f">= 1.5x HF generate()", f"{ratio:.2f}x")
                   for batch, op, *_, ratio, _ in rows])
    if quantized:
        print()
        print_table(["graphs", "bytes", "/ float32", "ORT tokens/s at batch 1", "/ float32",
                     f"first new token equal ({PROMPTS} prompts)",
                     f"{args.new // 4} new tokens all equal"], quantized, "lrrrrrr")
    print(f"\nLoad average at the end: {os.getloadavg()[0]:.2f}")
    return 0


PROMPTS = 32  # fixed prompts on which quantized graphs are compared with float32


def compare_quantized(float_dir: str, bits: str, generator, args, vocab: int) -> list[str]:
    """Quantize a copy of the float32 graphs' experts; its bytes, batch-1 speed (timed
    interleaved with float32) and greedy agreement over fixed prompts of various lengths."""
    import shutil
    from pathlib import Path

    from moeify.onnx import OnnxGenerator
    from moeify.onnx.postprocess import postprocess

    target = f"{float_dir}-{bits}"
    shutil.copytree(float_dir, target)
    for graph in ("prefill.onnx", "decode.onnx"):
        postprocess(Path(target) / graph, optimize=False, quantize=bits, quantize_all=False)
    quantized = OnnxGenerator(target, threads=THREADS, spinning=False)
    size = lambda d: sum(p.stat().st_size for p in Path(d).glob("*.onnx*"))  # noqa: E731
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, vocab, int(n)).tolist()
               for n in rng.integers(8, args.prompt + 1, PROMPTS)]
    steps = args.new // 4
    a = generator.generate(prompts, max_new_tokens=steps, eos_token_id=[])
    b = quantized.generate(prompts, max_new_tokens=steps, eos_token_id=[])
    first = a.shape[1] - steps
    ids = np.random.default_rng(1).integers(2, vocab, (1, args.prompt))
    times = interleave({key: lambda g=g: g.generate(ids, max_new_tokens=args.new,
                                                    eos_token_id=[])
                        for key, g in (("float", generator), ("quantized", quantized))},
                       RepeatPolicy.fixed(args.repeats, warmups=0))
    speed = {k: args.new / Stat.of(v).median for k, v in times.items()}
    return [f"{bits} experts", f"{size(target):,}", f"{size(target) / size(float_dir):.3f}",
            f"{speed['quantized']:.1f}", f"{speed['quantized'] / speed['float']:.2f}",
            f"{np.mean(a[:, first] == b[:, first]):.1%}",
            f"{np.mean((a[:, first:] == b[:, first:]).all(axis=1)):.1%}"]


if __name__ == "__main__":
    raise SystemExit(main())
