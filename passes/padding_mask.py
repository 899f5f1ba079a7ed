"""`RegisterPaddingMask`: route padding as padding, from the model's attention mask."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from moeify.compiler.program import Program
from moeify.passes._base import ProgramPass
from moeify.switch import SwitchFFN


def _layers_under(module: nn.Module, prefix: str = "") -> list[tuple[str, SwitchFFN]]:
    return [(prefix + name, m) for name, m in module.named_modules() if isinstance(m, SwitchFFN)]


class _MaskHooks:
    """Pre-hook: set each layer's ``token_mask`` from the argument that describes its
    tokens (a 2-D ``[batch, length]`` mask; anything else counts as no mask). Post-hook:
    clear them, so no mask outlives the forward it came with. Layers are found by path
    at each call, so a layer replaced later (expert parallelism) is the one served."""

    def __init__(self, layers: dict[str, str]) -> None:
        self.layers = layers  # layer path -> name of the keyword argument with its mask

    def _each(self, module: nn.Module):
        for path, argument in self.layers.items():
            layer = module.get_submodule(path)
            if isinstance(layer, SwitchFFN):
                yield layer, argument

    def before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        for layer, argument in self._each(module):
            mask = kwargs.get(argument)
            layer.token_mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None

    def after(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        for layer, _ in self._each(module):
            layer.token_mask = None


class RegisterPaddingMask(ProgramPass):
    """Hand the model's attention mask to its Switch layers, so padding takes no slot.

    With a mask, a padding token chooses no expert, takes no capacity slot, gets a zero
    MoE output and is left out of the load-balancing loss, the z-loss and the routing
    statistics; each sequence's capacity comes from its real tokens. The real tokens
    then compute what they compute unpadded, whether the batch is padded on the left or
    the right.

    The mask comes from the keyword arguments of the model's forward (how transformers
    models, ``generate()`` and ``Trainer`` pass it): ``attention_mask`` for the layers of
    a decoder-only or encoder-only model, and for an encoder-decoder model
    ``attention_mask`` for the encoder's layers (also when ``generate()`` runs the encoder
    on its own) and ``decoder_attention_mask`` for the decoder's. Models that take no such
    argument route every token as real.

    Requires: `ReplaceModules` has run.
    Guarantees: the hooks are registered once; a layer's mask never outlives a forward.
    Preserves the computation: yes without padding; with padding, the real tokens' outputs
        are those of the unpadded sequences (the point of it).
    """

    def requires(self, program: Program) -> None:  # type: ignore[override]
        if not _layers_under(program.model):
            raise self.fail("the model has no Switch layers: run ReplaceModules first")

    def run(self, program: Program) -> bool:
        model = program.model
        encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder",
                                       False))
        on_root = {
            name: "decoder_attention_mask" if encoder_decoder and name.startswith("decoder.")
            else "attention_mask"
            for name, _ in _layers_under(model)
        }
        self._register(model, on_root)
        get_encoder = getattr(model, "get_encoder", None)
        if encoder_decoder and callable(get_encoder):
            encoder = get_encoder()
            if isinstance(encoder, nn.Module) and encoder is not model:
                self._register(encoder, {name: "attention_mask"
                                         for name, _ in _layers_under(encoder)})
        return True

    @staticmethod
    def _register(module: nn.Module, layers: dict[str, str]) -> None:
        if not layers:
            return
        hooks = _MaskHooks(layers)
        module.register_forward_pre_hook(hooks.before, with_kwargs=True)
        module.register_forward_hook(hooks.after, with_kwargs=True)
