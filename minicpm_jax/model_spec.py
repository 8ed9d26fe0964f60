"""The model section of an experiment: which ModelConfig to build, and how the model attends.

    model:
      preset: tiny                 # or hf_config: path/to/checkpoint (its config.json is the base)
      attention: auto              # auto | dense | sparse (see attention_plan.py)
      num_hidden_layers: 6         # any ModelConfig field (HF names), overriding the base
      sparse_config: {topk: 4}     # a dict changes only the keys it names

`ModelSection` is a typed dataclass generated from `ModelConfig`'s fields (each Optional: None = the base's value),
so OmegaConf rejects an unknown key or a wrongly typed value with its dotted name, and `ModelConfig` validates the
values. It lives at the model level because a run directory's config is read by the weight resolver too.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from minicpm_jax.attention_plan import ATTENTION_MODES
from minicpm_jax.config import ModelConfig
from minicpm_jax.convert.hf import read_config

_SCALARS = (int, float, str, bool)


def _section_type(tp) -> Any:
    """Optional[scalar] stays typed (OmegaConf checks it); containers and dataclasses are Any (ModelConfig checks)."""
    if tp in _SCALARS:
        return Optional[tp]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1 and args[0] in _SCALARS:
        return Optional[args[0]]
    return Optional[Any]


def _make_section():
    hints = typing.get_type_hints(ModelConfig)
    fields = [("preset", str, dataclasses.field(default="tiny")),
              ("hf_config", Optional[str], dataclasses.field(default=None)),
              ("attention", str, dataclasses.field(default="auto"))]
    fields += [(f.name, _section_type(hints[f.name]), dataclasses.field(default=None))
               for f in dataclasses.fields(ModelConfig)]
    return dataclasses.make_dataclass("ModelSection", fields, frozen=True, namespace={
        "__doc__": "An experiment's model section: base (preset or hf_config), attention mode, field overrides.",
        "__post_init__": _validate, "overrides": _overrides, "build": _build, "to_dict": _to_dict,
        "from_dict": classmethod(_from_dict), "__module__": __name__})


def _validate(self) -> None:
    if self.attention not in ATTENTION_MODES:
        raise ValueError(f"model.attention: must be one of {ATTENTION_MODES}, got {self.attention!r}")


def _overrides(self) -> dict:
    """The ModelConfig fields this section sets (None = keep the base's)."""
    skip = {"preset", "hf_config", "attention"}
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name not in skip and getattr(self, f.name) is not None}


def _build(self) -> ModelConfig:
    """The ModelConfig: `hf_config`'s config.json (or the preset), with this section's overrides."""
    base = read_config(self.hf_config) if self.hf_config else ModelConfig.from_preset(self.preset)
    over = self.overrides()
    for k, v in over.items():   # OmegaConf hands Any-typed lists/dicts over as plain containers
        if isinstance(v, list) and k != "eos_token_id":
            over[k] = tuple(v)
    try:
        return base.replace(**over) if over else base
    except (TypeError, ValueError) as e:
        raise ValueError(f"model: {e}") from None


def _to_dict(self) -> dict:
    """The section as written in a YAML: only what is set."""
    out = {"preset": self.preset}
    if self.hf_config:
        out["hf_config"] = self.hf_config
    out["attention"] = self.attention
    out.update(self.overrides())
    return out


def _from_dict(cls, d: Mapping[str, Any]):
    """A section from a plain dict (e.g. a run's config.yaml), checked like a YAML file."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(dict(d))))
    except OmegaConfBaseException as e:
        raise ValueError(f"model.{getattr(e, 'full_key', '?')}: {str(e).splitlines()[0]}") from None


ModelSection = _make_section()
