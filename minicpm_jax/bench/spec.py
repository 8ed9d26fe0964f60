"""`minicpm bench spec`: speculative decoding (EAGLE draft head over an FR-Spec vocabulary) against plain cached
decoding, measured side by side in one run.

Targets:
  * tiny: a trained run (default runs/tiny) with draft heads trained inside the bench on the run's own training
    tokens (`make_draft_train_step`, a short budget) and cached under <run>/bench/draft-<N>/, so reruns skip the
    training. FR-Spec vocabularies of 25 % and 6.25 % of the ids, counted on the same training tokens. Prompts come
    from the held-out documents.
  * 0.5b: the MiniCPM4-0.5B shape with random weights and a draft of the matching shape (its FR head starts as the
    target's head at the FR ids; the FR ids are the lowest ids: with random weights no id is more frequent). Its
    acceptance is meaningless (a random target has no habits to learn); the point of these rows is the time of a
    pass and the draft's output-layer FLOPs.

For every (target, FR size, drafting) row: mean accepted length per step (tokens a target pass yields, the bonus
token included), target passes per generated token, tokens/s speculative vs plain `generate` on the same prompts
(greedy, no EOS stop, prefill included on both sides, compile excluded, median of `reps` rounds that
time both sides in alternation, so both see the same load), and the draft head's
output-layer FLOPs per drafted token (2 * hidden * N, against 2 * hidden * V for a full-vocabulary head). Chain rows
draft k tokens; tree rows draft a static tree (`speculative_generate(tree=...)`).

Also, per target and dtype: the plain decode step's achieved fraction of the machine's read bandwidth, measured as
`sparse.machine_peaks` does (a jitted jnp.sum over 1 GiB, more than the last-level cache) in alternation with the
steps: bytes a step must read (every weight once, the tied head's full [V, H] matrix included, plus K and V of the
cached tokens) / median step time / bandwidth, for the split per-layer weights decode uses on CPU
(`minicpm_jax.unstacked`) and for the stacked layers (the scanned path).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

import minicpm_jax as mc
from data_pipeline.records import decode_record, read_shards
from minicpm_jax.config import ModelConfig
from minicpm_jax.speculative import Draft, count_tokens, frequent_ids, init_draft, speculative_generate
from minicpm_jax.speculative.hf import load_draft_hf, save_draft_hf
from minicpm_jax.train.draft_loss import make_draft_train_step
from minicpm_jax.train.step import TrainState
from minicpm_jax.unstacked import split_layers
from minicpm_jax.weights import load_weights

FR_FRACTIONS = (0.25, 0.0625)
TREE = (4, 2, 1)


# ------------------------------------------------------------------------------------------------ accounting
def decode_bytes_per_step(cfg: ModelConfig, kv_len: int, batch: int = 1) -> dict:
    """Bytes one single-token decode step must read: {"weights", "cache", "total"}.

    weights: every parameter once in cfg.param_dtype; the tied head reads the whole [V, H] embedding (the input
    lookup's one row is then already counted), an untied head reads lm_head plus one embedding row per sequence.
    cache: K and V of `kv_len` cached tokens per sequence, all layers, in cfg.dtype (the cache's dtype)."""
    if kv_len < 0 or batch < 1:
        raise ValueError(f"decode_bytes_per_step: kv_len must be >= 0 and batch >= 1, got {kv_len}, {batch}")
    p = jnp.dtype(cfg.param_dtype).itemsize
    h, hq, hkv, d, f = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                        cfg.intermediate_size)
    per_layer = h * hq * d * 2 + h * hkv * d * 2 + 3 * h * f + 2 * h          # q, o; k, v; gate, up, down; 2 norms
    n = cfg.num_hidden_layers * per_layer + h + cfg.vocab_size * h            # + final norm + head
    if not cfg.tie_word_embeddings:
        n += batch * h                                                        # the looked-up embedding rows
    weights = n * p
    cache = batch * cfg.num_hidden_layers * 2 * kv_len * hkv * d * jnp.dtype(cfg.dtype).itemsize
    return {"weights": weights, "cache": cache, "total": weights + cache}


def draft_output_flops(hidden: int, fr_size: int) -> int:
    """FLOPs of the draft head's output layer for one drafted token: a [hidden] x [hidden, N] matvec."""
    return 2 * hidden * fr_size


def fr_sizes(vocab_size: int, fractions: Sequence[float] = FR_FRACTIONS) -> list[int]:
    """FR-Spec sizes: each fraction of the vocabulary, rounded, at least 1."""
    if any(not 0 < x <= 1 for x in fractions):
        raise ValueError(f"fr fractions must lie in (0, 1], got {list(fractions)}")
    return [max(1, int(round(vocab_size * x))) for x in fractions]


# ------------------------------------------------------------------------------------------------- timing
def interleaved_times(fns: Sequence, reps: int) -> tuple[list[float], list]:
    """Median wall seconds of each fn() over `reps` rounds that call every fn once in turn (one warm-up round first),
    so all sides see the same load on a shared machine; also each fn's last result. fn() returns host data."""
    outs = [fn() for fn in fns]
    ts = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            ts[i].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in ts], outs


