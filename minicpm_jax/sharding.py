"""Device mesh and the one table that maps logical axis names to mesh axes.

Parameters and activations are annotated with a handful of logical names (`batch`, `seq`, `embed`, `heads`,
`kv_heads`, `head_dim`, `mlp`, `vocab`, `layers`); `LOGICAL_RULES` maps them onto the mesh axes `data`, `fsdp`,
`tensor`. A mesh axis that does not divide a dimension is dropped for that dimension (e.g. 2 KV heads on a tensor
axis of 4 stay replicated) rather than failing deep inside XLA.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis / axes (None = replicated). Data parallelism spans data and fsdp for activations;
# weights are sharded over fsdp on their embed dim and over tensor on heads / mlp / vocab (Megatron layout).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


def make_mesh(shape: dict[str, int] | Sequence[int] | None = None, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh. `shape` maps axis -> size; one size may be -1 for "the rest".

    Uses Auto axis types (GSPMD-style propagation with sharding constraints); jax.make_mesh now defaults to Explicit.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if shape is None:
        shape = {"data": 1, "fsdp": -1, "tensor": 1}
    if not isinstance(shape, dict):
        shape = dict(zip(MESH_AXES, shape))
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axis {sorted(unknown)}; axes are {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    if -1 in sizes:
        if n % known:
            raise ValueError(f"mesh: {n} devices are not divisible by the fixed axes {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh: shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {n}")
    dev = np.asarray(devices).reshape(sizes)
    return Mesh(dev, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_sizes(sizes: dict[str, int], devices=None) -> Mesh:
    """A mesh from `mesh.<axis>` sizes as the experiment config reads them (axes not named: data 1, fsdp -1,
    tensor 1; -1 = the rest of the devices). With no -1 left it takes the first devices it needs, so an evaluation
    can use part of a host (`minicpm eval ... mesh.data=2 mesh.tensor=2 mesh.fsdp=1` on 8 devices uses 4)."""
    shape = {"data": 1, "fsdp": -1, "tensor": 1, **sizes}
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axis {unknown}; axes are {MESH_AXES}")
    try:
        shape = {a: int(v) for a, v in shape.items()}
    except (TypeError, ValueError):
        raise ValueError(f"mesh: sizes must be integers, got {sizes}") from None
    devices = list(jax.devices() if devices is None else devices)
    if -1 not in shape.values():
        need = math.prod(shape.values())
        if need > len(devices):
            raise ValueError(f"mesh: shape {shape} needs {need} devices, have {len(devices)}")
        devices = devices[:need]
    return make_mesh(shape, devices=devices)


def _mesh_axes_for(name: str | None, rules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise KeyError(f"logical axis {name!r} has no rule in the sharding table")


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None,
                    rules=LOGICAL_RULES) -> P:
    """PartitionSpec for a tensor with the given logical axis names.

    With `shape` and `mesh`, mesh axes that do not divide the dimension (or were already used by an earlier
    dimension) are dropped, so the spec is always valid.
    """
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        axes = [a for a in _mesh_axes_for(name, rules) if a not in used]
        if shape is not None and mesh is not None:
            kept, size = [], shape[i]
            for a in axes:
                if size % mesh.shape[a] == 0:
                    kept.append(a)
                    size //= mesh.shape[a]
            axes = kept
        if mesh is not None:
            axes = [a for a in axes if mesh.shape[a] > 1]
        used.update(axes)
        spec.append(None if not axes else (axes[0] if len(axes) == 1 else tuple(axes)))
    return P(*spec)


def logical_shardings(abstract_tree, logical_tree, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a pytree of arrays / ShapeDtypeStructs given a matching pytree of logical-axis tuples."""
    def one(x, axes):
        return NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules))
    return jax.tree.map(one, abstract_tree, logical_tree, is_leaf=lambda a: isinstance(a, tuple) or a is None)


def with_logical_constraint(x, logical_axes: Sequence[str | None]):
    """Activation sharding constraint by logical names; a no-op outside a mesh / rules context."""
    return nn.with_logical_constraint(x, tuple(logical_axes))


def axis_rules():
    """Context manager that installs LOGICAL_RULES for Flax's logical partitioning helpers."""
    return nn.logical_axis_rules(LOGICAL_RULES)


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs of `abstract` carrying `shardings` (restore / lowering targets; no memory allocated)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class AttentionLayout(NamedTuple):
    """How attention runs per shard on the current mesh: rows over `batch_axes`, query heads over `head_axes`, KV
    heads over `kv_head_axes` (the same axes when whole KV groups are kept together; none when a group's query heads
    are split and every device of the axis holds all KV heads)."""

    mesh: Any
    batch_axes: tuple[str, ...]
    head_axes: tuple[str, ...]
    kv_head_axes: tuple[str, ...]

    @property
    def splits_groups(self) -> bool:
        return self.head_axes != self.kv_head_axes


def attention_layout(batch: int, num_heads: int, num_kv_heads: int, mesh=None, *,
                     split_groups: bool = False) -> Optional[AttentionLayout]:
    """The per-shard layout of attention for `batch` rows and `num_heads` / `num_kv_heads` heads, None off a mesh.

    Rows go over the batch axes that divide them. The tensor axis shards KV heads, with their query heads, when it
    divides them. When it does not (2 KV heads on a tensor axis of 4):
      * split_groups=True (dense attention): it shards the query heads anyway, each device's heads lying in one
        group, and every device holds all KV heads (as the projections already lay them out);
      * split_groups=False (InfLLM v2: a group's heads share one block selection, and a split group would need its
        scores summed across devices): it shards rows instead (q/k/v reach that layout by an all-to-all).
    Left to itself, XLA's partitioner all-gathers keys across rows inside the attention loops in that case.
    Axes that fit none of these stay replicated (every device on them computes the same rows). `mesh`: default the
    context mesh of `jax.set_mesh`.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty or mesh.size == 1:
        return None
    batch_axes, rows = [], batch
    for a in _mesh_axes_for("batch", LOGICAL_RULES):
        if a in mesh.shape and mesh.shape[a] > 1 and rows % mesh.shape[a] == 0:
            batch_axes.append(a)
            rows //= mesh.shape[a]
    head_axes, kv_axes, heads, groups = [], [], num_heads, num_kv_heads
    group_size = num_heads // num_kv_heads
    for a in _mesh_axes_for("kv_heads", LOGICAL_RULES):
        n = mesh.shape.get(a, 1)
        if n == 1 or a in batch_axes:
            continue
        if groups % n == 0:
            head_axes.append(a)
            kv_axes.append(a)
            groups //= n
            heads //= n
        elif split_groups and groups == num_kv_heads and heads % n == 0 and group_size % (heads // n) == 0:
            head_axes.append(a)
            heads //= n
        elif rows % n == 0:
            batch_axes.append(a)
            rows //= n
    return AttentionLayout(mesh, tuple(batch_axes), tuple(head_axes), tuple(kv_axes))
