"""GPU check of InfLLM v2, both variants: the Pallas kernels vs the references, then speed vs dense (one H100/H200).

How to run (one command, from the repo root, on a machine with JAX 0.10.2 + jax[cuda12]):

    python experiments/gpu/check_infllm_v2.py            # both variants, 32K/64K/128K: ~4-7 min on one H100
    python experiments/gpu/check_infllm_v2.py --lens 32768 --variants minicpm4.1   # a shorter run
    python experiments/gpu/check_infllm_v2.py --smoke        # tiny sizes on CPU (interpret mode): checks the script

Variants (SparseConfig.variant, each with its default lse_approx): "minicpm4" (June 2025: window outside a top-k
that counts the init blocks, exact softmax normaliser) and "minicpm4.1" (official kernels since 2025-08-25: init and
n+1 local blocks forced inside a top-(topk+n), coarse-kernel LSE normaliser). Both attend "init + a local band of
cfg.local_blocks blocks + cfg.topk_slots top-k picks"; the Pallas kernels consume the block lists either way.

What it prints:
  1. measured peaks of this GPU in this run: HBM read bandwidth (large bf16 reduction) and bf16 matmul rate;
  2. correctness, bf16 inputs, MiniCPM4-8B attention shape (32 q heads, 2 KV heads, D=128) and the 0.5B group (8),
     per variant: each Pallas kernel (forward, backward dq/dk/dv, decode) against its plain-JAX reference on the same
     block lists (relative max error); then end to end against the exact reference (sparse/reference.py: its own
     selection at precision "highest", masked dense attention): the fraction of (row, block) selection entries on
     which the XLA selection (what the kernels get) agrees with the reference's, and the output error of
     impl="pallas" (forward and decode) on the rows whose selection agrees (bf16 inputs make near-ties in the
     scores flip a few blocks; on GPU an fp32 XLA matmul may also run in TF32);
  3. a timing table at 32K / 64K / 128K tokens, per variant: sparse (XLA selection + Pallas kernel; selection time
     shown separately) vs dense causal attention (jax.nn.dot_product_attention, implementation="cudnn"; if cuDNN is
     unavailable, the Pallas Triton flash kernel jax.experimental.pallas.ops.gpu.attention.mha) for the forward,
     forward+backward and one decode step (cache of that length, batch 1; dense decode = cuDNN or XLA), each with
     its achieved fraction of the measured FLOP rate (fwd, bwd: useful FLOPs only) or bandwidth (decode: the bytes
     that must be read: kernels, coarse kernels with lse_approx, selected K/V blocks); the fwd+bwd speedup
     dense/sparse is the number to set beside the official CUDA kernels' 1.57x / 2.76x / 4.61x over FlashAttention
     at 32K / 64K / 128K on an H100. Dense is timed once per length and shared by the variants.
Every section catches its own errors and prints them, so one failure does not hide the rest of the table. Lengths
that would start after --budget-s seconds are skipped (and said so), so the run ends inside a lease.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from minicpm_jax.sparse import (SparseConfig, compressed_cache_from_keys, infllm_v2_attention,  # noqa: E402
                                infllm_v2_decode, update_compressed_cache)
from minicpm_jax.sparse.config import VARIANTS  # noqa: E402
from minicpm_jax.sparse.decode import decode_block_lists  # noqa: E402
from minicpm_jax.sparse.reference import attention_with_mask_reference, select_blocks_reference  # noqa: E402
from minicpm_jax.sparse.select import (attended_pairs, lists_to_mask, num_blocks, query_positions,  # noqa: E402
                                       select_block_lists)
from pallas_kernels.infllm_v2_bwd import infllm_v2_attention_pallas, infllm_v2_vjp_reference  # noqa: E402
from pallas_kernels.infllm_v2_decode import infllm_v2_decode_kernel, infllm_v2_decode_reference  # noqa: E402
from pallas_kernels.infllm_v2_fwd import infllm_v2_fwd, infllm_v2_fwd_reference  # noqa: E402

DT = jnp.bfloat16
OK_ERR = 3e-2  # bf16 inputs, fp32 accumulation


def make_cfg(variant: str, smoke: bool, full: bool = False) -> SparseConfig:
    """The variant with its default lse_approx. smoke: tiny blocks; full: MiniCPM4's sizes (timing); else a 4K-sized
    config that is still sparse (16 of 64 blocks + the window) for the correctness checks."""
    if smoke:
        return SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, window_size=32, topk=4, dense_len=-1,
                            variant=variant)
    if full:
        return SparseConfig(dense_len=-1, variant=variant)
    return SparseConfig(window_size=512, topk=16, dense_len=-1, variant=variant)


def timed(fn, *args, reps=5):
    """Median wall time (s) of a jitted fn after one compile/warm-up call."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def ok(err):
    return "OK" if err < OK_ERR else "MISMATCH"