def decode_stepper(params, cfg: ModelConfig, kv_len: int, max_calls: int):
    """A function that runs one jitted single-token `decode_step` (batch 1) and waits for it, on a cache prefilled
    with `kv_len` tokens that grows by one per call (room for `max_calls` calls); compiled before it is returned."""
    cap = -(-(kv_len + max_calls + 2) // 16) * 16
    state = {"cache": mc.init_cache(cfg, 1, cap)}
    ids = jnp.asarray(np.arange(kv_len) % (cfg.vocab_size - 3) + 3, jnp.int32)[None]
    _, state["cache"] = mc.prefill(params, cfg, ids, jnp.asarray([kv_len], jnp.int32), state["cache"])
    tok = jnp.asarray([[5]], jnp.int32)

    def step():
        logits, state["cache"] = mc.decode_step(params, cfg, tok, state["cache"])
        return jax.block_until_ready(logits)
    step()
    return step


class BandwidthProbe:
    """Reads `mib` MiB with a jitted jnp.sum (the reduction `sparse.machine_peaks` times): the read bandwidth,
    timed beside the decode steps so both see the same load."""

    def __init__(self, mib: int = 1024):
        self.x = jnp.ones((mib * 2 ** 18,), jnp.float32)
        self.f = jax.jit(jnp.sum)
        self()

    def __call__(self):
        return jax.block_until_ready(self.f(self.x))

    def gbs(self, seconds: float) -> float:
        return self.x.size * 4 / seconds / 1e9


# --------------------------------------------------------------------------------------- the tiny run's data
def read_documents(data_dir: Path, split: str, limit: Optional[int] = None) -> list[np.ndarray]:
    """Token arrays (int32) of the prepared documents of `split` ("train" | "eval") under a prepared data dir."""
    manifest = json.loads((Path(data_dir) / "prepared.json").read_text())
    shards = manifest["train_shards" if split == "train" else "eval_shards"]
    paths = [Path(data_dir) / p for ps in shards.values() for p in ps]
    if not paths:
        raise ValueError(f"{data_dir}: no {split} shards in prepared.json")
    docs = []
    for rec in read_shards(paths):
        docs.append(decode_record(rec)["tokens"])
        if limit and len(docs) >= limit:
            break
    return docs


def windows(docs: Sequence[np.ndarray], seq: int) -> np.ndarray:
    """Non-overlapping [seq] windows of each document (one document per row) -> int32 [R, seq]."""
    rows = [d[i:i + seq] for d in docs for i in range(0, len(d) - seq + 1, seq)]
    if not rows:
        raise ValueError(f"no document has {seq} tokens; lower --seq")
    return np.stack(rows).astype(np.int32)


def train_draft(cfg: ModelConfig, params, fr_ids: np.ndarray, rows: np.ndarray, steps: int, batch: int,
                lr: float = 3e-3, seed: int = 0) -> tuple[Draft, dict]:
    """A draft head trained for `steps` Adam steps on random batches of `rows` (int32 [R, T], one document per row)
    against the frozen target. Returns (draft, last step's metrics)."""
    draft = init_draft(cfg, fr_ids, jax.random.key(seed), target_params=params)
    tx = optax.adam(lr)
    step = jax.jit(make_draft_train_step(cfg, draft.cfg, draft.fr_ids, tx))
    state = TrainState(step=jnp.int32(0), params=draft.params, opt_state=tx.init(draft.params))
    rng = np.random.default_rng(seed)
    t = rows.shape[1]
    metrics = {}
    for _ in range(steps):
        ids = rows[rng.choice(len(rows), min(batch, len(rows)), replace=False)]
        b = {"input_ids": jnp.asarray(ids), "segment_ids": jnp.ones(ids.shape, jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), ids.shape)}
        state, metrics = step(state, params, b)
    return draft._replace(params=state.params), {k: float(v) for k, v in metrics.items()}


