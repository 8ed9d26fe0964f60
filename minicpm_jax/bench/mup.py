"""`minicpm bench mup`: the μP coordinate check (Tensor Programs V, Fig. 5; the `mup` package's `get_coord_data`).

Models of growing width (same depth, head_dim 64 so heads grow with width, KV groups of 2, MLP 3 x width,
dim_model_base fixed) start from their init and take a few Adam steps on the same token batch at the same peak_lr.
At init and after each recorded step, the RMS of each layer's output is measured: the embedding (× scale_emb),
attention out (o_proj, before the residual scale), MLP out (down_proj, before it), the residual stream leaving the
last layer, and the logits. Under μP these stay the same size as the width grows (flat lines on log-log axes);
under standard parametrisation they grow. Parametrisations:

    mup-hidden     optim.mup=true, optim.mup_rule=hidden     (hidden matrices scale with width)
    mup-every_2d   optim.mup=true, optim.mup_rule=every_2d   (every 2-D tensor, embedding and head too)
    sp             optim.mup=false, model.dim_model_base = hidden_size

The printed table gives each layer's RMS per width and, per row, the widest / narrowest ratio (1 = flat).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipeline.config import DataConfig
from data_pipeline.records import write_figure
from data_pipeline.pipeline import make_train_iterator
from data_pipeline.prepare import load_prepared
from minicpm_jax.config import ModelConfig
from minicpm_jax.layers import MLP
from minicpm_jax.model import Attention, DecoderLayer, MiniCPM, default_positions, init_params
from minicpm_jax.train.config import OptimConfig
from minicpm_jax.train.mup import apply_init_multipliers, init_multipliers
from minicpm_jax.train.optimizer import make_optimizer

LAYERS = ("embedding", "attn_out", "mlp_out", "residual", "logits")
PARAMETRISATIONS = ("mup-hidden", "mup-every_2d", "sp")
HEAD_DIM = 64


def width_config(width: int, *, layers: int = 2, vocab_size: int = 8192, dim_model_base: float = 256.0,
                 head_dim: int = HEAD_DIM) -> ModelConfig:
    """The tiny preset at `width`: heads = width / head_dim (KV heads half of them), MLP 3 x width, dense attention."""
    heads = max(width // head_dim, 1)
    return ModelConfig.tiny(hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1), vocab_size=vocab_size,
                            dim_model_base=float(dim_model_base), sparse_config=None, max_position_embeddings=4096)


def parametrise(cfg: ModelConfig, name: str, peak_lr: float) -> tuple[ModelConfig, OptimConfig]:
    """(model config, optimizer config) of parametrisation `name` (PARAMETRISATIONS) at constant lr `peak_lr`."""
    optim = dict(peak_lr=peak_lr, warmup_steps=0, decay_steps=0)
    if name == "sp":
        return cfg.replace(dim_model_base=float(cfg.hidden_size)), OptimConfig(mup=False, **optim)
    rules = {"mup-hidden": "hidden", "mup-every_2d": "every_2d"}
    if name not in rules:
        raise ValueError(f"unknown parametrisation {name!r}; choose from {PARAMETRISATIONS}")
    return cfg, OptimConfig(mup=True, mup_rule=rules[name], **optim)


def synthetic_batch(vocab_size: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    """int32 [batch, seq] tokens with structure to learn: Zipf-distributed, each row a short phrase repeated.

    Used where no prepared corpus is at hand (the tests); the bench prefers real text (`corpus_batch`).
    """
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab_size + 1)
    phrases = rng.choice(vocab_size, size=(batch, 8), p=p / p.sum())
    return np.tile(phrases, (1, math.ceil(seq / 8)))[:, :seq].astype(np.int32)


def corpus_batch(data_dir: str | Path, batch: int, seq: int) -> tuple[np.ndarray, int]:
    """(int32 [batch, seq] tokens, tokenizer vocab size): the first packed training batch of a prepared corpus."""
    prepared = load_prepared(data_dir)
    it = make_train_iterator(prepared, DataConfig(seq_len=seq, batch_size=batch, num_workers=0))
    return np.asarray(next(it)["input_ids"], np.int32), prepared.tokenizer.vocab_size


def _rms(x) -> jnp.ndarray:
    x = jnp.asarray(x, jnp.float32)
    return jnp.sqrt(jnp.mean(x * x))


def _captured(module, method_name) -> bool:
    return method_name == "__call__" and isinstance(module, (MiniCPM, DecoderLayer, Attention, MLP))


def _layer_rms(params, cfg: ModelConfig, input_ids: jnp.ndarray) -> dict:
    """{layer: RMS} (float32 scalars) of LAYERS' outputs for int32 input_ids [B, T]; attention / MLP outputs are
    taken over all layers together, the residual stream as it leaves the last layer.

    Read with flax's capture_intermediates (the model's layer scan stacks them per layer, and the model sows its
    embedding output); nothing here re-implements the forward pass.
    """
    pos = default_positions(input_ids)
    _, state = MiniCPM(cfg, "dense").apply({"params": params}, input_ids, pos, pos, capture_intermediates=_captured,
                                           mutable=["intermediates"])
    t = nn.unbox(state["intermediates"])
    return {"embedding": _rms(t["embedding"][0]),
            "attn_out": _rms(t["layers"]["self_attn"]["__call__"][0][0]),    # [L, B, T, hidden]
            "mlp_out": _rms(t["layers"]["mlp"]["__call__"][0]),
            "residual": _rms(t["layers"]["__call__"][0][0][-1]),            # the last layer's output
            "logits": _rms(t["__call__"][0][0])}


def layer_rms(params, cfg: ModelConfig, input_ids: jnp.ndarray) -> dict[str, float]:
    """RMS of each of LAYERS' outputs for int32 input_ids [B, T] (see `_layer_rms`), as python floats."""
    return {k: float(v) for k, v in jax.jit(_layer_rms, static_argnames="cfg")(params, cfg, input_ids).items()}


