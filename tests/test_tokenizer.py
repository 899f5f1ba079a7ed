"""The source's tokenizer travels into every output directory (moeify.io.tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import moeify
from moeify.io.sources import Source, load_source
from moeify.io.tokenizer import find_tokenizer
from tests import models
from tests.tokenizer_files import save_tokenizer


@pytest.fixture(scope="module")
def llama_with_tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "llama"
    torch.manual_seed(0)
    models.llama(layers=2).save_pretrained(path)
    save_tokenizer(path)
    return path


def _same_files(source: Path, out: Path, names) -> None:
    assert names and set(names) <= {p.name for p in out.iterdir()}
    for name in names:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name


@pytest.mark.parametrize("format_args", [["--format", "hf"], ["--format", "torch"]])
def test_convert_copies_the_tokenizer_and_reports_it(format_args, llama_with_tokenizer,
                                                     tmp_path, moeify_cli):
    out = tmp_path / "out"
    result = moeify_cli("convert", llama_with_tokenizer, "--experts", "4", *format_args,
                        "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    names = json.loads(result.stdout)["tokenizer"]
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(names)
    _same_files(llama_with_tokenizer, out, names)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("w1 w2 w3")["input_ids"] == [4, 5, 6]
    assert tokenizer.apply_chat_template([{"role": "user", "content": "w5"}],
                                         tokenize=False) == "w5 "
    if format_args[-1] == "hf":  # a pipeline runs on the directory as written
        generate = transformers.pipeline("text-generation", model=str(out))
        text = generate("w1 w2", max_new_tokens=4, do_sample=False)[0]["generated_text"]
        assert text.startswith("w1 w2")


def test_a_source_without_tokenizer_is_stated(tmp_path, moeify_cli):
    torch.manual_seed(0)
    models.llama(layers=2).save_pretrained(tmp_path / "src")
    result = moeify_cli("convert", tmp_path / "src", "--experts", "4", "--format", "hf",
                        "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "tokenizer: none in" in " ".join(result.stderr.split())  # (stdout: --json)
    assert not find_tokenizer(tmp_path / "out")


def test_python_write_takes_the_tokenizer_from_the_source_or_a_directory(
        llama_with_tokenizer, tmp_path):
    config = moeify.MoEConfig(num_experts=4, top_k=2, every=1, dropless=True)
    dense, source = load_source(str(llama_with_tokenizer))
    written = moeify.write(dense, tmp_path / "a", plan=moeify.plan(dense, config),
                           format="hf", source=source)
    _same_files(llama_with_tokenizer, tmp_path / "a", written.tokenizer)
    # a converted model from a checkpoint: the tokenizer named by its directory
    moe = moeify.convert(load_source(str(llama_with_tokenizer))[0], config).model
    moeify.save(moe, tmp_path / "ckpt", tokenizer=find_tokenizer(llama_with_tokenizer))
    loaded = moeify.load(tmp_path / "ckpt")
    written = moeify.write(loaded, tmp_path / "b", format="hf", tokenizer=tmp_path / "ckpt")
    _same_files(llama_with_tokenizer, tmp_path / "b", written.tokenizer)
    assert moeify.write(loaded, tmp_path / "c", format="hf").tokenizer == ()


def test_hub_ids_are_looked_up_in_the_local_cache(tmp_path, monkeypatch, llama_with_tokenizer):
    """A hub id's tokenizer comes from the Hugging Face cache layout (no network)."""
    import huggingface_hub.constants as constants

    repo = tmp_path / "hub" / "models--org--tiny"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (snapshot / name).write_bytes((llama_with_tokenizer / name).read_bytes())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    found = find_tokenizer("org/tiny")
    assert found is not None and found.names == ("tokenizer.json", "tokenizer_config.json")
    assert find_tokenizer("org/absent") is None
    assert find_tokenizer(Source("preset", "gpt2")) is None  # presets and factories have none


def test_switch_transformers_output_carries_the_tokenizer(tmp_path):
    torch.manual_seed(0)
    models.t5(layers=2).save_pretrained(tmp_path / "t5")
    save_tokenizer(tmp_path / "t5")
    dense, source = load_source(str(tmp_path / "t5"))
    plan = moeify.plan(dense, moeify.MoEConfig(num_experts=4), seq_len=8)
    written = moeify.write(dense, tmp_path / "out", plan=plan, format="hf", source=source)
    assert written.hf_arch == "switch_transformers"
    _same_files(tmp_path / "t5", tmp_path / "out", written.tokenizer)
