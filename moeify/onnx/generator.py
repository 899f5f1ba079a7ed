"""`OnnxGenerator`: text generation from `export_generation`'s graphs, ONNX Runtime only.

Imports numpy and onnxruntime, never torch: a deployment needs neither torch nor
transformers. ``generate()`` follows Hugging Face ``generate()``: prompts padded on the
left (decoder-only) or the right (T5) with an attention mask, position ids as the
running count of real tokens, greedy decoding or sampling (temperature, then top-k,
then softmax), finished sequences continued with the pad token, and the result as the
prompt followed by the new tokens (T5: the decoder start token followed by them).
Greedy tokens are those of ``generate()`` on the converted PyTorch model; sampled tokens
are reproducible for a given ``seed`` (numpy's generator, not torch's: not the same
draws as ``generate(do_sample=True)``).

`run` is the checked single-graph call ``generate()`` itself uses: an input the graph
was not built for (a prompt of another length, past keys/values whose length does not
match the attention mask) is a `MoEError` of one line rather than an ONNX Runtime
broadcast error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from moeify.errors import MoEError, Param

MANIFEST = "generation.json"
FORMAT = "moeify-generation/1"


class OnnxGenerator:
    """Generates with the graphs in ``path`` (a directory `export_generation` wrote)."""

    def __init__(self, path: str | os.PathLike, *, providers: Sequence[str] | None = None,
                 threads: int | None = None, spinning: bool = True) -> None:
        """``threads``: ONNX Runtime's intra-op threads (default: its own choice);
        ``spinning=False`` lets them sleep between runs instead of spinning (for
        processes that share their cores with other work)."""
        import onnxruntime as ort

        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise MoEError("{path} holds no {manifest}: pass a directory written by {export}",
                           path=self.path, manifest=MANIFEST, export=Param(
                               "export_generation", "`moeify export --task "
                               "text-generation|text2text-generation`", owner="moeify.onnx"))
        self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise MoEError(f"{manifest} is format {self.manifest.get('format')!r}; this moeify "
                           f"reads {FORMAT}: export the model again")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {
            name: ort.InferenceSession(str(self.path / graph["file"]), options,
                                       providers=list(providers or ["CPUExecutionProvider"]))
            for name, graph in self.manifest["graphs"].items()
        }
        self.task: str = self.manifest["task"]
        self.seq_len: int = self.manifest["seq_len"]

    # -- one graph -----------------------------------------------------------------

    def run(self, graph: str, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        """Run one graph of the directory (``prefill`` / ``decode``, or ``encoder`` /
        ``decoder_init`` / ``decoder``) on named inputs; returns its outputs by name."""
        if graph not in self.sessions:
            raise MoEError(f"no graph {graph!r} here: this directory has "
                           f"{', '.join(self.sessions)}")
        spec = self.manifest["graphs"][graph]
        missing = [name for name in spec["inputs"] if name not in feeds]
        if missing:
            raise MoEError(f"graph {graph} needs inputs {spec['inputs']}; missing {missing}")
        feeds = {name: np.ascontiguousarray(feeds[name]) for name in spec["inputs"]}
        self._check(graph, feeds)
        session = self.sessions[graph]
        wanted = {i.name for i in session.get_inputs()}  # the exporter drops unused inputs
        values = session.run(spec["outputs"], {k: v for k, v in feeds.items() if k in wanted})
        return dict(zip(spec["outputs"], values))

    def _check(self, graph: str, feeds: dict[str, np.ndarray]) -> None:
        batches = {name: value.shape[0] for name, value in feeds.items() if value.ndim}
        if len(set(batches.values())) > 1:
            raise MoEError(f"graph {graph}: inputs disagree on the batch size ({batches})")
        if graph in ("prefill", "encoder"):
            ids = feeds["input_ids"]
            if ids.ndim != 2 or ids.shape[1] != self.seq_len:
                raise MoEError(
                    f"graph {graph} takes [batch, {self.seq_len}] input_ids (its expert "
                    f"capacity is fixed for {self.seq_len} tokens), got {list(ids.shape)}: "
                    "pad to that length, or use generate(), which pads")
            return
        past = {name: value for name, value in feeds.items() if name.startswith("past.")}
        if not past:
            return
        lengths = {value.shape[2] if value.ndim == 4 else None for value in past.values()}
        if len(lengths) != 1 or None in lengths:
            raise MoEError(f"graph {graph}: past keys/values must all be [batch, heads, past, "
                           f"head_dim] of one past length, got lengths {sorted(map(str, lengths))}")
        (length,) = lengths
        mask = feeds.get("attention_mask")
        if mask is not None and mask.shape[-1] != length + 1:
            raise MoEError(
                f"graph {graph} was fed past keys/values of length {length} with an "
                f"attention_mask of length {mask.shape[-1]}: the mask covers the past and "
                f"this step's token ({length + 1} columns); pass the present.* outputs of the "
                "previous step as past.*")

    # -- generation ----------------------------------------------------------------

    def generate(
        self,
        input_ids: np.ndarray | Sequence[Sequence[int]],
        attention_mask: np.ndarray | None = None,
        *,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = 50,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
    ) -> np.ndarray:
        """New tokens for a batch of prompts, as Hugging Face ``generate()`` returns them.

        ``input_ids``: ``[batch, n]`` with ``attention_mask`` (padded on the left for a
        decoder-only model, on the right for T5; no mask: every token is real), or a
        list of token lists of any lengths up to the declared ``seq_len`` (padded here).
        ``eos_token_id`` / ``pad_token_id`` default to the model's (an eos-less run
        generates ``max_new_tokens``); ``top_k=None`` or 0 samples from every token.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise MoEError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if do_sample and not temperature > 0:
            raise MoEError(f"temperature must be > 0 when sampling, got {temperature!r}")
        left = self.task == "text-generation"
        eos = self._eos(eos_token_id)
        pad = self._pad(pad_token_id, eos_token_id)
        ids, mask = _batch(input_ids, attention_mask, left=left, pad=pad)
        n = ids.shape[1]
        if n > self.seq_len:
            raise MoEError("the prompts are {n} tokens long, longer than the {declared} this "
                           "export was declared for: shorten them, or export again with "
                           "{seq_len}", n=n, declared=self.seq_len,
                           seq_len=Param("seq_len").given(n))
        limit = self.manifest.get("max_positions")
        if left and limit is not None and int(mask.sum(1).max()) + max_new_tokens > limit:
            raise MoEError(f"{int(mask.sum(1).max())} prompt tokens + {max_new_tokens} new "
                           f"exceed the model's {limit} positions: ask for fewer new tokens")
        rng = np.random.default_rng(seed)
        choose = lambda logits: _choose(logits, do_sample, temperature, top_k, rng)  # noqa: E731
        full = _padded(ids, mask, self.seq_len, pad, left)  # the graphs' static length
        if left:
            new = self._causal(*full, max_new_tokens, choose, eos, pad)
            return np.concatenate([ids, new], axis=1)
        start = np.full((ids.shape[0], 1), self.manifest["decoder_start_token_id"], np.int64)
        new = self._seq2seq(*full, start, max_new_tokens, choose, eos, pad)
        return np.concatenate([start, new], axis=1)

    def _eos(self, eos_token_id) -> np.ndarray:
        eos = self.manifest.get("eos_token_id") if eos_token_id is None else eos_token_id
        if eos is None:
            return np.zeros(0, np.int64)
        return np.atleast_1d(np.asarray(eos, np.int64))

    def _pad(self, pad_token_id, eos_token_id) -> int:
        if pad_token_id is not None:
            return int(pad_token_id)
        pad = self.manifest.get("pad_token_id")
        if pad is None:  # as generate(): the first eos token pads
            eos = self._eos(eos_token_id)
            pad = int(eos[0]) if eos.size else 0
        return int(pad)

    def _causal(self, full_ids, full_mask, steps, choose, eos, pad) -> np.ndarray:
        positions = np.where(full_mask == 0, 0, np.cumsum(full_mask, axis=1) - 1)
        out = self.run("prefill", input_ids=full_ids, attention_mask=full_mask,
                       position_ids=positions)
        state = {"mask": full_mask, "position": positions[:, -1:]}

        def step(token: np.ndarray, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            ones = np.ones((token.shape[0], 1), np.int64)
            state["mask"] = np.concatenate([state["mask"], ones], axis=1)
            state["position"] = state["position"] + 1
            return self.run("decode", input_ids=token[:, None], attention_mask=state["mask"],
                            position_ids=state["position"], **_past(out))

        return _loop(out, step, steps, choose, eos, pad)

    def _seq2seq(self, full_ids, full_mask, start, steps, choose, eos, pad) -> np.ndarray:
        states = self.run("encoder", input_ids=full_ids,
                          attention_mask=full_mask)["encoder_hidden_states"]
        common = {"encoder_hidden_states": states, "encoder_attention_mask": full_mask}
        out = self.run("decoder_init", decoder_input_ids=start, **common)
        cross = {name: value for name, value in out.items() if name.startswith("cross.")}

        def step(token: np.ndarray, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return self.run("decoder", decoder_input_ids=token[:, None], **common,
                            **_past(out), **cross)

        return _loop(out, step, steps, choose, eos, pad)


def _batch(input_ids, attention_mask, *, left: bool, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)`` as int64 ``[batch, n]``, the mask checked for the padding side."""
    side = "left" if left else "right"
    if not isinstance(input_ids, (list, tuple)):  # an array (numpy, or a tensor's .numpy())
        ids = _array(input_ids)
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise MoEError(f"input_ids must be [batch, length] token ids, got shape {list(ids.shape)}")
        if attention_mask is None:
            mask = np.ones(ids.shape, np.int64)
        else:
            mask = _array(attention_mask).astype(np.int64)
            if mask.shape != ids.shape:
                raise MoEError(f"attention_mask {list(mask.shape)} does not match input_ids "
                               f"{list(ids.shape)}")
    else:
        rows = [list(map(int, row)) for row in input_ids]
        if not rows or any(len(row) == 0 for row in rows):
            raise MoEError("input_ids must hold at least one prompt, each of at least one token")
        if attention_mask is not None:
            raise MoEError("pass attention_mask with an input_ids array, not with lists "
                           "(lists are padded here)")
        n = max(map(len, rows))
        ids = np.full((len(rows), n), pad, np.int64)
        mask = np.zeros((len(rows), n), np.int64)
        for i, row in enumerate(rows):
            where = slice(n - len(row), n) if left else slice(0, len(row))
            ids[i, where], mask[i, where] = row, 1
    ids = ids.astype(np.int64)
    if not np.isin(mask, (0, 1)).all():
        raise MoEError("attention_mask must hold 0 (padding) and 1 (real token) only")
    if (mask.sum(1) == 0).any():
        raise MoEError(f"prompt {int(np.argmin(mask.sum(1)))} has no real token (its "
                       "attention_mask is all 0)")
    ordered = np.diff(mask, axis=1)
    if (ordered < 0).any() if left else (ordered > 0).any():
        raise MoEError(f"{'decoder-only' if left else 'T5'} prompts are padded on the {side} "
                       f"(as Hugging Face does): each attention_mask row must be "
                       f"{'0...0 1...1' if left else '1...1 0...0'}")
    return ids, mask


def _array(value) -> np.ndarray:
    """``value`` as a numpy array (a torch tensor through its ``.numpy()``: no torch import)."""
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value)


def _padded(ids: np.ndarray, mask: np.ndarray, width: int, pad: int,
            left: bool) -> tuple[np.ndarray, np.ndarray]:
    """``ids`` and ``mask`` widened to ``width`` columns by padding on one side."""
    extra = width - ids.shape[1]
    side = ((0, 0), (extra, 0) if left else (0, extra))
    return np.pad(ids, side, constant_values=pad), np.pad(mask, side)


def _choose(logits: np.ndarray, sample: bool, temperature: float, top_k: int | None,
            rng: np.random.Generator) -> np.ndarray:
    if not sample:
        return np.argmax(logits, axis=-1)
    scores = logits.astype(np.float64) / temperature
    if top_k:
        k = min(int(top_k), scores.shape[-1])
        kth = np.partition(scores, -k, axis=-1)[:, -k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    cumulative = probs.cumsum(axis=-1)
    draws = rng.random(scores.shape[0])[:, None]
    return np.minimum((cumulative < draws).sum(axis=-1), scores.shape[-1] - 1)


def _past(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A step's ``present.*`` outputs as the next step's ``past.*`` inputs."""
    return {name.replace("present.", "past.", 1): value for name, value in out.items()
            if name.startswith("present.")}


def _loop(out, step, steps: int, choose, eos: np.ndarray, pad: int) -> np.ndarray:
    """Choose a token from ``out["logits"]``, run ``step(token, out)`` for the next
    logits, until ``steps`` tokens or every sequence has met an eos token (finished
    sequences get ``pad``, as in ``generate()``); the new tokens ``[batch, n]``."""
    new: list[np.ndarray] = []
    alive = np.ones(out["logits"].shape[0], bool)
    while True:
        token = np.where(alive, choose(out["logits"]), pad).astype(np.int64)
        alive = alive & ~np.isin(token, eos)
        new.append(token)
        if len(new) == steps or not alive.any():
            return np.stack(new, axis=1)
        out = step(token, out)