def _measure_and_step(cfg: ModelConfig, tx: optax.GradientTransformation):
    """Jitted (params, opt_state, ids [B, T+1]) -> (params, opt_state, {layer: RMS} of the params it was given):
    the layer RMS on ids[:, :-1], then one Adam step on next-token cross-entropy. One compile per model."""
    def loss_fn(params, ids):
        pos = default_positions(ids[:, :-1])
        logits, _ = MiniCPM(cfg, "dense").apply({"params": params}, ids[:, :-1], pos, pos)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @jax.jit
    def step(params, opt_state, ids):
        rms = _layer_rms(params, cfg, ids[:, :-1])
        grads = jax.grad(loss_fn)(params, ids)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, rms
    return step


def coord_rows(cfg: ModelConfig, optim: OptimConfig, input_ids: np.ndarray, record_steps: Sequence[int],
               seed: int = 0) -> list[dict]:
    """[{step, layer, rms}] for one model: its init (step 0) and after each of `record_steps` Adam steps.

    input_ids: int [B, T+1], the one batch every step trains on (next-token targets) and measures (first T).
    The init and optimizer are training's own: `init_params` times the rule's `init_multipliers`, `make_optimizer`
    (AdamW, μP per-tensor learning rates, weight decay, clipping) at a constant peak_lr.
    """
    params = init_params(cfg, jax.random.key(seed))
    params = apply_init_multipliers(params, init_multipliers(cfg, params, optim.mup, optim.mup_rule))
    last = max(record_steps, default=0)
    tx, _ = make_optimizer(optim, cfg, params, total_steps=last + 1)
    opt_state, step = tx.init(params), _measure_and_step(cfg, tx)
    ids, want, rows = jnp.asarray(input_ids), set(record_steps) | {0}, []
    for k in range(last + 1):                      # call k measures the params after k updates
        params, opt_state, rms = step(params, opt_state, ids)
        if k in want:
            rows += [{"step": k, "layer": name, "rms": float(v)} for name, v in rms.items()]
    return rows


def coord_check(widths: Iterable[int], parametrisations: Iterable[str] = PARAMETRISATIONS, *, input_ids: np.ndarray,
                vocab_size: int, layers: int = 2, dim_model_base: float = 256.0, peak_lr: float = 1e-2,
                record_steps: Sequence[int] = (1, 4), seed: int = 0, head_dim: int = HEAD_DIM,
                log=None) -> list[dict]:
    """[{param, width, step, layer, rms}] for every parametrisation x width (input_ids: int [B, T+1])."""
    rows = []
    for name in parametrisations:
        for w in widths:
            cfg, optim = parametrise(width_config(w, layers=layers, vocab_size=vocab_size,
                                                  dim_model_base=dim_model_base, head_dim=head_dim), name, peak_lr)
            rows += [{"param": name, "width": w, **r} for r in coord_rows(cfg, optim, input_ids, record_steps, seed)]
            if log:
                log(f"  {name} width {w}: done")
    return rows


