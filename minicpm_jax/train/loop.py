"""The training run: data -> sharded jitted steps -> eval / checkpoints / metrics -> samples and exports.

`run(exp)` is the whole main job. It runs unchanged on one CPU, 8 fake CPU devices, one GPU or a pod: the mesh,
batch and model size come from the config, `jax.distributed` joins the hosts, and each process feeds its own slice of
the global batch (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from minicpm_jax.config import ModelConfig
from minicpm_jax.model import abstract_params, init_params, param_logical_axes, uses_sparse
from minicpm_jax.sharding import axis_rules, make_mesh
from minicpm_jax.train.checkpoint import Checkpointer, load_run_params, run_paths
from minicpm_jax.train.config import ExperimentConfig, json_ready
from minicpm_jax.train.loss import check_one_document_per_row
from minicpm_jax.train.metrics import (MetricsWriter, measure_matmul_peak, plot_losses, to_python,
                                       train_flops_per_token)
from minicpm_jax.train.optimizer import make_optimizer
from minicpm_jax.train.step import (BATCH_KEYS, TrainState, abstract_state, batch_sharding, jit_eval_step,
                                    jit_train_step, make_eval_step, make_train_step, state_shardings, with_shardings)

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
class RunSummary:
    run_dir: Path
    steps: int
    train_losses: list[tuple[int, float]]
    eval_losses: list[tuple[int, float]]
    outputs: dict[str, str]
    samples: list[str]


def check_batch_layout(global_batch: int, micro: int, mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % micro:
        raise ValueError(f"global batch {global_batch} (data.batch_size x processes) is not divisible by "
                         f"train.micro_batches={micro}")
    if (global_batch // micro) % shards:
        raise ValueError(f"micro-batch of {global_batch // micro} rows does not split over the {shards} batch shards "
                         f"(mesh data x fsdp); adjust data.batch_size, train.micro_batches or the mesh")


def to_global(local: dict, sharding: NamedSharding, global_shape) -> dict:
    """Process-local numpy batch -> global jax arrays laid out by `sharding`."""
    out = {}
    for k in BATCH_KEYS:
        x = np.asarray(local[k], np.int32) if k in local else np.ones(local["input_ids"].shape, np.int32)
        out[k] = jax.make_array_from_process_local_data(sharding, x, global_shape)
    return out


def eval_loss(eval_fn, params, it, batches: int, sharding: NamedSharding, global_shape) -> dict:
    """Token-weighted held-out loss of `params` over at most `batches` batches of the eval iterator `it`.

    Returns {"loss", "perplexity", "tokens", "loss_sum"}; eval_fn(params, batch) -> {"loss_sum", "target_tokens"}.
    """
    tot = n = 0.0
    for local in itertools.islice(it, batches):
        m = to_python(eval_fn(params, to_global(local, sharding, global_shape)))
        tot, n = tot + m["loss_sum"], n + m["target_tokens"]
    loss = tot / max(n, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": n, "loss_sum": tot}


def initial_params(exp: ExperimentConfig, cfg: ModelConfig, mesh):
    """Fresh μP init, or the weights of `train.init_from` (HF dir or run dir) for a new phase."""
    src = exp.train.init_from
    if src is None:
        return init_params(cfg, jax.random.key(exp.seed), mesh=mesh)
    from minicpm_jax.convert.hf import load_hf
    if (Path(src) / "config.json").exists():
        _, params = load_hf(src, dtype=jnp.dtype(cfg.param_dtype), mesh=mesh)
    else:
        _, _, params = load_run_params(src, exp.train.init_from_step, mesh)
    want = abstract_params(cfg)
    bad = [jax.tree_util.keystr(p) for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(want),
                                                           jax.tree.leaves(params)) if a.shape != b.shape]
    if jax.tree.structure(want) != jax.tree.structure(params) or bad:
        raise ValueError(f"train.init_from={src}: its weights do not fit model config (mismatched: {bad or 'tree'})")
    say(f"initialised from {src} (a new phase: fresh optimizer state and schedule)")
    return jax.tree.map(lambda x: x.astype(cfg.param_dtype), params)


def special_token_ids(exp: ExperimentConfig, tokenizer) -> dict:
    """BOS / EOS / pad ids of the model: its tokenizer's for a fresh model, the source checkpoint's for a new phase
    (`train.init_from`). Ids set explicitly in the experiment's model section win over both."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    src = exp.train.init_from
    if src is None:
        return dict(bos_token_id=tokenizer.bos_id, eos_token_id=[tokenizer.eos_id, tokenizer.im_end_id],
                    pad_token_id=tokenizer.pad_id)
    if (Path(src) / "config.json").exists():
        from minicpm_jax.convert.hf import read_config
        src_cfg = read_config(src)
    else:
        from minicpm_jax.train.config import load_config
        src_cfg = load_config(run_paths(src)["config"]).model_config()
    ids = {k: getattr(src_cfg, k) for k in keys}
    ids["eos_token_id"] = list(src_cfg.eos_ids)
    return ids


