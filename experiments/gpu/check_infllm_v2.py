"""GPU check of the InfLLM v2 Pallas kernels (one H200): correctness vs the references, then speed vs dense.

How to run (one command, from the repo root, on a machine with JAX 0.10.2 + jax[cuda12]):

    python experiments/gpu/check_infllm_v2.py            # ~3-5 min on one H200, < 8 min budget
    python experiments/gpu/check_infllm_v2.py --lens 32768   # a shorter run
    python experiments/gpu/check_infllm_v2.py --smoke        # tiny sizes on CPU (interpret mode): checks the script

What it prints:
  1. measured peaks of this GPU in this run: HBM read bandwidth (large bf16 reduction) and bf16 matmul rate;
  2. correctness, bf16 inputs, MiniCPM4-8B attention shape (32 q heads, 2 KV heads, D=128) and the 0.5B group (8):
     each Pallas kernel (forward, backward dq/dk/dv, decode) against its plain-JAX reference on the same block
     lists (relative max error), and the end-to-end impl="pallas" against impl="xla" (same selection code);
  3. a timing table at 32K / 64K / 128K tokens: sparse (XLA selection + Pallas kernel; selection time shown
     separately) vs dense causal attention (jax.nn.dot_product_attention, implementation="cudnn"; if cuDNN is
     unavailable, the Pallas Triton flash kernel jax.experimental.pallas.ops.gpu.attention.mha) for the forward,
     forward+backward and one decode step (cache of that length, batch 1; dense decode = cuDNN or XLA), each with
     its achieved fraction of the measured FLOP rate (fwd, bwd: useful FLOPs only) or bandwidth (decode).
Every section catches its own errors and prints them, so one failure does not hide the rest of the table.
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
                                update_compressed_cache)
from minicpm_jax.sparse.decode import decode_block_lists  # noqa: E402
from minicpm_jax.sparse.select import attended_pairs, query_positions, select_block_lists  # noqa: E402
from pallas_kernels.infllm_v2_bwd import infllm_v2_attention_pallas, infllm_v2_vjp_reference  # noqa: E402
from pallas_kernels.infllm_v2_decode import infllm_v2_decode_kernel, infllm_v2_decode_reference  # noqa: E402
from pallas_kernels.infllm_v2_fwd import infllm_v2_fwd, infllm_v2_fwd_reference  # noqa: E402

CFG = SparseConfig(dense_len=-1)
DT = jnp.bfloat16


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


@section("correctness: Pallas kernels vs their references (bf16 in, fp32 accumulate)")
def correctness(smoke, interpret):
    t = 256 if smoke else 4096
    cfg = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, window_size=32, topk=4, dense_len=-1) \
        if smoke else SparseConfig(window_size=512, topk=16, dense_len=-1)  # sparse at 4K: 16+8 of 64 blocks
    for hq, hkv in ((32, 2), (16, 2)):
        q, k, v = inputs(t, hq, hkv, 64 if smoke else 128, seed=hq)
        lists = jax.jit(lambda q_, k_: select_block_lists(q_, k_, cfg))(q, k)
        pos = query_positions(1, t, t, None)
        o, lse = jax.jit(lambda *a: infllm_v2_fwd(*a, block_size=cfg.block_size, interpret=interpret))(
            q, k, v, lists.idx, lists.count, pos)
        o_r, lse_r = jax.jit(lambda *a: infllm_v2_fwd_reference(*a, block_size=cfg.block_size))(
            q, k, v, lists.idx, lists.count, pos)
        do = jax.random.normal(jax.random.key(5), q.shape, DT)
        f = lambda a, b_, c: infllm_v2_attention_pallas(a, b_, c, lists.idx, lists.count, pos,
                                                        block_size=cfg.block_size, interpret=interpret)
        g = jax.jit(lambda a, b_, c: jax.vjp(f, a, b_, c)[1](do))(q, k, v)
        g_r = jax.jit(lambda a, b_, c: infllm_v2_vjp_reference(a, b_, c, lists.idx, lists.count, pos, do,
                                                                block_size=cfg.block_size))(q, k, v)
        errs = [rel(o, o_r), rel(lse, lse_r)] + [rel(x, y) for x, y in zip(g, g_r)]
        print(f"   G={hq // hkv:>2} fwd o {errs[0]:.1e} lse {errs[1]:.1e} | bwd dq {errs[2]:.1e} dk {errs[3]:.1e} "
              f"dv {errs[4]:.1e}   {'OK' if max(errs) < 3e-2 else 'MISMATCH'}")
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
        print(f"   G={hq // hkv:>2} decode {rel(od, od_r):.1e}   {'OK' if rel(od, od_r) < 3e-2 else 'MISMATCH'}")
    # end to end: the same selection feeds both, so pallas == xla up to bf16 rounding
    q, k, v = inputs(t, 32, 2, 64 if smoke else 128, seed=7)
    o_p = jax.jit(lambda *a: infllm_v2_attention(*a, cfg, "pallas", interpret=interpret))(q, k, v)
    o_x = jax.jit(lambda *a: infllm_v2_attention(*a, cfg, "xla"))(q, k, v)
    print(f"   end-to-end impl=pallas vs impl=xla: {rel(o_p, o_x):.1e}")


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


@section("timing: sparse (XLA selection + Pallas) vs dense, B=1, 32 q heads / 2 KV heads, D=128, bf16")
def timing(lens, pk, smoke, interpret):
    name, dense, dense_dec = dense_attention(interpret)
    hq, hkv, d = (32, 2, 64) if smoke else (32, 2, 128)
    cfg = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, window_size=32, topk=4, dense_len=-1) \
        if smoke else CFG
    rows = []
    for t in lens:
        try:
            q, k, v = inputs(t, hq, hkv, d)
            pos = query_positions(1, t, t, None)
            sel = jax.jit(lambda q_, k_: select_block_lists(q_, k_, cfg, chunk=2048))
            lists = sel(q, k)
            t_sel = timed(sel, q, k, reps=3)
            fwd = jax.jit(lambda q_, k_, v_, i, c: infllm_v2_attention_pallas(q_, k_, v_, i, c, pos,
                                                                            block_size=cfg.block_size,
                                                                            interpret=interpret))
            t_fwd = timed(fwd, q, k, v, lists.idx, lists.count, reps=3)
            do = jnp.ones_like(q)
            fb = jax.jit(lambda q_, k_, v_, i, c: jax.vjp(
                lambda a, b_, c_: infllm_v2_attention_pallas(a, b_, c_, i, c, pos, block_size=cfg.block_size,
                                                             interpret=interpret), q_, k_, v_)[1](do))
            t_fb = timed(fb, q, k, v, lists.idx, lists.count, reps=3)
            d_fwd = jax.jit(dense)
            t_dfwd = timed(d_fwd, q, k, v, reps=3)
            d_fb = jax.jit(lambda q_, k_, v_: jax.vjp(dense, q_, k_, v_)[1](do))
            t_dfb = timed(d_fb, q, k, v, reps=3)
            pairs = attended_pairs(lists, cfg.block_size) * (hq // hkv)  # (query head, key) pairs
            sp_fl = 4 * d * pairs
            de_fl = 4 * d * hq * t * (t + 1) / 2
            # decode with a cache of t keys
            lengths = jnp.array([t])
            cc = compressed_cache_from_keys(k, lengths - 1, cfg)
            qd = q[:, -1:]

            @jax.jit
            def sp_dec(qd_, k_, v_, cc_):
                cc_ = update_compressed_cache(cc_, k_, lengths, cfg)
                dl = decode_block_lists(qd_, k_, lengths, cc_, cfg)
                return infllm_v2_decode_kernel(qd_, k_, v_, dl.idx, dl.count, (lengths - 1)[:, None],
                                               block_size=cfg.block_size, interpret=interpret)

            t_sdec = timed(sp_dec, qd, k, v, cc, reps=10)
            de_dec = jax.jit(dense_dec)
            t_ddec = timed(de_dec, qd, k, v, reps=10)
            esz = 2
            dec_dense_bytes = 2 * t * hkv * d * esz
            dec_sparse_bytes = cc.kc.shape[1] * hkv * d * cc.kc.dtype.itemsize + \
                2 * (cfg.topk + cfg.window_blocks) * cfg.block_size * hkv * d * esz
            rows.append((t, t_sel, t_fwd, t_dfwd, t_fb, t_dfb, t_sdec, t_ddec, sp_fl, de_fl, dec_sparse_bytes,
                         dec_dense_bytes))
            print(f"   T={t}: done", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"   T={t}: FAILED {type(e).__name__}: {str(e)[:1500]}")
    fl, bw = pk["flops"], pk["bw"]
    print(f"\n   dense = {name}.  times in ms; (x%) = achieved fraction of measured peak FLOP rate / bandwidth")
    print(f"   {'T':>6} | {'select':>7} {'sparse fwd':>16} {'dense fwd':>16} {'ratio':>6} | {'sparse f+b':>16} "
          f"{'dense f+b':>16} {'ratio':>6} | {'sparse dec':>14} {'dense dec':>14} {'ratio':>6}")
    for (t, ts, tf, tdf, tfb, tdfb, tsd, tdd, sfl, dfl, sb, db) in rows:
        tl = f"{t // 1024}K" if t >= 1024 else str(t)
        print(f"   {tl:>6} | {ts * 1e3:>7.2f} {tf * 1e3:>8.2f} ({sfl / tf / fl:>4.0%}) "
              f"{tdf * 1e3:>8.2f} ({dfl / tdf / fl:>4.0%}) {(ts + tf) / tdf:>6.3f} | "
              f"{tfb * 1e3:>8.2f} ({3.5 * sfl / tfb / fl:>4.0%}) {tdfb * 1e3:>8.2f} ({3.5 * dfl / tdfb / fl:>4.0%}) "
              f"{(ts + tfb) / tdfb:>6.3f} | {tsd * 1e3:>6.3f} ({sb / tsd / bw:>4.0%}) {tdd * 1e3:>6.3f} "
              f"({db / tdd / bw:>4.0%}) {tsd / tdd:>6.3f}")
    print("   ratios include the selection for sparse; f+b FLOPs counted as 3.5x forward (fwd + dq + dk/dv)")


def main(argv=None):
    p = argparse.ArgumentParser(description="InfLLM v2 Pallas kernels on one GPU: correctness and speed")
    p.add_argument("--lens", type=int, nargs="*", default=None, help="sequence / cache lengths to time")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, interpret mode on CPU (checks the script)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    interpret = a.smoke or jax.default_backend() != "gpu"
    if interpret and not a.smoke:
        print("no GPU found: running in interpret mode (slow) - use --smoke on CPU")
    lens = a.lens or ([256, 512] if a.smoke else [32768, 65536, 131072])
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    pk = peaks(a.smoke) or {"bw": float("nan"), "flops": float("nan")}
    correctness(a.smoke, interpret)
    timing(lens, pk, a.smoke, interpret)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
