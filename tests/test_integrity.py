"""Checkpoint integrity: tensor digests, the recorded source, non-finite weights, and the
one-line messages for a damaged ``moeify.json`` (issue 14, items 3, 9 and 10's neighbours)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

import moeify
from moeify.io.shards import tensor_digest
from moeify.io.sources import load_source, weights_fingerprint
from tests import models

EXPERT = "encoder.block.1.layer.1.DenseReluDense.experts.w_in"


@pytest.fixture(scope="module")
def converted(t5_dir, tmp_path_factory, moeify_cli):
    out = tmp_path_factory.mktemp("converted") / "moe"
    result = moeify_cli("convert", t5_dir, "--experts", "4", "--seq-len", "8", "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def copy_of(path: Path, tmp_path: Path, name: str = "ck") -> Path:
    return Path(shutil.copytree(path, tmp_path / name))


def checks_of(result) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(result.stdout)["checks"]}


def locate(ck: Path, name: str) -> tuple[Path, int]:
    """The shard holding ``name`` and the file offset of its first byte."""
    shard = ck / json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"][name]
    with open(shard, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    return shard, 8 + size + header[name]["data_offsets"][0]


def poke(ck: Path, name: str, element: int, change) -> Path:
    """Rewrite the 4 bytes of float32 ``element`` of tensor ``name`` in place."""
    shard, offset = locate(ck, name)
    data = bytearray(shard.read_bytes())
    at = offset + 4 * element
    data[at:at + 4] = change(bytes(data[at:at + 4]))
    shard.write_bytes(bytes(data))
    return shard


def flip_lowest_bit(raw: bytes) -> bytes:
    return bytes([raw[0] ^ 1]) + raw[1:]


def meta_of(ck: Path) -> dict:
    return json.loads((ck / "moeify.json").read_text())


# --- digests ---------------------------------------------------------------------------------


def test_every_tensor_has_the_digest_of_its_bytes(converted):
    from safetensors.torch import load_file

    meta = meta_of(converted)
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    assert set(meta["digests"]) == set(index["weight_map"])
    for shard in set(index["weight_map"].values()):
        for name, tensor in load_file(converted / shard).items():
            assert meta["digests"][name] == tensor_digest(tensor), name
    assert all(d.startswith("sha256:") and len(d) == 7 + 64 for d in meta["digests"].values())


def test_split_tensors_are_digested_whole(tmp_path):
    model = models.t5()
    moeify.convert(model, moeify.MoEConfig(num_experts=4))
    moeify.save(model, tmp_path / "ck", max_shard_bytes=6_000)  # experts span shards
    meta, index = meta_of(tmp_path / "ck"), json.loads(
        (tmp_path / "ck" / "model.safetensors.index.json").read_text())
    state = model.state_dict()
    split = index["metadata"].get("parts", {})
    assert split, "the shard limit should split the expert tensors"
    for name in split:
        assert meta["digests"][name] == tensor_digest(state[name]), name
    moeify.load(tmp_path / "ck")  # digests checked on load


def test_a_flipped_bit_in_an_expert_fails_verify_and_load_even_without_the_source(
        t5_dir, tmp_path, moeify_cli):
    source = Path(shutil.copytree(t5_dir, tmp_path / "source"))
    ck = tmp_path / "ck"
    assert moeify_cli("convert", source, "--experts", "4", "--seq-len", "8",
                      "--out", ck).returncode == 0
    shutil.rmtree(source)  # the weight checks cannot run: integrity must still catch it
    shard = poke(ck, EXPERT, 5, flip_lowest_bit)

    with pytest.raises(moeify.MoEError, match=f"tensor {EXPERT} in shard .*{shard.name} does "
                                              "not match its recorded digest"):
        moeify.load(ck)
    moeify.load(ck, check_digests=False)  # explicitly unchecked: loads

    result = moeify_cli("verify", ck, "--json")
    assert result.returncode == 1, result.stdout
    checks = checks_of(result)
    assert checks["integrity"]["status"] == "fail"
    assert EXPERT in checks["integrity"]["detail"] and shard.name in checks["integrity"]["detail"]
    assert checks["upcycled weights"]["status"] == "skip"
    assert "does not exist" in checks["upcycled weights"]["detail"]
    assert checks["dense identity"]["status"] == "skip"


def test_verify_reports_integrity_first_and_passes_an_intact_checkpoint(converted, moeify_cli):
    result = moeify_cli("verify", converted, "--json")
    assert result.returncode == 0, result.stderr
    checks = json.loads(result.stdout)["checks"]
    assert checks[0]["name"] == "integrity" and checks[0]["status"] == "pass"
    assert "match their recorded sha256 digests" in checks[0]["detail"]
    assert {c["name"]: c["status"] for c in checks}["upcycled weights"] == "pass"


def _format_1(meta: dict) -> dict:
    """``moeify.json`` as moeify wrote it before the plan was stored (format 1)."""
    plan = meta.pop("plan")
    meta.update(format_version=1, config=plan["config"], seq_len=plan["seq_len"],
                sites=plan["selected"])
    return meta


def _without_digests(meta: dict) -> dict:
    del meta["digests"]
    return meta


@pytest.mark.parametrize("written_by, problem", [
    (_format_1, "format 1, without a stored conversion plan"),
    (_without_digests, "no tensor digests recorded"),
])
def test_a_checkpoint_of_an_earlier_moeify_is_refused_with_the_fix(
        written_by, problem, converted, tmp_path, moeify_main, one_line_error):
    ck = copy_of(converted, tmp_path)
    file = ck / "moeify.json"
    file.write_text(json.dumps(written_by(meta_of(ck))))
    expected = (f"{file} was written by an earlier moeify ({problem}); this moeify reads only "
                "checkpoints of format 2 with tensor digests: convert the source again")
    with pytest.raises(moeify.MoEError) as raised:
        moeify.load(ck)
    assert str(raised.value) == expected
    assert one_line_error(moeify_main("verify", ck)) == f"error: {expected}"


def test_a_source_without_a_fingerprint_is_used_and_verify_says_it_is_unproven(
        converted, tmp_path, moeify_cli):
    ck = copy_of(converted, tmp_path)
    meta = meta_of(ck)
    meta["source"]["weights"] = None
    (ck / "moeify.json").write_text(json.dumps(meta))
    result = moeify_cli("verify", ck, "--json")
    assert result.returncode == 0, result.stderr
    checks = checks_of(result)
    assert checks["integrity"]["status"] == "pass"
    assert checks["upcycled weights"]["status"] == "pass"  # the source is still there
    assert "no source fingerprint recorded" in checks["upcycled weights"]["detail"]


# --- the recorded source ---------------------------------------------------------------------


def test_the_source_is_recorded_absolute_and_verify_runs_the_weight_checks_from_elsewhere(
        t5_dir, tmp_path, moeify_cli):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(t5_dir, work / "tiny-t5")
    elsewhere.mkdir()
    result = moeify_cli("convert", "tiny-t5", "--experts", "4", "--seq-len", "8", "--out",
                        tmp_path / "ck", cwd=work)
    assert result.returncode == 0, result.stderr
    source = meta_of(tmp_path / "ck")["source"]
    assert source["ref"] == str((work / "tiny-t5").resolve())
    assert source["dtype"] == "float32" and source["random_init"] is False
    dense, _ = load_source(str(work / "tiny-t5"), dtype=torch.float32)
    assert source["weights"] == weights_fingerprint(dense)

    result = moeify_cli("verify", tmp_path / "ck", "--json", cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    checks = checks_of(result)
    assert checks["upcycled weights"]["status"] == "pass", checks["upcycled weights"]
    assert "source fingerprint matches" in checks["upcycled weights"]["detail"]
    assert checks["dense identity"]["status"] == "pass"


def test_a_source_changed_since_conversion_is_reported_not_compared(t5_dir, tmp_path, moeify_cli):
    source = Path(shutil.copytree(t5_dir, tmp_path / "source"))
    ck = tmp_path / "ck"
    assert moeify_cli("convert", source, "--experts", "4", "--seq-len", "8",
                      "--out", ck).returncode == 0
    torch.manual_seed(7)
    models.t5().save_pretrained(source)  # same architecture, other weights
    result = moeify_cli("verify", ck, "--json")
    assert result.returncode == 0, result.stderr
    checks = checks_of(result)
    for name in ("upcycled weights", "dense identity"):
        assert checks[name]["status"] == "skip"
        assert "changed since conversion" in checks[name]["detail"], checks[name]
    assert checks["integrity"]["status"] == "pass"


def test_random_init_sources_are_rebuilt_with_the_conversion_seed(t5_dir, tmp_path, moeify_cli):
    ck = tmp_path / "ck"
    result = moeify_cli("convert", t5_dir, "--random-init", "--seed", "3", "--experts", "4",
                        "--seq-len", "8", "--out", ck)
    assert result.returncode == 0, result.stderr
    assert meta_of(ck)["source"]["random_init"] is True
    result = moeify_cli("verify", ck, "--json")
    assert result.returncode == 0, result.stderr
    checks = checks_of(result)
    assert checks["upcycled weights"]["status"] == "pass", checks["upcycled weights"]
    assert "seed" in checks["upcycled weights"]["detail"]


# --- non-finite weights ----------------------------------------------------------------------


@pytest.mark.parametrize("value, what", [(float("nan"), "1 NaN"), (float("-inf"), "1 inf")])
def test_convert_refuses_non_finite_source_weights_naming_the_tensor(
        value, what, tmp_path, moeify_cli, one_line_error):
    model = models.t5()
    with torch.no_grad():
        model.decoder.block[2].layer[2].DenseReluDense.wi.weight[3, 1] = value
    model.save_pretrained(tmp_path / "src")
    one_line_error(moeify_cli("convert", tmp_path / "src", "--experts", "4",
                              "--out", tmp_path / "o"),
                   "decoder.block.2.layer.2.DenseReluDense.wi.weight", what, "non-finite")
    assert not (tmp_path / "o").exists()


def test_a_nan_written_into_a_shard_is_named_by_load_and_verify(converted, tmp_path, moeify_cli):
    ck = copy_of(converted, tmp_path)
    shard = poke(ck, EXPERT, 2, lambda raw: struct.pack("<f", float("nan")))
    pattern = f"tensor {EXPERT} in shard .*{shard.name} holds non-finite values \\(1 NaN\\)"
    with pytest.raises(moeify.MoEError, match=pattern + ".*does not match its recorded digest"):
        moeify.load(ck)
    with pytest.raises(moeify.MoEError, match=pattern):
        moeify.load(ck, check_digests=False)
    result = moeify_cli("verify", ck, "--json")
    assert result.returncode == 1
    checks = checks_of(result)
    assert checks["reload"]["status"] == "fail"
    assert EXPERT in checks["reload"]["detail"] and "NaN" in checks["reload"]["detail"]
    assert "outputs differ" not in checks["reload"]["detail"]
    assert checks["integrity"]["status"] == "fail"


def test_a_nan_saved_with_the_model_is_refused_on_load(tmp_path):
    model = models.t5()
    moeify.convert(model, moeify.MoEConfig(num_experts=4))
    with torch.no_grad():
        model.get_submodule("encoder.block.1.layer.1.DenseReluDense").experts.w_out[1, 0, 0] = float("inf")
    moeify.save(model, tmp_path / "ck")
    name = "encoder.block.1.layer.1.DenseReluDense.experts.w_out"
    with pytest.raises(moeify.MoEError, match=f"tensor {name} .*1 inf.*saved that way"):
        moeify.load(tmp_path / "ck")


# --- factory checkpoints ---------------------------------------------------------------------


@pytest.mark.parametrize("factory", ["residual_ffns", "residual_ffns_with_buffer"])
def test_factory_checkpoints_load_without_the_model(factory, tmp_path, moeify_cli):
    ck = tmp_path / "ck"
    result = moeify_cli("convert", f"tests.factories:{factory}", "--experts", "4", "--seq-len", "8",
                        "--out", ck)
    assert result.returncode == 0, result.stderr
    source = meta_of(ck)["source"]
    assert source["kind"] == "factory" and source["ref"] == f"tests.factories:{factory}"
    loaded = moeify.load(ck)
    from tests import factories

    torch.manual_seed(0)  # what moeify convert seeds before calling the factory
    expected = getattr(factories, factory)()
    moeify.convert(expected, moeify.MoEConfig(num_experts=4), seq_len=8,
                   example_inputs=torch.randn(2, 8, 16))
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected.eval()(x))


# --- one-line messages -----------------------------------------------------------------------


def _set(path, value):
    def change(meta):
        target = meta
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return meta
    return change


def _drop(*path):
    def change(meta):
        target = meta
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return meta
    return change


@pytest.mark.parametrize("damage, fragment", [
    ("{not json", "is not valid JSON"),
    (b"\xff\xfe\x00garbage", "is not valid JSON"),
    ("[1, 2]", "not a moeify checkpoint description (a JSON list"),
    (_drop("plan"), "lacks 'plan'"),
    (_drop("plan", "config"), "missing 'config'"),
    (_set(("format_version",), "2"), "format_version must be a positive integer, got '2'"),
    (_set(("format_version",), 99), "is format 99"),
    (_set(("format",), "other"), "\"format\" is 'other', not \"moeify\""),
    (_set(("plan",), [1]), "moeify.json"),
    (_set(("source",), "x"), "moeify.json"),
    (_set(("digests",), {"a": "md5:1"}), "\"digests\" must map tensor names"),
    (_set(("source", "model_class"), "NoSuchModelClass"),
     "model class 'NoSuchModelClass' is not a transformers class"),
    (_set(("source", "hf_config", "model_type"), "no-such-type"),
     "cannot rebuild the source's transformers config"),
])
def test_a_damaged_moeify_json_is_one_line_naming_the_file(damage, fragment, converted,
                                                          tmp_path, moeify_main, one_line_error):
    ck = copy_of(converted, tmp_path)
    file = ck / "moeify.json"
    if isinstance(damage, bytes):
        file.write_bytes(damage)
    elif isinstance(damage, str):
        file.write_text(damage)
    else:
        file.write_text(json.dumps(damage(meta_of(ck))))
    with pytest.raises(moeify.MoEError) as raised:
        moeify.load(ck)
    assert str(file) in str(raised.value) and fragment in str(raised.value), raised.value
    if "class" in fragment or "config" in fragment and "rebuild" in fragment:
        # the description reads, the model does not rebuild: verify still checks the
        # shards' integrity and fails its reload check with the reason
        result = moeify_main("verify", ck, "--json")
        assert result.returncode == 1, result.stderr
        checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
        assert checks["integrity"]["status"] == "pass"
        assert checks["reload"]["status"] == "fail"
        assert str(file) in checks["reload"]["detail"] and fragment in checks["reload"]["detail"]
    else:
        one_line_error(moeify_main("verify", ck), str(file), fragment)
    one_line_error(moeify_main("export", ck, "--onnx", tmp_path / "m.onnx", "--seq-len", "8"),
                   str(file), fragment)


def test_a_damaged_index_is_one_line_naming_the_file(
        converted, tmp_path, moeify_main, one_line_error):
    ck = copy_of(converted, tmp_path)
    index = ck / "model.safetensors.index.json"
    index.write_text("{")
    with pytest.raises(moeify.MoEError, match="index.json is not valid JSON"):
        moeify.load(ck)
    index.write_text("{}")
    one_line_error(moeify_main("verify", ck), str(index), "no \"weight_map\"")


@pytest.mark.parametrize("model", ["./no/such/dir", "/no/such/model-dir", "~/no-such-model-xyz",
                                   "a/b/c", "models/"])
def test_a_missing_local_path_is_not_taken_for_a_hub_id(
        model, tmp_path, monkeypatch, moeify_main, one_line_error):
    monkeypatch.chdir(tmp_path)
    one_line_error(moeify_main("inspect", model), "no such directory")
    one_line_error(moeify_main("convert", model, "--out", tmp_path / "o"), "no such directory")
