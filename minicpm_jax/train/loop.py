"""The training loop: data -> sharded jitted steps -> eval / checkpoints / metrics -> the final weights.

`run(exp)` trains and returns a `TrainResult`; the run driver (`minicpm_jax.cli.train`) then samples text, exports
and writes the summary. It runs unchanged on one CPU, 8 fake CPU devices, one GPU or a pod: the mesh, batch and
model size come from the config, `jax.distributed` joins the hosts, and each process feeds its own slice of the
global batch (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from tqdm import tqdm

from data_pipeline import records
from data_pipeline.pipeline import make_eval_iterator, make_train_iterator
from data_pipeline.prepare import prepare_data
from minicpm_jax.attention_plan import check_one_document_per_row
from minicpm_jax.checkpoint import Checkpointer, run_paths
from minicpm_jax.config import ModelConfig
from minicpm_jax.sharding import axis_rules, make_mesh
from minicpm_jax.train.config import ExperimentConfig
from minicpm_jax.train.draft_step import DraftStepSetup, build_draft_step, draft_vocabulary
from minicpm_jax.train.metrics import MetricsWriter, peak_flops, to_python
from minicpm_jax.train.phase import continue_optimizer, resolve_source_model
from minicpm_jax.train.run_dir import (RunLock, move_old_run_aside, recorded_model, recorded_trains_draft,
                                       restore_or_stop, shape_differences, truncate_metrics)
from minicpm_jax.train.step import BATCH_KEYS, StepSetup, build_step
from minicpm_jax.weights import load_weights, source_config

CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID",
               "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")


def init_distributed(dcfg) -> None:
    """Join the other hosts (must run before any JAX computation)."""
    if dcfg.mode == "off" or jax.distributed.is_initialized():
        return
    if dcfg.mode == "explicit":
        jax.distributed.initialize(coordinator_address=dcfg.coordinator_address, num_processes=dcfg.num_processes,
                                   process_id=dcfg.process_id, initialization_timeout=dcfg.initialization_timeout)
    elif any(k in os.environ for k in CLUSTER_ENV):
        if os.environ.get("SLURM_NTASKS", "2") != "1":
            jax.distributed.initialize(initialization_timeout=dcfg.initialization_timeout)


def fault_point(kind: str, step: int) -> None:
    """Fault injection for the crash/resume tests: MINICPM_FAULT="<kind>:<step>" hard-kills the process there.

    kinds: "during_save" (right after an async checkpoint save of `step` started, before it committed) and
    "after_step" (after `step` finished and its checkpoint, if any, committed). Unset in normal runs.
    """
    if os.environ.get("MINICPM_FAULT") == f"{kind}:{step}":
        print(f"MINICPM_FAULT: killing the process at {kind}:{step}", flush=True)
        os._exit(17)


def say(msg: str):
    if jax.process_index() == 0:
        print(msg, flush=True)


@dataclasses.dataclass
class TrainResult:
    """What a finished run hands its driver: the final params (sharded), the model config, the tokenizer, where the
    run lives and its last step (its losses are in `<run>/logs/metrics.jsonl`, resumed segments included). A draft
    run's params are its draft head's, and `draft` holds the frozen target and the FR-Spec ids."""

    exp: ExperimentConfig
    cfg: ModelConfig
    params: Any
    tokenizer: Any
    run_dir: Path
    steps: int
    draft: Any = None            # a draft run's DraftStepSetup (params are then the draft head's; the target is in it)


def to_global(local: dict, sharding: NamedSharding, global_shape) -> dict:
    """Process-local numpy batch -> global jax arrays laid out by `sharding`."""
    out = {}
    for k in BATCH_KEYS:
        x = np.asarray(local[k], np.int32) if k in local else np.ones(local["input_ids"].shape, np.int32)
        out[k] = jax.make_array_from_process_local_data(sharding, x, global_shape)
    return out


def eval_loss(eval_fn, params, it, batches: int, sharding: NamedSharding, global_shape) -> dict:
    """Token-weighted held-out loss of `params` over at most `batches` batches of the eval iterator `it`.

    Returns {"loss", "perplexity", "tokens", "loss_sum"} and, for every other "<name>_sum" eval_fn returns (a draft
    run's feature loss, top-1 agreement), "<name>" per target token; eval_fn(params, batch) -> {"loss_sum",
    "target_tokens", ...}.
    """
    sums: dict = {}
    for local in itertools.islice(it, batches):
        m = to_python(eval_fn(params, to_global(local, sharding, global_shape)))
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
    tot, n = sums.pop("loss_sum", 0.0), sums.pop("target_tokens", 0.0)
    loss = tot / max(n, 1.0)
    extra = {k[:-4]: v / max(n, 1.0) for k, v in sums.items() if k.endswith("_sum")}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": n, "loss_sum": tot, **extra}


def initial_params(exp: ExperimentConfig, setup: StepSetup):
    """Fresh μP init, or the weights of `train.init_from` (HF dir or run dir) for a new phase (its model config was
    checked against the source's and completed from it first: `phase.resolve_source_model`)."""
    src, cfg = exp.train.init_from, setup.cfg
    if src is None:
        return setup.init_params(exp.seed)
    w = load_weights(src, step=exp.train.init_from_step, mesh=setup.mesh, dtype=jnp.dtype(cfg.param_dtype))
    want = setup.abstract_params
    bad = [jax.tree_util.keystr(p) for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(want),
                                                           jax.tree.leaves(w.params)) if a.shape != b.shape]
    if jax.tree.structure(want) != jax.tree.structure(w.params) or bad:
        raise ValueError(f"train.init_from={src}: its weights do not fit model config (mismatched: {bad or 'tree'})")
    say(f"initialised from {w.describe()} (a new phase: fresh optimizer state and schedule)")
    return jax.tree.map(lambda x: x.astype(cfg.param_dtype), w.params)


