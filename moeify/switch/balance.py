"""Auxiliary-loss-free load balancing: the update of the routers' selection bias.

Wang et al. 2024 ("Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts",
arXiv 2408.15664), as DeepSeek-V3 trains with it: each router of a layer with
``MoEConfig.bias_balancing`` adds a per-expert bias to its scores to select the experts
(never to the combine weights), and after every optimizer step the bias moves by a fixed
rate towards balance::

    bias_i += rate * sign(mean_j load_j - load_i)

``load_i`` counting the choices of expert i that the router made since the previous
update (every top-k choice of a real token in the training forwards, before capacity
drops: `moeify.switch.router.TokenChoiceRouter`). An overloaded expert's bias falls, an
underused one's rises, an expert exactly at the mean keeps its bias; no gradient is
involved, so the task loss sees no interfering balance term (TorchTitan's
``load_balance_coeff`` and Megatron-Core's ``--moe-router-enable-expert-bias`` do the
same).

`balance_experts` attaches the update to an optimizer; the loads are summed over a
process group first, so under data and expert parallelism every rank's routers (which
are replicated) take the same step from the global loads.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moeify.config import config_param
from moeify.errors import MoEError
from moeify.switch.layer import switch_layers
from moeify.switch.router import TokenChoiceRouter

__all__ = ["BiasBalancing", "balance_experts", "bias_update"]

# router -> weak reference to the update it is attached to (the update lives as long as
# its optimizer's hook; a copy of a model is attached to nothing)
_attached: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _attached_to(router: TokenChoiceRouter) -> BiasBalancing | None:
    ref = _attached.get(router)
    return None if ref is None else ref()


def bias_update(load: Tensor, rate: float) -> Tensor:
    """The step of the selection bias for the loads ``load`` [E]:
    ``rate * sign(mean(load) - load)`` (0 for an expert exactly at the mean)."""
    return rate * torch.sign(load.mean() - load)


class BiasBalancing:
    """The bias update of a model's bias-balancing routers, attached to an optimizer by
    `balance_experts` (its return value).

    ``routers``: (layer name, router) of every Switch layer with bias balancing. While
    attached, every router counts its loads (``expert_load``), and each step of the
    optimizer runs `update`. ``remove()`` detaches it: the hook goes and the routers stop
    counting (their biases stay as trained).
    """

    def __init__(self, routers: list[tuple[str, TokenChoiceRouter]], optimizer, group) -> None:
        self.routers, self.group = routers, group
        for _, router in routers:
            bias = router.expert_bias
            router.expert_load = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
            _attached[router] = weakref.ref(self)
        self._hook = optimizer.register_step_post_hook(lambda *_: self.update())

    @torch.no_grad()
    def update(self) -> None:
        """Move every router's bias by `bias_update` of its loads since the last update
        (summed over ``group`` first: one all-reduce for all layers), then clear the loads.
        A router that counted nothing keeps its bias."""
        loads = torch.cat([router.expert_load for _, router in self.routers])
        if self.group is not None:
            dist.all_reduce(loads, group=self.group)
        offset = 0
        for _, router in self.routers:
            E = router.num_experts
            load = loads[offset:offset + E].to(router.expert_load.device)
            router.expert_bias += bias_update(load, router.bias_update_rate)
            router.expert_load.zero_()
            offset += E

    def remove(self) -> None:
        """Detach the update from the optimizer; the routers stop counting loads."""
        self._hook.remove()
        for _, router in self.routers:
            if _attached_to(router) is self:
                del _attached[router]
                router.expert_load = None


def balance_experts(model: nn.Module, optimizer: torch.optim.Optimizer, *,
                    group=None) -> BiasBalancing:
    """Auxiliary-loss-free load balancing for ``model``'s Switch layers: after each
    ``optimizer.step()``, every router's selection bias moves towards balance (see the
    module docs). The one call a training loop needs, once, after building the
    optimizer::

        optimizer = torch.optim.AdamW(model.parameters())
        moeify.balance_experts(model, optimizer)

    Applies to the layers converted with ``MoEConfig.bias_balancing`` (``--bias-balancing``)
    at their ``bias_update_rate``; a model with none is refused. ``group``: the process
    group over which the loads are summed before each update; by default the default
    group when `torch.distributed` is initialized (so loads are global under data and
    expert parallelism, where the routers are replicated and every rank takes the same
    step), else none. Returns a `BiasBalancing` whose ``remove()`` detaches it.

    The loads are counted in training forwards only, from this call on; evaluation
    forwards (``model.eval()``) still select with the bias, as DeepSeek-V3 does.
    """
    layers = switch_layers(model)
    if not layers:
        raise MoEError("the model has no Switch layers: convert it with moeify.convert first")
    routers = [(name, layer.router) for name, layer in layers
               if isinstance(layer.router, TokenChoiceRouter) and layer.router.bias_balancing]
    if not routers:
        raise MoEError("{bias_balancing} is off in every Switch layer of the model, so there is "
                       "no selection bias to balance: convert it with {on}",
                       bias_balancing=config_param("bias_balancing"),
                       on=config_param("bias_balancing").given(True))
    attached = [name for name, router in routers if _attached_to(router) is not None]
    if attached:
        raise MoEError(f"{attached[0]} is already balanced by an earlier balance_experts: "
                       "call .remove() on its result first")
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    return BiasBalancing(routers, optimizer, group)
