"""A new training phase from a checkpoint (`train.init_from`): what it takes from its source, what must agree with
it, and the optimizer state it may continue.

    exp, notes = resolve_source_model(exp)        # before anything is built: the model config the phase trains
    state, note = continue_optimizer(exp, setup)  # train.init_from_optimizer: the source run's params + Adam moments

The model config of a phase, field by field (ModelConfig's fields fall in these groups):
- shapes (`INIT_FROM_SHAPE_FIELDS`) and math (`INIT_FROM_MATH_FIELDS`: RoPE, norm eps, μP scalars). A field the
  experiment's model section does not set is taken from the source: recorded in the phase's config.yaml (so the run
  directory stays self-describing) and logged once where it differs from the preset. A field the section sets (every
  field, when its base is `hf_config`) must equal the source's, or the run stops naming each such field with both
  values. A math field listed in `train.init_from_override` keeps this config's value (set or preset) instead.
  `max_position_embeddings` enters the math only through LongRoPE (its scaling factor and short/long choice), so it is
  compared only when both configs have `rope_scaling`.
- `sparse_config`, `initializer_range` and the source's unknown HF keys (`extra`): taken from the source when the
  section does not set them (`sparse_config` only when the source has one: a dense source keeps the preset's), never
  checked. InfLLM v2 adds no parameters, and switching it on is what a context-extension phase is for.
- token ids: `loop.special_token_ids` (the source's unless set). Run-time fields (dtype, remat, sparse_impl, ...):
  this run's own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from etils import epath

from minicpm_jax.checkpoint import Checkpointer, run_paths
from minicpm_jax.config import ModelConfig, RopeScaling
from minicpm_jax.sparse.config import SparseConfig
from minicpm_jax.train.config import INIT_FROM_MATH_FIELDS, INIT_FROM_SHAPE_FIELDS
from minicpm_jax.weights import source_config, source_kind

if TYPE_CHECKING:
    from minicpm_jax.train.config import ExperimentConfig
    from minicpm_jax.train.step import StepSetup, TrainState

LINEAGE_FIELDS = ("sparse_config", "initializer_range", "extra")


def explicit_fields(section) -> set[str]:
    """The ModelConfig fields an experiment's model section states: its overrides, or all of them over an
    `hf_config` base (a config.json the user chose states every field)."""
    if section.hf_config:
        return {f.name for f in dataclasses.fields(ModelConfig)}
    return set(section.overrides())


def _rope_math(rs: Optional[RopeScaling]):
    """What of rope_scaling the forward pass uses ('su' and 'longrope' are one code path, the key name is cosmetic)."""
    return None if rs is None else (rs.short_factor, rs.long_factor, rs.original_max_position_embeddings)


def same_math(field: str, a, b) -> bool:
    return _rope_math(a) == _rope_math(b) if field == "rope_scaling" else a == b


def describe(field: str, v) -> str:
    """A value for an error line: rope_scaling lists shortened to their ends and length."""
    if field != "rope_scaling":
        return repr(v)
    if v is None:
        return "None (plain RoPE)"
    ends = lambda f: f"[{f[0]:.6g}, {f[1]:.6g}, …, {f[-1]:.6g}] ({len(f)})"
    return (f"{v.rope_type}(original_max_position_embeddings={v.original_max_position_embeddings}, "
            f"short_factor={ends(v.short_factor)}, long_factor={ends(v.long_factor)})")


def _rope_first_difference(a: RopeScaling, b: RopeScaling) -> str:
    for key in ("short_factor", "long_factor"):
        fa, fb = getattr(a, key), getattr(b, key)
        for i, (x, y) in enumerate(zip(fa, fb)):
            if x != y:
                return f" (first difference: {key}[{i}] {x!r} vs {y!r})"
    return ""


def _mismatch(field: str, src, own) -> str:
    line = f"model.{field}: the source has {describe(field, src)}, this config {describe(field, own)}"
    if field == "rope_scaling" and src is not None and own is not None:
        line += _rope_first_difference(src, own)
    return line


def _section_value(v) -> Any:
    """A ModelConfig value as the model section (YAML) holds it."""
    if isinstance(v, (RopeScaling, SparseConfig)):
        return v.to_hf_dict()
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, Mapping):
        return dict(v)
    return v


def compare_with_source(own: ModelConfig, src: ModelConfig, explicit: set[str],
                        override: tuple[str, ...]) -> tuple[dict, list[str], list[str]]:
    """(fields to take from the source {name: value}, mismatch lines, override notes) for a phase whose model config
    is `own` (its section sets `explicit`) starting from a source whose config is `src`. See the module docstring."""
    taken, bad, notes = {}, [], []
    keeps_own_rope = "rope_scaling" in explicit or "rope_scaling" in override
    both_longrope = src.rope_scaling is not None and (own if keeps_own_rope else src).rope_scaling is not None
    for f in INIT_FROM_SHAPE_FIELDS + INIT_FROM_MATH_FIELDS:
        a, b = getattr(src, f), getattr(own, f)
        if f in override:
            if not same_math(f, a, b):
                notes.append(f"model.{f}: this config's {describe(f, b)} (train.init_from_override), not the "
                             f"source's {describe(f, a)}")
        elif f not in explicit:
            if not same_math(f, a, b):
                taken[f] = a
        elif f == "max_position_embeddings" and not both_longrope:
            continue                  # without LongRoPE on both sides it changes nothing the weights compute
        elif not same_math(f, a, b):
            bad.append(_mismatch(f, a, b))
    for f in LINEAGE_FIELDS:
        a = getattr(src, f)
        if f not in explicit and a != getattr(own, f) and not (f == "sparse_config" and a is None):
            taken[f] = a
    return taken, bad, notes


def resolve_source_model(exp: "ExperimentConfig") -> tuple["ExperimentConfig", list[str]]:
    """The experiment with its model section completed from `train.init_from`'s config, and the lines to log once.

    Raises ValueError naming every field that the section sets to a value other than the source's where it changes
    the math (and is not in `train.init_from_override`), and for `train.init_from_optimizer` with an HF source.
    Reads only the source's config (config.json, or a run's config.yaml), not its weights.
    A draft run (`draft.target`) completes its model section from the target's config the same way."""
    src_path, field = (exp.draft.target, "draft.target") if exp.draft.target else (exp.train.init_from,
                                                                                     "train.init_from")
    if src_path is None:
        return exp, []
    kind = source_kind(src_path)
    if exp.train.init_from_optimizer and kind != "run":
        raise ValueError(f"train.init_from_optimizer: {src_path} is an HF checkpoint directory, which holds weights "
                         "only, no optimizer state. Start from a training run directory, or set "
                         "train.init_from_optimizer=false for fresh Adam moments")
    own, src = exp.model_config(), source_config(src_path)
    taken, bad, notes = compare_with_source(own, src, explicit_fields(exp.model), exp.train.init_from_override)
    if bad:
        math = [f for f in INIT_FROM_MATH_FIELDS if any(ln.startswith(f"model.{f}:") for ln in bad)]
        hint = (f"; or add train.init_from_override=[{', '.join(math)}] to train with this config's value"
                if math and len(math) == len(bad) else "")
        raise ValueError(f"{field}={src_path}: the model config differs from the source's where it changes "
                         "the math: " + "; ".join(bad) + ". Remove these fields from the model section to continue "
                         f"with the source's values{hint}")
    if taken:
        section = dataclasses.replace(exp.model, **{f: _section_value(v) for f, v in taken.items()})
        exp = dataclasses.replace(exp, model=section)
        base = f"hf_config {exp.model.hf_config}" if exp.model.hf_config else f"preset {exp.model.preset}"
        shown = [f for f in taken if f != "extra"]
        if shown:
            notes.insert(0, f"model: from the source {src_path} (the {base} differs): " + ", ".join(
                f"{f}={describe(f, taken[f])}" for f in shown))
    return exp, notes


