"""moeify's ``--format hf`` decoder outputs run in llama.cpp and in transformers 4.x.

Each case builds a small dense decoder with randomized weights and a real tokenizer, converts
it with the ``moeify convert`` command line, and runs the output directory three ways:
transformers (this environment, 5.x), llama.cpp (its ``convert_hf_to_gguf.py --outtype f32``,
then its runtime through the ``llama_cpp`` binding built from the same sources: flash
attention off, f32 KV cache) and transformers 4.57.6 (the runtime environment). Each gives
the greedy continuation of `PROMPT` (16 tokens) and the logits after it. A runnable case
asserts identical tokens and first-step logits within `LOGITS_ATOL`; the variants llama.cpp
does not run as transformers does assert what happens there and that moeify's report says
so. The dense sources themselves are the controls.

The suite needs the runtime environment that ``tests/runtimes/setup.sh`` builds and
``make test-runtimes`` names in ``MOEIFY_RUNTIMES``; without it every test is skipped. Each
run writes its results table to ``$MOEIFY_RUNTIMES/results.json`` (docs/runtimes.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers as tf

from tests.runtimes.runtime_tools import greedy
from tests.models import randomize

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RUNTIMES = os.environ.get("MOEIFY_RUNTIMES")

pytestmark = [
    pytest.mark.runtimes,
    pytest.mark.skipif(not RUNTIMES, reason="the runtime suite (llama.cpp, transformers "
                       "4.57.6) runs with `make test-runtimes`"),
]

PROMPT = [1, 17, 254, 42, 96, 133, 7, 201]  # token ids valid in both tokenizers
NEW_TOKENS = 16
LOGITS_ATOL = 1e-4
DIFFERS_ABOVE = 1e-2  # "llama.cpp computes other outputs": far outside LOGITS_ATOL
DIMS = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "tie_word_embeddings": False}
SPM_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}
QWEN2_EOS_ID = 151643
QWEN2_IDS = {"bos_token_id": QWEN2_EOS_ID, "eos_token_id": QWEN2_EOS_ID}
# The sources: config and model classes, the tokenizer each is saved with, and config
# fields; each RoPE base is its family's published one (Llama 3, Mistral 7B v0.2, Qwen2),
# none the default of a config class, so a reader that misses it computes other outputs.
SOURCES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, "spm", {"rope_theta": 500000.0}),
    # sliding_window=None: Mistral 7B v0.2 onwards (a window is not part of llama.cpp's
    # Llama graph, so one shorter than the sequence would make other outputs there).
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, "spm",
                {"rope_theta": 1000000.0, "sliding_window": None}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, "qwen2", {"rope_theta": 1000000.0}),
    # llama.cpp's Qwen2-MoE reads only a BPE tokenizer whose pre-tokenizer it knows.
    "llama+qwen2-tokenizer": (tf.LlamaConfig, tf.LlamaForCausalLM, "qwen2",
                              {"rope_theta": 500000.0}),
    # Qwen3 (Qwen2's tokenizer): per-head q/k norms, a head_dim other than hidden / heads
    # (as Qwen3-0.6B's 128 for 1024 / 16)
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, "qwen2",
              {"rope_theta": 1000000.0, "head_dim": 32}),
}
RUNS, REFUSED, DIFFERS = "runs", "converter refuses", "differs"


@dataclass(frozen=True)
class Case:
    """A source, the ``moeify convert`` options that make the output (none: the source
    itself, a control), the graph llama.cpp builds for it (its ``general.architecture``),
    what llama.cpp does with it and the fragment of moeify's notes that says so (runnable
    cases: no note says "for llama.cpp")."""

    id: str
    source: str
    options: tuple[str, ...] | None
    graph: str
    expect: str = RUNS
    note: str | None = None


QWEN2_MOE = ("--hf-arch", "qwen2_moe")
QWEN3_MOE = ("--hf-arch", "qwen3_moe")
CASES = [
    Case("dense llama (control)", "llama", None, "llama"),
    Case("dense qwen2 (control)", "qwen2", None, "qwen2"),
    Case("llama -> mixtral", "llama", ("--hf-arch", "mixtral"), "llama"),
    Case("mistral -> mixtral", "mistral", ("--hf-arch", "mixtral"), "llama"),
    Case("llama -> qwen2_moe top-1 every 1", "llama+qwen2-tokenizer",
         (*QWEN2_MOE, "--top-k", "1", "--every", "1"), "qwen2moe"),
    Case("qwen2 -> qwen2_moe top-1 every 1", "qwen2",
         (*QWEN2_MOE, "--top-k", "1", "--every", "1"), "qwen2moe"),
    Case("qwen2 -> qwen2_moe top-1 every 2 (default)", "qwen2", (*QWEN2_MOE, "--top-k", "1"),
         "qwen2moe", REFUSED, "--every 1"),
    Case("qwen2 -> qwen2_moe top-2 every 1", "qwen2",
         (*QWEN2_MOE, "--top-k", "2", "--every", "1"), "qwen2moe", DIFFERS,
         "llama.cpp's Qwen2-MoE does not"),
    Case("qwen2 -> qwen2_moe top-2 raw every 1", "qwen2",
         (*QWEN2_MOE, "--top-k", "2", "--gate", "raw", "--every", "1"), "qwen2moe"),
    Case("dense qwen3 (control)", "qwen3", None, "qwen3"),
    Case("qwen3 -> qwen3_moe top-2 every 1", "qwen3",
         (*QWEN3_MOE, "--top-k", "2", "--every", "1"), "qwen3moe"),
    Case("qwen3 -> qwen3_moe 16 experts top-4 granularity 4 every 1", "qwen3",
         (*QWEN3_MOE, "--experts", "16", "--top-k", "4", "--granularity", "4", "--every", "1"),
         "qwen3moe"),
    Case("qwen3 -> qwen3_moe top-2 every 2 (default)", "qwen3", (*QWEN3_MOE, "--top-k", "2"),
         "qwen3moe", REFUSED, "--every 1"),
    Case("qwen3 -> qwen3_moe top-2 raw every 1", "qwen3",
         (*QWEN3_MOE, "--top-k", "2", "--gate", "raw", "--every", "1"), "qwen3moe", DIFFERS,
         "llama.cpp's Qwen3-MoE always renormalises"),
]


@dataclass(frozen=True)
class Runtime:
    """The environment ``setup.sh`` built: its Python and the llama.cpp sources."""

    python: Path
    llama_cpp: Path

    def run(self, *args, timeout: float = 900) -> subprocess.CompletedProcess:
        """``python ARGS`` in the runtime environment, from the repository root; the caller
        checks the exit status (the converter's refusal is a result)."""
        return subprocess.run([str(self.python), *map(str, args)], capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT, check=False)

    def tool(self, *args) -> subprocess.CompletedProcess:
        """A `runtime_tools` step; fails the test on a non-zero exit."""
        result = self.run(HERE / "runtime_tools.py", *args)
        assert result.returncode == 0, result.stderr[-3000:]
        return result


@pytest.fixture(scope="module")
def runtime_dir() -> Path:
    return (ROOT / RUNTIMES).resolve()


@pytest.fixture(scope="module")
def runtime(runtime_dir) -> Runtime:
    stamp = runtime_dir / "ready.json"
    if not stamp.exists():
        pytest.fail(f"{stamp} missing: run `tests/runtimes/setup.sh {RUNTIMES}` "
                    "(or `make test-runtimes`)")
    ready = json.loads(stamp.read_text())
    return Runtime(Path(ready["python"]), Path(ready["llama_cpp"]))


@pytest.fixture(scope="module")
def tokenizers(runtime, tmp_path_factory) -> dict[str, tuple[Path, int]]:
    """The two tokenizers (their directory and the model vocabulary size they need), built
    once per module in the runtime environment, which has sentencepiece: a SentencePiece
    model trained there (Llama's ``tokenizer.model``) and Qwen2's byte-level BPE rebuilt
    from llama.cpp's ``models/ggml-vocab-qwen2.gguf``."""
    root = tmp_path_factory.mktemp("tokenizers")
    spm = runtime.tool("spm-tokenizer", root / "spm")
    qwen2 = runtime.tool("qwen2-tokenizer", root / "qwen2",
                         runtime.llama_cpp / "models" / "ggml-vocab-qwen2.gguf")
    return {name: (root / name, json.loads(made.stdout)["vocab_size"])
            for name, made in (("spm", spm), ("qwen2", qwen2))}


def published_config(path: Path) -> None:
    """Rewrite the ``config.json`` that transformers 5 saved in the form of published
    checkpoints, which every transformers release reads: the RoPE base as ``rope_theta``
    (transformers 5 nests it in ``rope_parameters``, which 4.x ignores)."""
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    rope = config.pop("rope_parameters")
    assert rope["rope_type"] == "default", rope
    config["rope_theta"] = rope["rope_theta"]
    config_file.write_text(json.dumps(config, indent=2) + "\n")


@pytest.fixture(scope="module")
def sources(tokenizers, tmp_path_factory):
    """``sources(name)``: that `SOURCES` decoder, its weights randomized (seed 0), saved
    with ``save_pretrained`` (config in the `published_config` form) together with its
    tokenizer; built once per module."""
    built: dict[str, Path] = {}

    def source(name: str) -> Path:
        if name not in built:
            config_class, model_class, tokenizer, extra = SOURCES[name]
            files, vocab_size = tokenizers[tokenizer]
            ids = QWEN2_IDS if tokenizer == "qwen2" else SPM_IDS
            torch.manual_seed(0)
            model = model_class(config_class(**DIMS, **ids, vocab_size=vocab_size, **extra))
            path = tmp_path_factory.mktemp("source") / name
            randomize(model).save_pretrained(path)
            published_config(path)
            shutil.copytree(files, path, dirs_exist_ok=True)
            built[name] = path
        return built[name]

    return source


@pytest.fixture(scope="module")
def results(runtime_dir):
    """The rows of the results table, written to ``results.json`` in the runtime
    directory when the module ends."""
    rows: list[dict] = []
    yield rows
    (runtime_dir / "results.json").write_text(json.dumps(rows, indent=1) + "\n")


def convert(moeify_cli, source: Path, options: tuple[str, ...], out: Path) -> dict:
    result = moeify_cli("convert", source, "--experts", 4, "--noise", 0.5, "--format", "hf",
                        *options, "--out", out, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def max_diff(a: list[float], b: list[float]) -> float:
    return float((torch.tensor(a) - torch.tensor(b)).abs().max())


def agreed(tokens: list[int], reference: list[int]) -> str:
    return f"{sum(x == y for x, y in zip(tokens, reference))}/{len(reference)}"


def in_llama_cpp(case: Case, runtime: Runtime, out: Path, reference: dict, row: dict,
                 work: Path) -> None:
    """llama.cpp's converter and runtime on ``out``, against ``reference`` (`greedy` in
    this process's transformers): what `Case.expect` says happens."""
    gguf = work / "model.gguf"
    converter = runtime.run(runtime.llama_cpp / "convert_hf_to_gguf.py", out,
                            "--outtype", "f32", "--outfile", gguf)
    if case.expect == REFUSED:
        lines = converter.stderr.strip().splitlines()
        error = lines[-1] if lines else ""
        row.update(converter=f"refused: {error}", runtime="-")
        assert converter.returncode != 0, "llama.cpp's converter took layers left dense"
        assert "Can not map tensor" in error and ".mlp." in error and "experts" not in error
        return
    assert converter.returncode == 0, converter.stderr[-3000:]
    row["converter"] = "converts"

    runtime.tool("llama-cpp", gguf, work / "llama.json", "--prompt", ",".join(map(str, PROMPT)),
                 "--new", NEW_TOKENS)
    llama = json.loads((work / "llama.json").read_text())
    diff = max_diff(llama["logits"], reference["logits"])
    row.update(runtime=f"llama.cpp, {llama['metadata']['general.architecture']} graph",
               tokens_equal=agreed(llama["tokens"], reference["tokens"]),
               max_logit_diff=f"{diff:.1e}")
    assert llama["nan_logits"] == 0
    assert llama["metadata"]["general.architecture"] == case.graph
    bpe = SOURCES[case.source][2] == "qwen2"
    assert llama["metadata"]["tokenizer.ggml.model"] == ("gpt2" if bpe else "llama")
    if bpe:
        assert llama["metadata"]["tokenizer.ggml.pre"] == "qwen2"
    if case.expect == RUNS:
        assert llama["tokens"] == reference["tokens"]
        assert diff <= LOGITS_ATOL
    else:
        assert diff > DIFFERS_ABOVE, f"llama.cpp now computes {case.id} as transformers does"


def in_transformers4(runtime: Runtime, out: Path, reference: dict, row: dict,
                     work: Path) -> None:
    """The runtime environment's transformers 4.57.6 on ``out``: a load with no missing
    or unexpected keys and ``reference``'s tokens and logits."""
    runtime.tool("transformers", out, work / "tf4.json", "--prompt", ",".join(map(str, PROMPT)),
                 "--new", NEW_TOKENS)
    old = json.loads((work / "tf4.json").read_text())
    diff = max_diff(old["logits"], reference["logits"])
    row["transformers4"] = (f"{old['transformers']}: {agreed(old['tokens'], reference['tokens'])}"
                            f" tokens, logits {diff:.1e}")
    assert (old["missing"], old["unexpected"]) == ([], []), old
    differs = (f"transformers {old['transformers']} computes other outputs than "
               f"{tf.__version__} on the same directory ({row['transformers4']}; the RoPE "
               f"base it read: {old['rope_theta']}, {tf.__version__}'s: {reference['rope']})")
    assert old["tokens"] == reference["tokens"], differs
    assert diff <= LOGITS_ATOL, differs


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_runtime(case, runtime, sources, results, moeify_cli, tmp_path):
    source = sources(case.source)
    row = {"case": case.id}
    results.append(row)
    if case.options is None:
        out = source
    else:
        report = convert(moeify_cli, source, case.options, tmp_path / "out")
        out = Path(report["out"])
        notes = report["hf"]["notes"]
        row["notes"] = notes
        assert report["tokenizer"], "the source's tokenizer files were not copied"
        if case.note is None:
            assert not [n for n in notes if "for llama.cpp" in n], notes
        else:
            assert [n for n in notes if case.note in n and "llama.cpp" in n], notes

    model = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = {**greedy(model, PROMPT, NEW_TOKENS),
                 "rope": model.config.rope_parameters["rope_theta"]}
    row["transformers"] = tf.__version__
    in_llama_cpp(case, runtime, out, reference, row, tmp_path)
    in_transformers4(runtime, out, reference, row, tmp_path)
