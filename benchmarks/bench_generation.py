"""Text generation: ONNX Runtime (`OnnxGenerator`) vs Hugging Face ``generate()``.

The GPT-2 small architecture (the ``gpt2`` preset: 12 layers, d=768, fresh weights, as
``--random-init`` builds it offline) converted to 8 experts (every other FFN, eval
capacity factor 2.0), exported with `moeify.onnx.export_generation` for prompts of
``--prompt`` tokens. Each repeat generates ``--new`` tokens greedily for a batch of
random prompts (no eos: every run makes exactly that many) with both, interleaved, on
the same threads; reported: median tokens/s (batch x new tokens / wall time) and the
ratio ORT / HF, plus whether the greedy tokens agree. Target: ORT >= 1.5x HF.

    python benchmarks/bench_generation.py [--batches 1 4] [--prompt 64] [--new 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch

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
    args = parser.parse_args()

    import moeify
    from moeify.onnx import OnnxGenerator, export_generation
    from moeify.sources import build_hf, preset_config

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    config, model_class = preset_config(args.preset)
    if args.layers is not None:
        config.num_hidden_layers = args.layers
    model = build_hf(model_class, config)
    moeify.convert(model, moeify.MoEConfig(num_experts=args.experts))
    model.generation_config.eos_token_id = None  # every run makes --new tokens
    model.generation_config.pad_token_id = 0
    params = sum(p.numel() for p in model.parameters())
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {THREADS} threads; {args.preset} "
          f"({config.num_hidden_layers} layers) -> {args.experts} experts, {params / 1e6:.0f}M "
          f"parameters; prompt {args.prompt}, {args.new} new tokens, greedy; {args.repeats} "
          f"interleaved repeats; load average {load[0]:.2f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        export_generation(model, f"{tmp}/gen", seq_len=args.prompt)
        print(f"export: {time.perf_counter() - start:.0f} s")
        generator = OnnxGenerator(f"{tmp}/gen", threads=THREADS)
        for batch in args.batches:
            ids = torch.randint(2, config.vocab_size, (batch, args.prompt),
                                generator=torch.Generator().manual_seed(batch))
            mask = torch.ones_like(ids)
            times: dict[str, list[float]] = {"hf": [], "ort": []}
            outputs = {}
            for _ in range(args.repeats):
                start = time.perf_counter()
                with torch.no_grad():
                    outputs["hf"] = model.generate(input_ids=ids, attention_mask=mask,
                                                   max_new_tokens=args.new, do_sample=False)
                times["hf"].append(time.perf_counter() - start)
                start = time.perf_counter()
                outputs["ort"] = generator.generate(ids.numpy(), mask.numpy(),
                                                    max_new_tokens=args.new, eos_token_id=[])
                times["ort"].append(time.perf_counter() - start)
            new_hf, new_ort = outputs["hf"].numpy()[:, args.prompt:], outputs["ort"][:, args.prompt:]
            assert new_hf.shape == new_ort.shape == (batch, args.new), (new_hf.shape, new_ort.shape)
            agree = float(np.mean(new_hf == new_ort))
            tokens = batch * args.new
            hf, ort = (tokens / statistics.median(times[k]) for k in ("hf", "ort"))
            spread = {k: f"{tokens / max(v):.1f}-{tokens / min(v):.1f}" for k, v in times.items()}
            rows.append((batch, hf, spread["hf"], ort, spread["ort"], ort / hf, agree))
    print()
    print("| batch | HF generate() tokens/s | (min-max) | ORT tokens/s | (min-max) | ORT / HF | "
          "greedy tokens equal |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch, hf, hf_spread, ort, ort_spread, ratio, agree in rows:
        print(f"| {batch} | {hf:.1f} | {hf_spread} | {ort:.1f} | {ort_spread} | {ratio:.2f} | "
              f"{agree:.1%} |")
    print()
    for batch, *_, ratio, _ in rows:
        verdict = "PASS" if ratio >= 1.5 else "FAIL"
        print(f"- [{verdict}] batch {batch}: ORT tokens/s >= 1.5x HF generate(): {ratio:.2f}x")
    print(f"\nLoad average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
