"""``save_pretrained`` on a converted model writes a moeify checkpoint: `moeify.load`
reads it back exactly, and the dense class cannot load it by mistake."""

from __future__ import annotations

import pytest
import torch
import transformers

import moeify
from moeify import MoEConfig
from tests import models


def converted_gpt2():
    torch.manual_seed(0)
    model = models.gpt2().eval()
    moeify.convert(model, MoEConfig(num_experts=4))
    return model


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_save_pretrained_loads_back_exactly_and_never_as_the_dense_class(tmp_path):
    model = converted_gpt2()
    ids = torch.randint(2, models.VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "moeify.json").is_file()
    assert not (tmp_path / "saved" / "config.json").exists()
    loaded = moeify.load(tmp_path / "saved")
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    with pytest.raises((OSError, ValueError), match="config.json"):  # no dense model with
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    # a loaded model saves the same way; other files in the directory are kept
    (tmp_path / "saved" / "optimizer.pt").write_bytes(b"trainer state")
    loaded.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "optimizer.pt").read_bytes() == b"trainer state"
    assert torch.equal(logits(moeify.load(tmp_path / "saved"), ids), logits(model, ids))
    assert not [p for p in (tmp_path / "saved").iterdir() if p.name.startswith(".")]


def test_the_dense_class_given_a_config_reports_every_ffn_missing(tmp_path, caplog):
    """The one way to push the directory into the dense class, its own ``from_pretrained``
    with an explicit config, does not pass silently: transformers' load report lists the
    FFN weights as MISSING (newly initialized) and the Switch layers' as UNEXPECTED. This
    pins that report (README, "Safety") so a transformers release that drops it fails here."""
    torch.manual_seed(0)
    dense = models.bert().eval()
    config = dense.config
    moeify.convert(dense, MoEConfig(num_experts=4))
    dense.save_pretrained(tmp_path / "saved")
    transformers.logging.enable_propagation()
    try:
        with caplog.at_level("WARNING", logger="transformers"):
            transformers.BertModel.from_pretrained(tmp_path / "saved", config=config)
    finally:
        transformers.logging.disable_propagation()
    report = caplog.text
    assert "MISSING" in report and "UNEXPECTED" in report, report[-2000:]
    assert "intermediate.dense.weight" in report and "router.weight" in report


def test_a_dense_model_keeps_transformers_save_pretrained(tmp_path):
    dense = models.gpt2()
    dense.save_pretrained(tmp_path / "dense")
    assert (tmp_path / "dense" / "config.json").is_file()


def test_trainer_checkpoints_resume_into_the_converted_model(tmp_path):
    pytest.importorskip("accelerate")
    model = converted_gpt2().train()
    ids = torch.randint(2, models.VOCAB, (8, 10), generator=torch.Generator().manual_seed(2))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, save_steps=2, per_device_train_batch_size=4,
        learning_rate=1e-3, report_to=[], use_cpu=True,
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "moeify.json").is_file() and not (checkpoint / "config.json").exists()
    resumed = moeify.load(checkpoint)
    probe = ids[:2]
    assert torch.equal(logits(resumed, probe), logits(model, probe))
    # resuming the Trainer from its checkpoint reads the weights back into the model
    fresh = converted_gpt2().train()
    args.max_steps = 2
    transformers.Trainer(model=fresh, args=args, train_dataset=data).train(
        resume_from_checkpoint=str(checkpoint))
    assert torch.equal(logits(fresh, probe), logits(model, probe))