def cached_draft(run_dir: Path, cfg: ModelConfig, params, fr_ids: np.ndarray, rows: np.ndarray, steps: int,
                 batch: int, log=print) -> Draft:
    """The trained draft for this FR size from <run_dir>/bench/draft-<N>/ (trained and saved there when absent)."""
    path = Path(run_dir) / "bench" / f"draft-{len(fr_ids)}"
    meta_path = path / "bench.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("steps") == steps:
        return load_draft_hf(path, cfg)
    t0 = time.perf_counter()
    draft, m = train_draft(cfg, params, fr_ids, rows, steps, batch)
    log(f"  trained draft N={len(fr_ids)}: {steps} steps in {time.perf_counter() - t0:.0f} s, loss {m['loss']:.3f}, "
        f"FR top-1 agreement {m['fr_top1']:.2f}; saved to {path}")
    save_draft_hf(path, draft, cfg)
    meta_path.write_text(json.dumps({"steps": steps, "batch": batch, "seq": int(rows.shape[1]), **m}, indent=2))
    return draft


# --------------------------------------------------------------------------------------------- measuring
@dataclasses.dataclass
class SpecRow:
    target: str
    drafting: str           # "chain k=4" | "tree (4, 2, 1)"
    fr_size: int
    vocab_size: int
    hidden: int
    accept_len: Optional[float] = None      # tokens per target pass (None: not measured)
    passes_per_token: Optional[float] = None
    spec_tps: Optional[float] = None
    plain_tps: Optional[float] = None
    note: str = ""


def measure_spec_row(row: SpecRow, split_params, cfg: ModelConfig, draft: Draft, prompts, new_tokens: int,
                     k: int, tree: Optional[tuple], reps: int) -> SpecRow:
    """Fill `row`: speculative decoding (a chain of k when tree is None) and plain greedy `generate` on `prompts`,
    timed in alternation (prefill included on both sides, compile excluded)."""
    # both sides get the weights already split per layer (what each call would otherwise split first on CPU), so
    # neither pays the one-off split inside the timed call
    plain = lambda: mc.generate(split_params, cfg, prompts, new_tokens, eos_token_id=[])
    kw = dict(k=k) if tree is None else dict(tree=tuple(tree))
    spec = lambda: speculative_generate(split_params, cfg, draft, prompts, new_tokens, eos_token_id=[], **kw)
    (t_plain, t_spec), (res_plain, res) = interleaved_times([plain, spec], reps)
    passes, acc, gen = res.target_passes.sum(), res.accepted.sum(), res.lengths.sum()
    row.accept_len = float((acc + passes) / passes)
    row.passes_per_token = float(passes / gen)
    row.spec_tps = float(gen / t_spec)
    row.plain_tps = float(res_plain.lengths.sum() / t_plain)
    return row