def section(title):
    def wrap(fn):
        def run(*a, **k):
            print(f"\n== {title}", flush=True)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            except Exception as e:  # keep going: one failing kernel must not hide the others
                print(f"   FAILED: {type(e).__name__}: {str(e)[:2000]}")
                traceback.print_exc(limit=3)
            finally:
                print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
        return run
    return wrap


def inputs(t, hq=32, hkv=2, d=128, b=1, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, hq, d), DT)
    k = jax.random.normal(ks[1], (b, t, hkv, d), DT)
    v = jax.random.normal(ks[2], (b, t, hkv, d), DT)
    return q, k, v


@section("measured peaks")
def peaks(smoke):
    n = (2 ** 20 if smoke else 2 ** 31)  # 4 GiB of bf16
    x = jnp.ones((n,), DT)
    t = timed(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), x)
    bw = 2 * n / t
    del x
    m = 256 if smoke else 8192
    a = jax.random.normal(jax.random.key(1), (m, m), DT)
    t = timed(jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32)), a)
    fl = 2 * m ** 3 / t
    print(f"   HBM read {bw / 1e9:.0f} GB/s, bf16 matmul {fl / 1e12:.0f} TFLOP/s  ({jax.devices()[0].device_kind})")
    return {"bw": bw, "flops": fl}


def _rows_agree(sel_a, sel_b):
    """[B,Hkv,Tq,NB] masks -> bool [B,Tq]: the row's selection agrees in every KV group."""
    return np.asarray((sel_a == sel_b).all(axis=(1, 3)))


