"""Expert-parallel sharding annotations in ONNX's multi-device protos, and their validator.

`annotate_expert_sharding` adds a ``DeviceConfigurationProto`` to the model and, on every
node that consumes an expert weight, a ``NodeDeviceConfigurationProto`` whose
``ShardingSpecProto`` splits that input along the axis the conversion plan's
`ShardingPlan` gives (dim 0 = experts) over the devices: the plan
`moeify.passes.AnnotateSharding` records, written into the graph. ONNX's checker does not look at these protos and ONNX Runtime ignores them, so
`sharding_problems` checks them: configuration ids exist, tensor names are inputs of
their node, axes are in range, shard counts divide the dimension, devices exist.
"""

from __future__ import annotations

import onnx

from moeify.compiler.plan import ShardingPlan
from moeify.errors import MoEError, Param

CONFIGURATION = "moeify-expert-parallel"


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    shapes: dict[str, list[int | str]] = {t.name: list(t.dims) for t in model.graph.initializer}
    for info in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        dims = info.type.tensor_type.shape.dim
        shapes.setdefault(info.name, [d.dim_value if d.HasField("dim_value") else d.dim_param
                                      for d in dims])
    return shapes


def annotate_expert_sharding(model: onnx.ModelProto, num_devices: int,
                             plan: ShardingPlan, *, prefix: str = "model.") -> int:
    """Annotate the parameters ``plan`` shards as split over ``num_devices``; returns the
    number of nodes annotated. Graph initializers are the plan's parameter names behind
    ``prefix`` (the export wrapper's attribute)."""
    if num_devices < 1:
        raise MoEError("{shard_experts} must be >= 1, got {n}",
                       shard_experts=Param("shard_experts"), n=num_devices)
    shapes = _shapes(model)
    axes = {f"{prefix}{p.name}": p.dim for p in plan.sharded()}
    experts = {name for name in shapes if name in axes}
    if not experts:
        raise MoEError("the graph has none of the expert weights the plan shards (is the "
                       "model converted?)")
    for name in sorted(experts):
        E = shapes[name][axes[name]]
        if E % num_devices:
            raise MoEError(f"{name} has {E} experts, which do not divide over {num_devices} "
                           "devices: pick a device count that divides num_experts")
    config = model.configuration.add()
    config.name, config.num_devices = CONFIGURATION, num_devices
    config.device.extend(f"device:{i}" for i in range(num_devices))
    annotated = 0
    for node in model.graph.node:
        inputs = [name for name in node.input if name in experts]
        if not inputs:
            continue
        node_config = node.device_configurations.add()
        node_config.configuration_id = CONFIGURATION
        for name in inputs:
            spec = node_config.sharding_spec.add()
            spec.tensor_name = name
            spec.device.extend(range(num_devices))
            dim = spec.sharded_dim.add()
            dim.axis = axes[name]
            simple = dim.simple_sharding.add()
            simple.dim_value = shapes[name][axes[name]]
            simple.num_shards = num_devices
        annotated += 1
    return annotated


def sharding_problems(model: onnx.ModelProto) -> list[str]:
    """Everything wrong with the model's sharding annotations (empty when valid)."""
    problems = []
    configs = {c.name: c for c in model.configuration}
    for c in model.configuration:
        if c.num_devices < 1 or len(c.device) != c.num_devices:
            problems.append(f"configuration {c.name!r}: num_devices {c.num_devices} but "
                            f"{len(c.device)} devices listed")
    shapes = _shapes(model)
    for node in model.graph.node:
        label = node.name or node.op_type
        for node_config in node.device_configurations:
            config = configs.get(node_config.configuration_id)
            if config is None:
                problems.append(f"node {label}: configuration {node_config.configuration_id!r} "
                                "does not exist")
                continue
            for spec in node_config.sharding_spec:
                if spec.tensor_name not in node.input and spec.tensor_name not in node.output:
                    problems.append(f"node {label}: {spec.tensor_name!r} is not one of its tensors")
                    continue
                bad = [d for d in spec.device if not 0 <= d < config.num_devices]
                if bad:
                    problems.append(f"node {label}: devices {bad} not in configuration "
                                    f"{config.name!r} ({config.num_devices} devices)")
                shape = shapes.get(spec.tensor_name)
                for dim in spec.sharded_dim:
                    if shape is None:
                        problems.append(f"node {label}: shape of {spec.tensor_name!r} unknown")
                        break
                    if not -len(shape) <= dim.axis < len(shape):
                        problems.append(f"node {label}: axis {dim.axis} out of range for "
                                        f"{spec.tensor_name!r} of rank {len(shape)}")
                        continue
                    size = shape[dim.axis]
                    for simple in dim.simple_sharding:
                        shards = simple.num_shards
                        if shards < 1 or (isinstance(size, int) and size % shards):
                            problems.append(f"node {label}: {shards} shards do not divide "
                                            f"axis {dim.axis} ({size}) of {spec.tensor_name!r}")
                        elif shards > len(spec.device):
                            problems.append(f"node {label}: {shards} shards over "
                                            f"{len(spec.device)} devices")
    return problems


def check_sharding(model: onnx.ModelProto) -> None:
    problems = sharding_problems(model)
    if problems:
        raise MoEError("invalid sharding annotations: " + "; ".join(problems[:5])
                       + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