def bandwidth_lines(name: str, cfg: ModelConfig, params, kv_len: int, steps: int, probe: Optional[BandwidthProbe],
                    bw_gbs: Optional[float] = None, stacked: bool = True) -> list[str]:
    """Plain decode step over split per-layer weights (and stacked): median time and achieved fraction of the read
    bandwidth, measured by `probe` in alternation with the steps (or `bw_gbs` when given)."""
    need = decode_bytes_per_step(cfg, kv_len)
    layouts = [("split", jax.jit(split_layers)(params))] + ([("stacked", params)] if stacked else [])
    fns = [decode_stepper(p, cfg, kv_len, steps + 1) for _, p in layouts]
    times, _ = interleaved_times(fns + ([probe] if bw_gbs is None else []), steps)
    bw = bw_gbs if bw_gbs is not None else probe.gbs(times[-1])
    out = []
    for (label, _), t in zip(layouts, times):
        out.append(f"  {name} {cfg.dtype:8} {label:7} layers: {t * 1e3:7.1f} ms/step = {1 / t:6.2f} tok/s, "
                   f"{need['total'] / 2 ** 20:7.1f} MiB read/step -> {need['total'] / t / 1e9:5.1f} GB/s = "
                   f"{need['total'] / t / (bw * 1e9):4.0%} of measured bandwidth ({bw:.1f} GB/s beside it)")
    return out


