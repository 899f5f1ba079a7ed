"""The steps of the runtime suite that run inside the runtime virtual environment
(``tests/runtimes/setup.sh``: transformers 4.57.6, gguf-py, sentencepiece and the
``llama_cpp`` binding, all from the ``llama-cpp-python`` sdist), as subcommands of a script:

    python runtime_tools.py spm-tokenizer DIR              # Llama-style SentencePiece tokenizer
    python runtime_tools.py qwen2-tokenizer DIR VOCAB_GGUF # Qwen2's BPE tokenizer, rebuilt
    python runtime_tools.py llama-cpp MODEL.gguf RESULT.json --prompt 1,2,3 --new 16
    python runtime_tools.py transformers HF_DIR RESULT.json --prompt 1,2,3 --new 16

The two runs write ``{"tokens": [...], "logits": [...], ...}``: the greedy continuation and
the logits after the prompt's last token. `greedy` is shared with the test, which runs it
with the project's transformers on the same directory. The module imports only the
standard library at the top, so the test imports it without the runtime packages.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

# Qwen2's pre-tokenizer split (its tokenizer.json), the one llama.cpp implements as "qwen2".
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_EOS = "<|endoftext|>"

WORDS = ["the", "a", "one", "two", "small", "large", "red", "blue", "expert", "router",
         "token", "layer", "model", "runs", "reads", "writes", "every", "each", "many", "few",
         "quick", "slow", "dense", "sparse", "gate", "up", "down", "weight", "tensor", "file",
         "name", "sum", "mean", "value", "step", "batch", "head", "query", "key", "context",
         "cache"]


def greedy(model, prompt: list[int], new: int) -> dict:
    """Greedy decoding of ``new`` tokens by a causal LM (the whole sequence recomputed at
    each step, no cache, no stop token) and the float32 logits after the prompt."""
    import torch

    ids = torch.tensor([prompt])
    tokens, first = [], None
    with torch.no_grad():
        for _ in range(new):
            logits = model(input_ids=ids).logits[0, -1].float()
            if first is None:
                first = logits.tolist()
            token = int(logits.argmax())
            tokens.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return {"tokens": tokens, "logits": first}


def sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` lines of 4 to 12 words of `WORDS` with digits and punctuation mixed in."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 999)))
        lines.append(" ".join(words).capitalize() + rng.choice(".!?,;"))
    return lines


def spm_tokenizer(out: Path, vocab: int) -> dict:
    """A SentencePiece BPE model (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, Llama's ids) trained
    on `sentences`, saved as an HF ``LlamaTokenizer`` (``tokenizer.model`` and its config).
    The report's ``vocab_size`` is the model's (every piece)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(sentences(600)) + "\n")
    prefix = out / "spm"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab, model_type="bpe",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    tokenizer = LlamaTokenizer(vocab_file=f"{prefix}.model", legacy=True)
    tokenizer.save_pretrained(out)
    for stray in (corpus, Path(f"{prefix}.model"), Path(f"{prefix}.vocab")):
        stray.unlink()
    return {"vocab_size": len(tokenizer), "tokens": len(tokenizer),
            "files": sorted(p.name for p in out.iterdir())}


def gguf_strings(reader, key: str) -> list[str]:
    field = reader.fields[key]
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def qwen2_tokenizer(out: Path, vocab_gguf: Path) -> dict:
    """Qwen2's tokenizer rebuilt from the vocabulary and merges of llama.cpp's
    ``ggml-vocab-qwen2.gguf``: byte-level BPE, NFC, Qwen2's split regex and its three
    special tokens, saved with ``save_pretrained``. The gguf's ``[PAD...]`` rows (ids past
    the special tokens, up to Qwen2's 151936) are not tokens: the ``vocab_size`` reported
    (the model's, as Qwen2's) counts them, ``tokens`` does not."""
    import gguf
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(str(vocab_gguf))
    tokens = gguf_strings(reader, "tokenizer.ggml.tokens")
    kinds = [int(reader.fields["tokenizer.ggml.token_type"].parts[i][0])
             for i in reader.fields["tokenizer.ggml.token_type"].data]
    normal = {t: i for i, (t, k) in enumerate(zip(tokens, kinds))
              if k == gguf.TokenType.NORMAL}
    control = [t for t, k in zip(tokens, kinds) if k == gguf.TokenType.CONTROL]
    merges = [tuple(m.split(" ")) for m in gguf_strings(reader, "tokenizer.ggml.merges")]

    core = Tokenizer(models.BPE(normal, merges, fuse_unk=False, byte_fallback=False))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=QWEN2_EOS,
                                        pad_token=QWEN2_EOS, clean_up_tokenization_spaces=False)
    tokenizer.save_pretrained(out)
    return {"vocab_size": len(tokens), "tokens": len(tokenizer), "special": control,
            "files": sorted(p.name for p in out.iterdir())}


def run_llama_cpp(model: Path, prompt: list[int], new: int) -> dict:
    """llama.cpp's runtime through the ``llama_cpp`` binding: flash attention off, f32 K
    and V caches, the logits of every evaluated token kept, greedy (argmax) decoding."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        model_path=str(model), n_ctx=len(prompt) + new + 8, n_batch=64, n_threads=2,
        n_threads_batch=2, flash_attn=False, type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32, logits_all=True, verbose=False,
    )
    llm.eval(prompt)
    first = np.array(llm.scores[len(prompt) - 1], dtype=np.float32)
    tokens = []
    for _ in range(new):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(token)
        llm.eval([token])
    keys = ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre")
    return {"tokens": tokens, "logits": first.tolist(),
            "nan_logits": int(np.isnan(first).sum()),
            "metadata": {k: llm.metadata.get(k) for k in keys},
            "llama_cpp": llama_cpp.__version__}


def run_transformers(directory: Path, prompt: list[int], new: int) -> dict:
    """This environment's transformers (4.x) on an HF directory: `greedy`, plus the
    class it built, the keys its load reported missing or unexpected and the RoPE base
    it read."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        directory, torch_dtype=torch.float32, output_loading_info=True)
    return {**greedy(model.eval(), prompt, new), "class": type(model).__name__,
            "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
            "rope_theta": getattr(model.config, "rope_theta", None),
            "transformers": transformers.__version__}


def ids(text: str) -> list[int]:
    return [int(t) for t in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("spm-tokenizer")
    p.add_argument("out", type=Path)
    p.add_argument("--vocab", type=int, default=300)
    p = sub.add_parser("qwen2-tokenizer")
    p.add_argument("out", type=Path)
    p.add_argument("vocab_gguf", type=Path)
    for step in ("llama-cpp", "transformers"):
        p = sub.add_parser(step)
        p.add_argument("model", type=Path)
        p.add_argument("result", type=Path)
        p.add_argument("--prompt", type=ids, required=True)
        p.add_argument("--new", type=int, default=16)
    args = parser.parse_args(argv)
    if args.step == "spm-tokenizer":
        result = spm_tokenizer(args.out, args.vocab)
    elif args.step == "qwen2-tokenizer":
        result = qwen2_tokenizer(args.out, args.vocab_gguf)
    else:
        run = run_llama_cpp if args.step == "llama-cpp" else run_transformers
        args.result.write_text(json.dumps(run(args.model, args.prompt, args.new)))
        return
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