def prepare(exp: ExperimentConfig):
    """Data preparation on process 0 (cached on disk), then every process opens the prepared data."""
    from jax.experimental import multihost_utils
    from data_pipeline.prepare import prepare_data
    dcfg = exp.data_config()
    if jax.process_index() == 0:
        prepared = prepare_data(exp.data_dir, dcfg)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("minicpm:data-prepared")
        if jax.process_index() != 0:
            prepared = prepare_data(exp.data_dir, dcfg)
    return dcfg, prepared


def run(exp: ExperimentConfig) -> RunSummary:
    init_distributed(exp.distributed)
    from data_pipeline.pipeline import make_eval_iterator, make_train_iterator
    from tqdm import tqdm

    pidx, pcount, main = jax.process_index(), jax.process_count(), jax.process_index() == 0
    paths = run_paths(exp.output_dir)
    mesh = make_mesh(exp.mesh.as_dict())
    dcfg, prepared = prepare(exp)
    tokenizer = prepared.tokenizer
    exp = dataclasses.replace(exp, model={**special_token_ids(exp, tokenizer), **exp.model})  # saved in config.yaml
    cfg = exp.model_config()
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {cfg.vocab_size}")
    global_batch, seq_len = dcfg.batch_size * pcount, dcfg.seq_len
    check_batch_layout(global_batch, exp.train.micro_batches, mesh)
    if main:
        paths["run"].mkdir(parents=True, exist_ok=True)
        paths["config"].write_text(exp.to_yaml())
        tokenizer.save(paths["tokenizer"])
    say(f"run {exp.name}: {cfg.param_count() / 1e6:.1f}M params, mesh {dict(mesh.shape)}, {jax.device_count()} "
        f"devices on {pcount} process(es), global batch {global_batch} x {seq_len} tokens, {exp.train.steps} steps")

    train_it = make_train_iterator(prepared, dcfg, process_index=pidx, process_count=pcount)
    ap = abstract_params(cfg)
    tx, schedule = make_optimizer(exp.optim, cfg, ap, exp.train.steps)
    st_sh = state_shardings(mesh, ap, param_logical_axes(cfg), tx)
    ckpt = Checkpointer(paths["checkpoints"], keep=exp.train.keep_checkpoints, async_save=exp.train.async_checkpoint)
    restored = None
    if exp.train.resume and ckpt.steps():
        restored = ckpt.restore_latest(with_shardings(abstract_state(ap, tx), st_sh), train_it)
    if restored is not None:
        start, state, _ = restored
        say(f"resumed from {paths['checkpoints']}/{start}")
    else:
        start = 0
        params = initial_params(exp, cfg, mesh)
        opt_state = jax.jit(tx.init, out_shardings=st_sh.opt_state)(params)
        state = TrainState(step=jax.device_put(jnp.int32(0), st_sh.step), params=params, opt_state=opt_state)

    bsh = batch_sharding(mesh, (global_batch, seq_len))
    step_fn = jit_train_step(make_train_step(cfg, tx, schedule, micro_batches=exp.train.micro_batches,
                                             attention=exp.train.attention, loss_chunk=exp.train.loss_chunk_size),
                             mesh, st_sh, (global_batch, seq_len))
    eval_fn = jit_eval_step(make_eval_step(cfg, attention=exp.train.attention, loss_chunk=exp.train.loss_chunk_size),
                            mesh, st_sh.params, (global_batch, seq_len))

    def evaluate(params) -> dict:
        it = make_eval_iterator(prepared, dcfg, process_index=pidx, process_count=pcount)
        r = eval_loss(eval_fn, params, it, exp.train.eval_batches, bsh, (global_batch, seq_len))
        return {k: r[k] for k in ("loss", "perplexity", "tokens")}

    peak = measure_matmul_peak(jnp.dtype(cfg.dtype)) * jax.device_count()
    sparse_train = uses_sparse(cfg, exp.train.attention, seq_len)
    flops_tok = train_flops_per_token(cfg, seq_len, sparse=sparse_train)
    writer = MetricsWriter(paths["run"], enabled=main)
    train_losses, eval_losses = [], []
    profile_dir = paths["run"] / "profile"
    pbar = tqdm(total=exp.train.steps, initial=start, disable=not main, desc=exp.name, unit="step",
                dynamic_ncols=True)
    tokens_per_step = global_batch * seq_len
    if sparse_train:
        say(f"attention: InfLLM v2 sparse ({cfg.sparse_impl}) at {seq_len} tokens (dense_len "
            f"{cfg.sparse_config.dense_len}); batches must hold one document per row")
    step, t_mark, steps_since = start, None, 0
    try:
        with jax.set_mesh(mesh), axis_rules():
            while step < exp.train.steps:
                if step in exp.train.profile_steps:
                    jax.profiler.start_trace(str(profile_dir))
                local = next(train_it)
                if sparse_train:
                    check_one_document_per_row(local["segment_ids"])
                batch = to_global(local, bsh, (global_batch, seq_len))
                state, metrics = step_fn(state, batch)
                step += 1
                steps_since += 1
                if step - 1 in exp.train.profile_steps:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                if step % exp.train.log_every == 0 or step == exp.train.steps:
                    m = to_python(metrics)
                    now = time.perf_counter()
                    if t_mark is not None:               # the first interval includes compilation
                        dt = (now - t_mark) / steps_since
                        m.update(step_time=dt, tokens_per_s=tokens_per_step / dt,
                                 mfu=flops_tok * tokens_per_step / dt / peak)
                    t_mark, steps_since = now, 0
                    train_losses.append((step, m["loss"]))
                    writer.write(step, "train", m)
                    if not math.isfinite(m["loss"]) or not math.isfinite(m["grad_norm"]):
                        raise FloatingPointError(
                            f"step {step}: loss {m['loss']} / grad norm {m['grad_norm']} is not finite; stopping "
                            f"(last good checkpoint: {ckpt.latest_step()}). Lower optim.peak_lr, check the data, "
                            "or compare attention=dense to isolate the attention path.")
                    pbar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m.get('tokens_per_s', 0):,.0f}",
                                     mfu=f"{100 * m.get('mfu', 0):.0f}%")
                pbar.update(step - pbar.n)
                if step % exp.train.eval_every == 0 or step == exp.train.steps:
                    e = evaluate(state.params)
                    eval_losses.append((step, e["loss"]))
                    writer.write(step, "eval", e)
                    pbar.write(f"step {step}: eval loss {e['loss']:.4f}, perplexity {e['perplexity']:.2f}") \
                        if main else None
                    t_mark = None                        # eval time is not training throughput
                if step % exp.train.checkpoint_every == 0 or step == exp.train.steps:
                    ckpt.save(step, state, train_it, {"step": step, "tokens_seen": step * tokens_per_step,
                                                      "seed": exp.seed, "config": json_ready(dataclasses.asdict(exp))})
                    fault_point("during_save", step)
                    t_mark = None
                if os.environ.get("MINICPM_FAULT", "").startswith("after_step:"):
                    ckpt.wait()
                    fault_point("after_step", step)
    finally:
        pbar.close()
        ckpt.close()
        writer.close()

    outputs = {"run_dir": str(paths["run"]), "checkpoints": str(paths["checkpoints"]),
               "metrics": str(paths["run"] / "logs" / "metrics.jsonl"),
               "tensorboard": str(paths["run"] / "logs" / "tensorboard")}
    samples = []
    if main:
        outputs["loss_plot"] = str(plot_losses(paths["run"]))
    if pcount == 1:
        samples = sample_text(state.params, cfg, tokenizer, exp.train.sample_prompts, exp.train.sample_tokens,
                              chat=exp.train.sample_chat)
    outputs.update(export_run(exp, cfg, state.params, tokenizer, paths["run"]))
    summary = RunSummary(paths["run"], step, train_losses, eval_losses, outputs, samples)
    if main:
        (paths["run"] / "summary.json").write_text(json.dumps(
            {"steps": step, "train_losses": train_losses, "eval_losses": eval_losses, "outputs": outputs,
             "samples": samples}, indent=2, ensure_ascii=False) + "\n")
        print_summary(summary)
    return summary