def spread(rows: list[dict], param: str, step: int, layer: str) -> float:
    """RMS at the widest width / RMS at the narrowest, for one parametrisation, step and layer (1 = flat)."""
    sel = sorted((r["width"], r["rms"]) for r in rows if (r["param"], r["step"], r["layer"]) == (param, step, layer))
    return sel[-1][1] / sel[0][1]


def table(rows: list[dict]) -> str:
    """Markdown: one row per parametrisation x step x layer, one column per width, and the widest/narrowest ratio."""
    widths = sorted({r["width"] for r in rows})
    head = "| param | step | layer | " + " | ".join(str(w) for w in widths) + " | widest / narrowest |"
    lines = [head, "|" + "---|" * (len(widths) + 4)]
    for p in dict.fromkeys(r["param"] for r in rows):
        for s in sorted({r["step"] for r in rows}):
            for layer in LAYERS:
                got = {r["width"]: r["rms"] for r in rows if (r["param"], r["step"], r["layer"]) == (p, s, layer)}
                cells = [f"{got[w]:.3g}" if w in got else "—" for w in widths]
                lines.append(f"| {p} | {s} | {layer} | " + " | ".join(cells) + f" | {spread(rows, p, s, layer):.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: str | Path, title: str = "") -> Path:
    """Log-log RMS vs width, one panel per parametrisation, one line per layer (colour) and step (line style)."""
    import matplotlib                      # heavy, and only for the plot
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt        # heavy, and only for the plot
    params = list(dict.fromkeys(r["param"] for r in rows))
    steps = sorted({r["step"] for r in rows})
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.8), sharey=True, squeeze=False)
    for ax, p in zip(axes[0], params):
        for ci, layer in enumerate(LAYERS):
            for si, s in enumerate(steps):
                pts = sorted((r["width"], r["rms"]) for r in rows
                             if (r["param"], r["step"], r["layer"]) == (p, s, layer))
                ax.plot(*zip(*pts), styles[si % len(styles)], marker="o", markersize=3, color=f"C{ci}",
                        label=f"{layer}, step {s}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width (hidden_size)")
        ax.set_title(p)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("RMS of layer output")
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return write_figure(fig, out, dpi=90, title=title)


def run(widths: Sequence[int] = (128, 256, 512, 1024, 2048), *, layers: int = 2, batch: int = 2, seq: int = 64,
        peak_lr: float = 1e-2, record_steps: Sequence[int] = (1, 4), dim_model_base: float = 256.0,
        data_dir: Optional[str] = "runs/data", out: str | Path = "runs/bench/mup_coord_check.png",
        seed: int = 0) -> list[dict]:
    """Run the coordinate check, print the table, write the plot (and a JSON of the rows beside it)."""
    if data_dir and (Path(data_dir) / "prepared.json").exists():
        ids, vocab = corpus_batch(data_dir, batch, seq + 1)
        source = f"real text: the first packed training batch of {data_dir}"
    else:
        vocab = 8192
        ids = synthetic_batch(vocab, batch, seq + 1, seed)
        source = f"synthetic Zipf tokens (no prepared corpus at {data_dir})"
    print(f"coordinate check: widths {list(widths)}, depth {layers}, dim_model_base {dim_model_base:g}, batch "
          f"{batch} x {seq} tokens ({source}), vocab {vocab}, constant peak_lr {peak_lr:g}, "
          f"steps recorded {[0, *record_steps]}", flush=True)
    rows = coord_check(widths, input_ids=ids, vocab_size=vocab, layers=layers, dim_model_base=dim_model_base,
                       peak_lr=peak_lr, record_steps=record_steps, seed=seed, log=lambda m: print(m, flush=True))
    print("\n" + table(rows))
    png = plot(rows, out, title=f"coordinate check: depth {layers}, dim_model_base {dim_model_base:g}, "
                                f"peak_lr {peak_lr:g}, {source.split(':')[0]}")
    Path(png).with_suffix(".json").write_text(json.dumps({"source": source, "rows": rows}, indent=1) + "\n")
    print(f"\nplot: {png}\nrows: {Path(png).with_suffix('.json')}", flush=True)
    return rows