def initial_state(exp: ExperimentConfig, setup: StepSetup):
    """Step 0 of a run: fresh Adam moments over `initial_params`, or (`train.init_from_optimizer`) the source run's
    params and moments with a new schedule."""
    if not exp.train.init_from_optimizer:
        return setup.init_state(initial_params(exp, setup))
    state, note = continue_optimizer(exp, setup)
    say(note)
    return state


def special_token_ids(exp: ExperimentConfig, tokenizer) -> dict:
    """BOS / EOS / pad ids of the model: its tokenizer's for a fresh model, the source checkpoint's for a new phase
    (`train.init_from`). Ids set explicitly in the experiment's model section win over both."""
    if exp.train.init_from is None:
        eos = [tokenizer.eos_id] + ([tokenizer.im_end_id] if tokenizer.im_end_id is not None else [])
        ids = dict(bos_token_id=tokenizer.bos_id, eos_token_id=eos, pad_token_id=tokenizer.pad_id)
    else:
        src = source_config(exp.train.init_from)
        ids = dict(bos_token_id=src.bos_token_id, eos_token_id=list(src.eos_ids), pad_token_id=src.pad_token_id)
    return {k: v for k, v in ids.items() if getattr(exp.model, k) is None}


def prepare(exp: ExperimentConfig):
    """Data preparation on process 0 (cached on disk), then every process opens the prepared data."""
    progress = sys.stderr.isatty()
    if jax.process_index() == 0:
        prepared = prepare_data(exp.data_dir, exp.data, progress=progress)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("minicpm:data-prepared")
        if jax.process_index() != 0:
            prepared = prepare_data(exp.data_dir, exp.data, progress=False)
    return prepared


class Progress:
    """A tqdm bar on a terminal; otherwise one plain line every `log_every` steps (no carriage returns in logs)."""

    def __init__(self, exp: ExperimentConfig, start: int, enabled: bool):
        self.total, self.enabled = exp.train.steps, enabled
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=self.total, initial=start, desc=exp.name, unit="step", dynamic_ncols=True,
                        disable=not (enabled and self.tty))

    def metrics(self, step: int, m: dict) -> None:
        rate = f"{m['tokens_per_s']:,.0f}" if "tokens_per_s" in m else "—"   # — : the interval held compilation
        mfu = f"{100 * m['mfu']:.0f}%" if "mfu" in m else "—"
        if self.tty:
            self.bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=rate, mfu=mfu)
        elif self.enabled:
            print(f"step {step}/{self.total}: loss {m['loss']:.4f}, lr {m['lr']:.3g}, grad norm {m['grad_norm']:.3g}, "
                  f"tok/s {rate}, mfu {mfu}", flush=True)

    def update(self, step: int) -> None:
        self.bar.update(step - self.bar.n)

    def write(self, msg: str) -> None:
        if self.enabled:
            (self.bar.write if self.tty else print)(msg)
            sys.stdout.flush()

    def close(self) -> None:
        self.bar.close()


def sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def check_run_dir(exp: ExperimentConfig, cfg: ModelConfig, run_dir: Path, steps: list[int]) -> None:
    """Decide what an existing run directory means for this run before anything in it is written or deleted."""
    if not steps:
        return
    if not exp.train.resume:
        if not exp.train.overwrite:
            raise ValueError(f"{run_dir} holds a run with checkpoints {steps}; train.resume=false would train a new "
                             "run into it and mix the two. Use a new output_dir, or add train.overwrite=true to move "
                             f"the old run's files into {run_dir}/previous-<n>/ first")
        if jax.process_index() == 0:
            say(f"train.overwrite: the previous run in {run_dir} moved to {move_old_run_aside(run_dir)}")
        sync("minicpm:old-run-moved")
        return
    if recorded_trains_draft(run_dir) != (exp.draft.target is not None):
        kinds = ("a draft head", "a model") if exp.draft.target is None else ("a model", "a draft head")
        raise ValueError(f"refusing to resume {run_dir}: its checkpoints are of {kinds[0]}, this config trains "
                         f"{kinds[1]}. Use a new output_dir")
    recorded = recorded_model(run_dir)
    diffs = shape_differences(recorded, cfg) if recorded is not None else []
    if diffs:
        raise ValueError(f"refusing to resume {run_dir} (checkpoints {steps}) with a config whose model shapes differ: "
                         + "; ".join(diffs) + ". Use the run's own settings, a new output_dir, or start a new phase "
                         f"from its weights with train.init_from={run_dir} in another output_dir")


def run(exp: ExperimentConfig, *, locked: bool = False) -> TrainResult:
    """Train `exp` to `train.steps` (resuming from the run's latest checkpoint) and return the final state.

    The run directory is locked for the call (one writer) unless the caller holds its `RunLock` (`locked`)."""
    init_distributed(exp.distributed)
    lock = contextlib.nullcontext() if locked else RunLock(exp.output_dir, enabled=jax.process_index() == 0)
    with lock:
        return _run(exp)


def absolute_paths(exp: ExperimentConfig) -> ExperimentConfig:
    """The experiment with its input paths made absolute, so the run's recorded config.yaml means the same from any
    working directory (`minicpm eval` run elsewhere reads the same prepared data, not a fresh ./runs/data)."""
    absolute = lambda p: None if p is None else str(Path(p).expanduser().resolve())
    init_from = exp.train.init_from
    if init_from is not None and Path(init_from).expanduser().exists():
        init_from = absolute(init_from)
    data = exp.data
    if data.tokenizer.path is not None:
        data = dataclasses.replace(data, tokenizer=dataclasses.replace(data.tokenizer,
                                                                       path=absolute(data.tokenizer.path)))
    return dataclasses.replace(exp, data_dir=absolute(exp.data_dir), data=data,
                               train=dataclasses.replace(exp.train, init_from=init_from))