def sample_text(params, cfg: ModelConfig, tokenizer, prompts, n_tokens: int, chat: bool = False) -> list[str]:
    """Greedy continuations of the prompts (chat: as a ChatML user turn, answered until <|im_end|>)."""
    from minicpm_jax.decode import generate
    if not prompts:
        return []
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
             if chat else p for p in prompts]
    ids = [tokenizer.encode(t, add_bos=True) for t in texts]
    out = generate(params, cfg, ids, max_new_tokens=n_tokens, temperature=0.0)
    return [p + " -> " + tokenizer.decode([t for t in seq if t not in cfg.eos_ids]) if chat
            else p + tokenizer.decode(seq) for p, seq in zip(prompts, out.sequences())]


def export_run(exp: ExperimentConfig, cfg: ModelConfig, params, tokenizer, run_dir: Path) -> dict[str, str]:
    """HF directory and GGUF files of the final weights (as configured)."""
    out = {}
    if exp.export.hf:
        from minicpm_jax.export.hf_export import export_hf
        path = export_hf(run_dir / "export" / "hf", cfg, params, tokenizer)
        out["hf"] = str(path)
    if exp.export.gguf_qtypes:
        from minicpm_jax.convert.hf import to_host
        host = jax.tree.map(to_host, params)            # every process takes part in the gather
    for q in exp.export.gguf_qtypes:
        from minicpm_jax.export.gguf import to_gguf
        if jax.process_index() == 0:
            path = to_gguf(run_dir / "export" / f"{exp.name}-{q}.gguf", cfg, host, tokenizer, qtype=q)
            out[f"gguf_{q}"] = str(path.path)
    return out


def print_summary(s: RunSummary):
    first = s.train_losses[0][1] if s.train_losses else float("nan")
    last = s.train_losses[-1][1] if s.train_losses else float("nan")
    lines = [f"\n=== run finished: {s.steps} steps, train loss {first:.3f} -> {last:.3f}"]
    if s.eval_losses:
        lines.append(f"    eval loss {s.eval_losses[0][1]:.3f} (step {s.eval_losses[0][0]}) -> "
                     f"{s.eval_losses[-1][1]:.3f} (step {s.eval_losses[-1][0]})")
    for k, v in s.outputs.items():
        lines.append(f"    {k:<12} {v}")
    for t in s.samples:
        lines.append(f"    sample: {t!r}")
    print("\n".join(lines), flush=True)
