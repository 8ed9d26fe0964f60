"""One process, 2 devices, fed exactly the global batches that 2 processes of 1 device each would build:
process p contributes the rows of `make_train_iterator(..., process_index=p, process_count=2)`, in process order.
Prints the per-step losses as JSON. Run: python -m tests.train.multihost_reference OUT.json OVERRIDES..."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np


def main(out_path, overrides):
    from data_pipeline.pipeline import make_train_iterator
    from data_pipeline.prepare import prepare_data
    from minicpm_jax.model import abstract_params, init_params, param_logical_axes
    from minicpm_jax.sharding import axis_rules, make_mesh
    from minicpm_jax.train.config import load_config
    from minicpm_jax.train.loop import to_global
    from minicpm_jax.train.optimizer import make_optimizer
    from minicpm_jax.train.step import TrainState, batch_sharding, jit_train_step, make_train_step, state_shardings

    assert jax.device_count() == 2
    exp = load_config("experiments/configs/tiny.yaml", overrides)
    dcfg = exp.data
    prepared = prepare_data(exp.data_dir, dcfg, progress=False)
    tok = prepared.tokenizer
    cfg = exp.model_config().replace(bos_token_id=tok.bos_id, eos_token_id=(tok.eos_id, tok.im_end_id),
                                     pad_token_id=tok.pad_id)
    mesh = make_mesh(exp.mesh.as_dict())
    its = [make_train_iterator(prepared, dcfg, process_index=p, process_count=2) for p in range(2)]
    ap = abstract_params(cfg)
    tx, sched = make_optimizer(exp.optim, cfg, ap, exp.train.steps)
    sh = state_shardings(mesh, ap, param_logical_axes(cfg), tx)
    params = init_params(cfg, jax.random.key(exp.seed), mesh=mesh)
    state = TrainState(jax.device_put(jnp.int32(0), sh.step), params, jax.jit(tx.init, out_shardings=sh.opt_state)(params))
    shape = (2 * dcfg.batch_size, dcfg.seq_len)
    step = jit_train_step(make_train_step(cfg, tx, sched), mesh, sh, shape)
    losses = []
    with jax.set_mesh(mesh), axis_rules():
        for _ in range(exp.train.steps):
            parts = [next(it) for it in its]
            local = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            state, m = step(state, to_global(local, batch_sharding(mesh, shape), shape))
            losses.append(float(m["loss"]))
    with open(out_path, "w") as f:
        json.dump(losses, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