def _run(exp: ExperimentConfig) -> TrainResult:
    exp = absolute_paths(exp)
    exp, notes = resolve_source_model(exp)       # a new phase: check and complete the model config from its source
    for note in notes:
        say(note)
    pidx, pcount, main = jax.process_index(), jax.process_count(), jax.process_index() == 0
    paths = run_paths(exp.output_dir)
    mesh = make_mesh(exp.mesh.as_dict())
    prepared = prepare(exp)
    dcfg, tokenizer = exp.data, prepared.tokenizer
    exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, **special_token_ids(exp, tokenizer)))
    cfg = exp.model_config()
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {cfg.vocab_size}")
    global_batch, seq_len = dcfg.batch_size * pcount, dcfg.seq_len
    shape = (global_batch, seq_len)
    draft = exp.draft.target is not None
    if draft:                                    # train an EAGLE head on a frozen target (train/draft_step.py)
        setup = draft_setup(exp, cfg, mesh, shape, prepared)
        say(f"draft head for {exp.draft.target}: FR-Spec vocabulary of {setup.fr_ids.size} ids, "
            f"{sum(x.size for x in jax.tree.leaves(setup.abstract_params)) / 1e6:.2f}M trained params")
    else:
        setup = build_step(cfg, mesh, shape, attention=exp.model.attention, optim=exp.optim,
                           total_steps=exp.train.steps, micro_batches=exp.train.micro_batches,
                           loss_chunk=exp.train.loss_chunk_size)
    say(f"run {exp.name}: {cfg.param_count() / 1e6:.1f}M params, mesh {dict(mesh.shape)}, {jax.device_count()} "
        f"devices on {pcount} process(es), global batch {global_batch} x {seq_len} tokens, {exp.train.steps} steps")

    train_it = make_train_iterator(prepared, dcfg, process_index=pidx, process_count=pcount)
    ckpt = Checkpointer(paths["checkpoints"], keep=exp.train.keep_checkpoints, async_save=exp.train.async_checkpoint)
    try:
        check_run_dir(exp, cfg, paths["run"], ckpt.steps())
        if exp.train.resume and ckpt.steps():
            ckpt.reload()
            start, state = restore_or_stop(ckpt, setup.abstract_state(), train_it, say, move=main)
            sync("minicpm:restored")             # process 0 has moved any damaged steps aside
            ckpt.reload()
            say(f"resumed from {paths['checkpoints']}/{start}")
        else:
            start = 0
            state = initial_state(exp, setup)
    except BaseException:
        ckpt.close()
        raise
    if main:                                     # only now: the run has restored or deliberately started
        paths["run"].mkdir(parents=True, exist_ok=True)
        paths["config"].write_text(exp.to_yaml())
        tokenizer.save(paths["tokenizer"])
        if draft:
            record_draft_vocabulary(paths["run"], setup.fr_ids)
        dropped = truncate_metrics(paths["run"], start)
        if dropped:
            say(f"metrics: dropped {dropped} rows logged after step {start} by the interrupted run")

    def evaluate(params) -> dict:
        it = make_eval_iterator(prepared, dcfg, process_index=pidx, process_count=pcount)
        r = eval_loss(setup.eval_step, params, it, exp.train.eval_batches, setup.batch_sharding, shape)
        drop = ("loss_sum", "perplexity") if draft else ("loss_sum",)     # a draft loss is no log-likelihood
        return {k: v for k, v in r.items() if k not in drop}

    peak = peak_flops(jnp.dtype(cfg.dtype))
    writer = MetricsWriter(paths["run"], enabled=main, purge_step=start + 1 if start else None)
    profile_dir = paths["run"] / "profile"
    progress = Progress(exp, start, enabled=main)
    tokens_per_step = global_batch * seq_len
    if setup.plan.sparse:
        say(f"attention: InfLLM v2 sparse ({setup.plan.impl}) at {seq_len} tokens (dense_len "
            f"{cfg.sparse_config.dense_len}); batches must hold one document per row")
    step, t_mark, steps_since = start, None, 0
    interval_dense = []         # per-row plans: each step's dense_rows since t_mark (device scalars, read when logged)
    try:
        with jax.set_mesh(mesh), axis_rules():
            while step < exp.train.steps:
                if step in exp.train.profile_steps:
                    jax.profiler.start_trace(str(profile_dir))
                local = next(train_it)
                if setup.plan.one_document_per_row:
                    check_one_document_per_row(local["segment_ids"])
                batch = to_global(local, setup.batch_sharding, shape)
                state, metrics = setup.train_step(state, batch)
                step += 1
                steps_since += 1
                if "dense_rows" in metrics:
                    interval_dense.append(metrics["dense_rows"])
                if step - 1 in exp.train.profile_steps:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                if step % exp.train.log_every == 0 or step == exp.train.steps:
                    m = to_python(metrics)
                    now = time.perf_counter()
                    if t_mark is not None:               # the first interval includes compilation
                        dt = (now - t_mark) / steps_since
                        # rows that chose dense (shorter than dense_len) count dense attention, the rest InfLLM v2
                        flops = (sum(setup.flops_per_step(float(d)) for d in jax.device_get(interval_dense))
                                 if interval_dense else setup.flops_per_step() * steps_since)
                        m.update(step_time=dt, tokens_per_s=tokens_per_step / dt, mfu=flops / (now - t_mark) / peak)
                    t_mark, steps_since, interval_dense = now, 0, []
                    writer.write(step, "train", m)
                    if not math.isfinite(m["loss"]) or not math.isfinite(m["grad_norm"]):
                        raise FloatingPointError(
                            f"step {step}: loss {m['loss']} / grad norm {m['grad_norm']} is not finite; stopping "
                            f"(last good checkpoint: {ckpt.latest_step()}). Lower optim.peak_lr, check the data, "
                            "or compare model.attention=dense to isolate the attention path.")
                    progress.metrics(step, m)
                progress.update(step)
                paused = time.perf_counter()
                if step % exp.train.eval_every == 0 or step == exp.train.steps:
                    e = evaluate(state.params)
                    writer.write(step, "eval", e)
                    progress.write(f"step {step}: eval loss {e['loss']:.4f}, " + ", ".join(
                        f"{k} {v:.4g}" for k, v in e.items() if k not in ("loss", "tokens")))
                if step % exp.train.checkpoint_every == 0 or step == exp.train.steps:
                    ckpt.save(step, state, train_it, {"step": step, "tokens_seen": step * tokens_per_step,
                                                      "seed": exp.seed, "config": exp.to_dict()})
                    fault_point("during_save", step)
                if t_mark is not None:                   # eval / checkpoint time is not training throughput
                    t_mark += time.perf_counter() - paused
                if os.environ.get("MINICPM_FAULT", "").startswith("after_step:"):
                    ckpt.wait()
                    fault_point("after_step", step)
    finally:
        progress.close()
        ckpt.close()
        writer.close()
    return TrainResult(exp, cfg, state.params, tokenizer, paths["run"], step, setup if draft else None)