def format_table(rows: Sequence[SpecRow]) -> list[str]:
    """The markdown table of the speculative rows."""
    head = ["target", "drafting", "FR N (of V)", "draft out FLOPs/token", "accept len/step", "passes/token",
            "spec tok/s", "plain tok/s", "spec/plain", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    f = lambda x, fmt: "n/a" if x is None else format(x, fmt)
    for r in rows:
        ratio = None if r.spec_tps is None else r.spec_tps / r.plain_tps
        flops = draft_output_flops(r.hidden, r.fr_size)
        cells = [r.target, r.drafting, f"{r.fr_size} ({r.fr_size / r.vocab_size:.2%})",
                 f"{flops / 1e6:.3g}M (full V: {draft_output_flops(r.hidden, r.vocab_size) / 1e6:.3g}M)",
                 f(r.accept_len, ".2f"), f(r.passes_per_token, ".3f"), f(r.spec_tps, ".2f"), f(r.plain_tps, ".2f"),
                 f(ratio, ".2f") + ("x" if ratio is not None else ""), r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------------- targets
def tiny_target(run_dir: Path, data_dir: Optional[Path]):
    """(cfg, params, train docs, eval docs) of a trained run; the data dir defaults to the run config's."""
    w = load_weights(run_dir)
    if data_dir is None:
        conf = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
        data_dir = Path(conf.get("data_dir", "runs/data"))
        if not (data_dir / "prepared.json").exists():          # relative to the run's parent (runs/)
            data_dir = Path(run_dir).parent / Path(conf.get("data_dir", "runs/data")).name
    if not (Path(data_dir) / "prepared.json").exists():
        raise FileNotFoundError(f"--data-dir {data_dir}: no prepared.json (the run's prepared training data)")
    cfg = w.cfg.replace(sparse_config=None)   # short prompts decode dense either way; keeps the cache small
    return cfg, w.params, read_documents(data_dir, "train"), read_documents(data_dir, "eval", limit=64)


def run(run_dir: str = "runs/tiny", data_dir: Optional[str] = None, targets: Sequence[str] = ("tiny", "0.5b"),
        k: int = 4, tree: Sequence[int] = TREE, fractions: Sequence[float] = FR_FRACTIONS,
        new_tokens: int = 32, prompt_len: int = 32, batch: int = 1, reps: int = 3, train_steps: int = 200,
        train_batch: int = 8, train_seq: int = 128, dtypes: Sequence[str] = ("float32", "bfloat16"),
        decode_steps: int = 8, probe_mib: int = 1024, big_new_tokens: int = 12, seed: int = 0, log=print,
        random_cfg: Optional[ModelConfig] = None, bw_gbs: Optional[float] = None, stacked: bool = True) -> str:
    """Run the benchmark; prints progress through `log` and returns the report (also printed).

    random_cfg: the random-weight target's shape (default MiniCPM4-0.5B; tests pass a small one). bw_gbs: use this
    read bandwidth instead of measuring it. stacked: also time the decode step over the stacked layers."""
    for t in targets:
        if t not in ("tiny", "0.5b"):
            raise ValueError(f"targets: unknown target {t!r} (tiny | 0.5b)")
    probe = None if bw_gbs is not None else BandwidthProbe(probe_mib)
    bw_text = (f"given, {bw_gbs:.1f} GB/s" if bw_gbs else
               f"measured beside the decode steps (jnp.sum over {probe_mib} MiB, timed in alternation with them)")
    out = [f"spec bench: read bandwidth {bw_text}; JAX {jax.__version__}, backend {jax.default_backend()}; "
           f"greedy, batch {batch}, compile excluded, median of {reps}", "", "plain decode step vs memory bandwidth:"]
    rows: list[SpecRow] = []
    trees = [None] + ([tuple(tree)] if tree else [])
    rng = np.random.default_rng(seed)
    for target in targets:
        if target == "tiny":
            cfg, params, train_docs, eval_docs = tiny_target(Path(run_dir), Path(data_dir) if data_dir else None)
            counts = count_tokens(train_docs, cfg.vocab_size)
            rows_tok = windows(train_docs, train_seq)
            prompts = [list(map(int, d[:prompt_len])) for d in eval_docs if len(d) >= prompt_len][:batch]
            n_new, note = new_tokens, ""
            log(f"tiny: {cfg.param_count() / 1e6:.1f}M params, {len(train_docs)} training documents "
                f"({int(counts.sum())} tokens)")
        else:
            cfg = random_cfg or mc.ModelConfig.minicpm4_0_5b(sparse_config=None)
            params = mc.init_params(cfg, jax.random.key(seed))
            counts = None
            prompts = [list(map(int, rng.integers(3, cfg.vocab_size, prompt_len))) for _ in range(batch)]
            n_new, note = big_new_tokens, "random weights: acceptance meaningless"
            target = "0.5b" if random_cfg is None else "random"
        for dt in dtypes:
            c = cfg.replace(dtype=dt, param_dtype=dt)
            p = params if dt == cfg.param_dtype else jax.tree.map(lambda x: x.astype(dt), params)
            out += bandwidth_lines(target, c, p, prompt_len + n_new // 2, decode_steps, probe, bw_gbs, stacked)
        log("\n".join(out[-(1 + stacked) * len(dtypes):]))
        split = jax.jit(split_layers)(params)
        for n in fr_sizes(cfg.vocab_size, fractions):
            if counts is not None:
                fr = frequent_ids(counts, n, always=cfg.eos_ids)
                draft = cached_draft(Path(run_dir), cfg, params, fr, rows_tok, train_steps, train_batch, log=log)
            else:
                draft = init_draft(cfg, np.arange(n), jax.random.key(seed + 1), target_params=params)
            for tr in trees:
                r = SpecRow(target, f"chain k={k}" if tr is None else f"tree {tr}", n, cfg.vocab_size,
                            cfg.hidden_size, note=note)
                rows.append(measure_spec_row(r, split, cfg, draft, prompts, n_new, k, tr, reps))
                log(format_table(rows[-1:])[-1])
    out += ["", f"speculative vs plain generate (prompt {prompt_len} tokens; tiny: {new_tokens} new tokens, 0.5b: "
                f"{big_new_tokens}); accept len = tokens per target pass, bonus token included:", ""]
    out += format_table(rows)
    report = "\n".join(out)
    print(report, flush=True)
    return report