def _rel_rows(a, b, rows):
    """rel() over the query rows marked in rows [B,Tq] (a, b: [B,Tq,H,D])."""
    if not rows.any():
        return float("nan")
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)[rows]
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)[rows]
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@section("correctness, per variant: Pallas kernels vs their references; end to end vs the exact reference")
def correctness(smoke, interpret, variants):
    t = 256 if smoke else 4096
    d = 64 if smoke else 128
    for variant in variants:
        cfg = make_cfg(variant, smoke)
        print(f"   -- {variant} (lse_approx {cfg.lse_approx}; local {cfg.local_blocks} blocks + "
              f"{cfg.topk_slots} top-k slots of {num_blocks(t, cfg)} blocks)")
        for hq, hkv in ((32, 2), (16, 2)):
            q, k, v = inputs(t, hq, hkv, d, seed=hq)
            lists = jax.jit(lambda q_, k_: select_block_lists(q_, k_, cfg))(q, k)
            pos = query_positions(1, t, t, None)
            o, lse = jax.jit(lambda *a: infllm_v2_fwd(*a, block_size=cfg.block_size, interpret=interpret))(
                q, k, v, lists.idx, lists.count, pos)
            o_r, lse_r = jax.jit(lambda *a: infllm_v2_fwd_reference(*a, block_size=cfg.block_size))(
                q, k, v, lists.idx, lists.count, pos)
            do = jax.random.normal(jax.random.key(5), q.shape, DT)
            f = lambda a, b_, c, lists=lists, pos=pos: infllm_v2_attention_pallas(
                a, b_, c, lists.idx, lists.count, pos, block_size=cfg.block_size, interpret=interpret)
            g = jax.jit(lambda a, b_, c: jax.vjp(f, a, b_, c)[1](do))(q, k, v)
            g_r = jax.jit(lambda a, b_, c: infllm_v2_vjp_reference(a, b_, c, lists.idx, lists.count, pos, do,
                                                                    block_size=cfg.block_size))(q, k, v)
            errs = [rel(o, o_r), rel(lse, lse_r)] + [rel(x, y) for x, y in zip(g, g_r)]
            print(f"   G={hq // hkv:>2} fwd o {errs[0]:.1e} lse {errs[1]:.1e} | bwd dq {errs[2]:.1e} dk {errs[3]:.1e} "
                  f"dv {errs[4]:.1e}   {ok(max(errs))}")
            # decode: 3 rows of different lengths against a cache of capacity t
            lengths = jnp.array([t, t // 2 + 7, 100])
            qd = q[:1, :1].repeat(3, 0)
            kc, vc = k.repeat(3, 0), v.repeat(3, 0)
            cc = compressed_cache_from_keys(kc, lengths, cfg)
            dl = decode_block_lists(qd, kc, lengths, cc, cfg)
            tpos = (lengths - 1)[:, None]
            od = jax.jit(lambda *a: infllm_v2_decode_kernel(*a, block_size=cfg.block_size, interpret=interpret))(
                qd, kc, vc, dl.idx, dl.count, tpos)
            od_r = infllm_v2_decode_reference(qd, kc, vc, dl.idx, dl.count, tpos, block_size=cfg.block_size)
            print(f"   G={hq // hkv:>2} decode kernel {rel(od, od_r):.1e}   {ok(rel(od, od_r))}")
            # decode end to end: impl="pallas" vs impl="reference" (its own selection from the keys)
            sel_x = lists_to_mask(dl, num_blocks(t, cfg))
            sel_r = jnp.concatenate([select_blocks_reference(qd[i:i + 1], kc[i:i + 1], cfg,
                                                             q_offset=int(lengths[i]) - 1) for i in range(3)])
            rows = _rows_agree(sel_x, sel_r)
            o_p = infllm_v2_decode(qd, kc, vc, lengths, cc, cfg, "pallas", interpret=interpret)
            o_e = infllm_v2_decode(qd, kc, vc, lengths, None, cfg, "reference")
            e = _rel_rows(o_p, o_e, rows)
            print(f"   G={hq // hkv:>2} decode end to end vs reference: selection agrees on {rows.mean():.0%} of "
                  f"rows; error there {e:.1e}   {ok(e) if rows.any() else ''}")
        # prefill end to end: the same selection feeds pallas and xla; the reference selects on its own
        q, k, v = inputs(t, 32, 2, d, seed=7)
        lists = jax.jit(lambda q_, k_: select_block_lists(q_, k_, cfg))(q, k)
        sel_x = lists_to_mask(lists, num_blocks(t, cfg))
        sel_r = select_blocks_reference(q, k, cfg)
        rows = _rows_agree(sel_x, sel_r)
        o_p = jax.jit(lambda *a: infllm_v2_attention(*a, cfg, "pallas", interpret=interpret))(q, k, v)
        o_x = jax.jit(lambda *a: infllm_v2_attention(*a, cfg, "xla"))(q, k, v)
        o_r = attention_with_mask_reference(q, k, v, sel_r, cfg.block_size)
        e = _rel_rows(o_p, o_r, rows)
        agree = float((sel_x == sel_r).mean())
        print(f"   prefill end to end: selection entries agreeing with the reference {agree:.4%}, rows "
              f"{rows.mean():.1%}; impl=pallas vs reference on those rows {e:.1e} {ok(e)}; pallas vs xla "
              f"{rel(o_p, o_x):.1e}")


def _works(fn, *args):
    try:
        jax.block_until_ready(jax.jit(fn)(*args))
        return True
    except Exception as e:  # noqa: BLE001
        print(f"   ({type(e).__name__}: {str(e)[:200]})")
        return False


def dense_attention(interpret):
    """(name, causal fwd fn, decode fn) for the strongest dense attention available."""
    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    def cudnn_dec(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")

    def xla_dec(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")

    q, k, v = inputs(256, 32, 2, 128)
    dec = cudnn_dec if _works(cudnn_dec, q[:, -1:], k, v) else xla_dec
    if _works(cudnn, q, k, v):
        return "cuDNN", cudnn, dec
    print("   cuDNN attention unavailable; dense = Pallas Triton flash (jax.experimental.pallas.ops.gpu.attention)")
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    def flash(q, k, v):
        g = q.shape[2] // k.shape[2]
        k_, v_ = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        return gpu_attention.mha(q, k_, v_, segment_ids=None, sm_scale=1.0 / math.sqrt(q.shape[-1]), causal=True,
                                 interpret=interpret)

    return "triton-flash", flash, dec


def decode_bytes(cc, dl, cfg, d, esz) -> int:
    """Bytes one sparse decode step must read: the stored kernels (fine; coarse with lse_approx) of every KV head
    and the K and V rows of the listed blocks (cfg.local_blocks + up to cfg.topk_slots per KV head)."""
    hkv = cc.kc.shape[2]
    kernels = int(np.asarray(cc.count).sum()) + (0 if cc.kc2 is None else int(np.asarray(cc.count2).sum()))
    keys = int(np.asarray(dl.count).sum()) * cfg.block_size
    return kernels * hkv * d * cc.kc.dtype.itemsize + 2 * keys * d * esz


@section("timing: sparse (XLA selection + Pallas) vs dense, B=1, 32 q heads / 2 KV heads, D=128, bf16")
def timing(lens, pk, smoke, interpret, variants, deadline):
    name, dense, dense_dec = dense_attention(interpret)
    hq, hkv, d = (32, 2, 64) if smoke else (32, 2, 128)
    cfgs = [make_cfg(v, smoke, full=True) for v in variants]
    rows = []
    for t in lens:
        if time.perf_counter() > deadline:
            print(f"   T={t}: skipped (past --budget-s)")
            continue
        try:
            q, k, v = inputs(t, hq, hkv, d)
            pos = query_positions(1, t, t, None)
            do = jax.random.normal(jax.random.key(3), q.shape, DT)  # not ones: a constant cotangent hides errors
            t_dfwd = timed(jax.jit(dense), q, k, v, reps=3)
            t_dfb = timed(jax.jit(lambda q_, k_, v_: jax.vjp(dense, q_, k_, v_)[1](do)), q, k, v, reps=3)
            qd = q[:, -1:]
            t_ddec = timed(jax.jit(dense_dec), qd, k, v, reps=10)
            de_fl = 4 * d * hq * t * (t + 1) / 2
            dec_dense_bytes = 2 * t * hkv * d * 2
            lengths = jnp.array([t])
            for cfg in cfgs:
                sel = jax.jit(lambda q_, k_, cfg=cfg: select_block_lists(q_, k_, cfg, chunk=2048))
                lists = sel(q, k)
                t_sel = timed(sel, q, k, reps=3)
                fwd = jax.jit(lambda q_, k_, v_, i, c, cfg=cfg: infllm_v2_attention_pallas(
                    q_, k_, v_, i, c, pos, block_size=cfg.block_size, interpret=interpret))
                t_fwd = timed(fwd, q, k, v, lists.idx, lists.count, reps=3)
                fb = jax.jit(lambda q_, k_, v_, i, c, cfg=cfg: jax.vjp(
                    lambda a, b_, c_: infllm_v2_attention_pallas(a, b_, c_, i, c, pos, block_size=cfg.block_size,
                                                                 interpret=interpret), q_, k_, v_)[1](do))
                t_fb = timed(fb, q, k, v, lists.idx, lists.count, reps=3)
                sp_fl = 4 * d * attended_pairs(lists, cfg.block_size) * (hq // hkv)  # (query head, key) pairs
                # decode with a cache of t keys (the compressed cache brought up to date inside the step)
                cc = compressed_cache_from_keys(k, lengths - 1, cfg)

                @jax.jit
                def sp_dec(qd_, k_, v_, cc_, cfg=cfg):
                    cc_ = update_compressed_cache(cc_, k_, lengths, cfg)
                    dl = decode_block_lists(qd_, k_, lengths, cc_, cfg)
                    return infllm_v2_decode_kernel(qd_, k_, v_, dl.idx, dl.count, (lengths - 1)[:, None],
                                                   block_size=cfg.block_size, interpret=interpret)

                t_sdec = timed(sp_dec, qd, k, v, cc, reps=10)
                cc1 = update_compressed_cache(cc, k, lengths, cfg)
                dec_sparse_bytes = decode_bytes(cc1, decode_block_lists(qd, k, lengths, cc1, cfg), cfg, d, 2)
                rows.append((t, cfg, t_sel, t_fwd, t_dfwd, t_fb, t_dfb, t_sdec, t_ddec, sp_fl, de_fl,
                             dec_sparse_bytes, dec_dense_bytes))
                print(f"   T={t} {cfg.variant}: done ({time.perf_counter() - T0:.0f} s into the run)", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"   T={t}: FAILED {type(e).__name__}: {str(e)[:1500]}")
    fl, bw = pk["flops"], pk["bw"]
    print(f"\n   dense = {name}.  times in ms; (x%) = achieved fraction of measured peak FLOP rate / bandwidth")
    print(f"   {'T':>5} {'variant':<10} | {'select':>7} {'sparse fwd':>15} {'dense fwd':>15} {'ratio':>6} | "
          f"{'sparse f+b':>15} {'dense f+b':>15} {'ratio':>6} {'speedup':>7} | {'sparse dec':>14} "
          f"{'dense dec':>14} {'ratio':>6}")
    for (t, cfg, ts, tf, tdf, tfb, tdfb, tsd, tdd, sfl, dfl, sb, db) in rows:
        tl = f"{t // 1024}K" if t >= 1024 else str(t)
        print(f"   {tl:>5} {cfg.variant:<10} | {ts * 1e3:>7.2f} {tf * 1e3:>7.2f} ({sfl / tf / fl:>4.0%}) "
              f"{tdf * 1e3:>7.2f} ({dfl / tdf / fl:>4.0%}) {(ts + tf) / tdf:>6.3f} | "
              f"{tfb * 1e3:>7.2f} ({3.5 * sfl / tfb / fl:>4.0%}) {tdfb * 1e3:>7.2f} ({3.5 * dfl / tdfb / fl:>4.0%}) "
              f"{(ts + tfb) / tdfb:>6.3f} {tdfb / (ts + tfb):>6.2f}x | {tsd * 1e3:>6.3f} ({sb / tsd / bw:>4.0%}) "
              f"{tdd * 1e3:>6.3f} ({db / tdd / bw:>4.0%}) {tsd / tdd:>6.3f}")
    print("   ratios include the selection for sparse (speedup = dense f+b / (select + sparse f+b), to set beside the")
    print("   official 1.57x / 2.76x / 4.61x at 32K / 64K / 128K); f+b FLOPs counted as 3.5x forward (fwd + dq +")
    print("   dk/dv); decode bytes = kernels (+ coarse kernels with lse_approx) + the listed K/V blocks")


T0 = time.perf_counter()


def main(argv=None):
    p = argparse.ArgumentParser(description="InfLLM v2 (both variants) on one GPU: Pallas kernels' correctness and "
                                            "speed vs dense")
    p.add_argument("--lens", type=int, nargs="*", default=None, help="sequence / cache lengths to time")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--smoke", action="store_true", help="tiny sizes, interpret mode on CPU (checks the script)")
    p.add_argument("--budget-s", type=float, default=360.0,
                   help="start no new timing length after this many seconds into the run (default 360)")
    a = p.parse_args(argv)
    interpret = a.smoke or jax.default_backend() != "gpu"
    if interpret and not a.smoke:
        print("no GPU found: running in interpret mode (slow) - use --smoke on CPU")
    lens = a.lens or ([256, 512] if a.smoke else [32768, 65536, 131072])
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}; variants {a.variants}")
    pk = peaks(a.smoke) or {"bw": float("nan"), "flops": float("nan")}
    correctness(a.smoke, interpret, a.variants)
    timing(lens, pk, a.smoke, interpret, a.variants, T0 + a.budget_s)
    print(f"\ntotal {time.perf_counter() - T0:.0f} s")


if __name__ == "__main__":
    main()