def _leaf_name(path) -> str:
    """A tree path in orbax's naming (`opt_state.1.mu.embed_tokens`), to compare with a checkpoint's metadata."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def state_tree_differences(saved: Mapping[str, tuple], wanted: Mapping[str, tuple]) -> list[str]:
    """Lines naming what differs between two {leaf name: shape} trees, grouped by their first three name parts."""
    group = lambda n: n if n.count(".") < 3 else ".".join(n.split(".")[:3]) + ".*"
    only_saved = sorted({group(n) for n in saved.keys() - wanted.keys()})
    only_wanted = sorted({group(n) for n in wanted.keys() - saved.keys()})
    shapes = [f"{n}: {saved[n]} vs {wanted[n]}" for n in sorted(saved.keys() & wanted.keys()) if saved[n] != wanted[n]]
    out = []
    if only_saved:
        out.append(f"only the source has {only_saved}")
    if only_wanted:
        out.append(f"only this run has {only_wanted}")
    if shapes:
        out.append("shapes differ: " + ", ".join(shapes[:5]) + (" …" if len(shapes) > 5 else ""))
    return out


def restart_schedule(state: "TrainState") -> "TrainState":
    """The state as step 0 of a new schedule: TrainState.step and the learning-rate schedule's count at 0. Adam's own
    count stays: its bias correction belongs to the moments (reset, it would scale their first update by up to
    sqrt(1 - b2) / (1 - b1), 2.2x with the defaults)."""
    is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)
    zero = lambda s: s._replace(count=jnp.zeros_like(s.count)) if is_sched(s) else s
    return state.replace(step=jnp.zeros_like(state.step),
                         opt_state=jax.tree.map(zero, state.opt_state, is_leaf=is_sched))


def continue_optimizer(exp: "ExperimentConfig", setup: "StepSetup") -> tuple["TrainState", str]:
    """Step 0 of a phase that continues the source run's optimizer: the params and Adam moments of its checkpoint
    `train.init_from_step` (default: the newest that restores), placed with this run's shardings, with a new schedule
    (`restart_schedule`). Raises ValueError naming the difference when the source's optimizer state does not have
    this run's tree (another optax chain, e.g. gradient clipping on in one and off in the other)."""
    src = Path(exp.train.init_from)
    ckpt_dir = run_paths(src)["checkpoints"]
    target = setup.abstract_state()
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    try:
        steps = ckpt.steps()
        step = exp.train.init_from_step
        if not steps:
            raise FileNotFoundError(f"train.init_from={src}: {ckpt_dir} holds no committed checkpoint")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"train.init_from_step={step}: {ckpt_dir} has no such step (have {steps})")
        # every step of one run has the same tree: the newest (or the asked) one's metadata stands for all
        meta = ocp.StandardCheckpointHandler().metadata(
            epath.Path(ckpt_dir / str(step if step is not None else steps[-1]) / "state"))
        saved = {m.name: tuple(m.shape) for m in jax.tree.leaves(meta)}
        wanted = {_leaf_name(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(target)[0]}
        diffs = state_tree_differences(saved, wanted)
        if diffs:
            raise ValueError(f"train.init_from_optimizer: the optimizer state of {src} does not have this run's tree ("
                             + "; ".join(diffs) + "). The optax chain must be the same: compare the optim sections "
                             "(e.g. optim.clip_grad_norm on in one run and off in the other), or set "
                             "train.init_from_optimizer=false for fresh Adam moments")
        if step is None:
            step, state, _, skipped = ckpt.restore_latest(target)
            for e in skipped:
                print(f"WARNING: {e}. Falling back to the previous checkpoint.", flush=True)
        else:
            state, _ = ckpt.restore(step, target)
    finally:
        ckpt.close()
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    moments = f"Adam moments after {int(adam[0].count)} updates" if adam else "optimizer state"
    note = (f"initialised from training run {src}, checkpoint step {step}, with its {moments}; step and learning-rate "
            "schedule start at 0 (train.init_from_optimizer)")
    return restart_schedule(state), note