def draft_setup(exp: ExperimentConfig, cfg: ModelConfig, mesh, shape, prepared) -> DraftStepSetup:
    """A draft run's step: the frozen target loaded on the mesh (its tokenizer must be the run's), the FR-Spec ids
    counted from the run's data, and the draft's train / eval steps."""
    target = load_weights(exp.draft.target, step=exp.draft.target_step, mesh=mesh, dtype=jnp.dtype(cfg.param_dtype))
    tok = prepared.tokenizer
    probe = "The draft head reads 42 features. 中文"
    if target.tokenizer is not None and (target.tokenizer.vocab_size != tok.vocab_size
                                         or target.tokenizer.encode(probe) != tok.encode(probe)):
        raise ValueError(f"draft.target={exp.draft.target}: its tokenizer ({target.tokenizer.vocab_size} ids) is not "
                         f"the run's data tokenizer ({tok.vocab_size} ids, from {prepared.tokenizer_dir}); set "
                         "data.tokenizer.path to the target's tokenizer")
    say(f"draft target: {target.describe()}")
    return build_draft_step(exp, cfg, mesh, shape, target.params, draft_vocabulary(exp, prepared, cfg))


def record_draft_vocabulary(run_dir: Path, fr_ids: np.ndarray) -> None:
    """Write the FR-Spec ids beside the run (`draft_vocabulary.json`); a resumed run must count the same ones."""
    path = run_dir / "draft_vocabulary.json"
    ids = [int(i) for i in fr_ids]
    if path.exists():
        old = records.read_json(path)["ids"]
        if old != ids:
            raise ValueError(f"{path}: the run counted a different FR-Spec vocabulary ({len(old)} ids) than this "
                             f"resume ({len(ids)} ids): its data or draft settings changed. Use a new output_dir")
        return
    records.write_json(path, {"ids": ids, "size": len(ids)})
