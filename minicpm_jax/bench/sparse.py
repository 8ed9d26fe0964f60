"""InfLLM v2 sparse vs dense attention on this machine (CPU by default): decode steps and prefill, per layer.

Run:  minicpm bench sparse [--quick] [--decode-lens 32768 131072] [--prefill-len 32768]

Prints, side by side in one run:
  * the machine's measured peak read bandwidth (a large reduction) and fp32 matmul rate;
  * decode with a 32K / 128K cache at the MiniCPM4-8B attention shape (32 q heads, 2 KV heads, head dim 128):
    sparse step (compressed-cache update + selection + attention, XLA path) vs the fastest of three dense
    baselines; the time ratio beside the byte ratio (bytes sparse must read / bytes dense must read), which is the
    floor for a bandwidth-bound step; each side's achieved fraction of the measured bandwidth;
  * prefill forward at 32K tokens (heads reduced to one KV group of 16 query heads to fit a CPU): sparse XLA path
    vs a flash-style chunked dense XLA attention with causal block skipping (the strongest dense we can build on a
    CPU: jax.nn.dot_product_attention would materialise 32K x 32K logits per head); each side's achieved fraction
    of the measured matmul rate, counting useful FLOPs only.
Goals (issue #3): decode within 1.5x of the byte floor and <= 0.2 at 128K; prefill ratio <= 0.4.
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minicpm_jax.sparse import (SparseConfig, compressed_cache_from_keys, infllm_v2_attention, infllm_v2_decode,
                                update_compressed_cache)
from minicpm_jax.sparse.select import attended_pairs, select_block_lists


# ----------------------------------------------------------------------------------------------- measuring
def best_time(fn, *args, reps: int = 5, min_total: float = 0.5, warmup: bool = True) -> float:
    """Best wall time of fn(*args) over `reps` runs, in seconds. fn must be jitted.

    warmup=False compiles ahead of time instead of running once (for the long prefill runs). The CPU time the
    process used per wall second over the timed runs (how many cores the computation kept busy) is left in
    best_time.cores."""
    if warmup:
        jax.block_until_ready(fn(*args))
    else:
        fn = fn.lower(*args).compile()
    best, total, n, cpu = float("inf"), 0.0, 0, 0.0
    while n < reps or (total < min_total and n < 50):
        c0, t0 = time.process_time(), time.perf_counter()
        jax.block_until_ready(fn(*args))
        dt = time.perf_counter() - t0
        cpu += time.process_time() - c0
        best, total, n = min(best, dt), total + dt, n + 1
    best_time.cores = cpu / total
    return best


def machine_peaks(quick: bool = False) -> dict:
    """Read bandwidth (GB/s) of a large reduction and fp32 matmul rate (GFLOP/s) of a square matmul."""
    n = (64 if quick else 256) * 2 ** 20  # floats: 256 MiB or 1 GiB
    x = jnp.ones((n,), jnp.float32)
    t = best_time(jax.jit(jnp.sum), x)
    bw = 4 * n / t / 1e9
    del x
    m = 2048
    a = jax.random.normal(jax.random.key(0), (m, m), jnp.float32)
    t = best_time(jax.jit(lambda a: a @ a), a)
    return {"bw_gbs": bw, "gflops": 2 * m ** 3 / t / 1e9}


# ---------------------------------------------------------------------------------------- dense baselines
def dense_decode_einsum(q, k, v, lengths):
    """Grouped einsum over the cache layout [B,S,Hkv,D]."""
    b, _, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    qg = q[:, 0].reshape(b, hkv, hq // hkv, d)
    s = jnp.einsum("bgnd,bsgd->bgns", qg, k) / math.sqrt(d)
    s = jnp.where(jnp.arange(s_len)[None, None, None] < lengths[:, None, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bgns,bsgd->bgnd", p, v).reshape(b, 1, hq, d)


def dense_decode_flat(q, k, v, lengths):
    """Block-diagonal queries against the cache viewed as [B, S, Hkv*D]: two contiguous GEMMs, K/V read once."""
    b, _, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    eye = jnp.eye(hkv, dtype=q.dtype)
    qb = (q[:, 0].reshape(b, hkv, g, d)[:, :, :, None, :] * eye[None, :, None, :, None]).reshape(b, hq, hkv * d)
    s = jnp.einsum("bqe,bse->bqs", qb, k.reshape(b, s_len, hkv * d)) / math.sqrt(d)
    s = jnp.where(jnp.arange(s_len)[None, None] < lengths[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bqs,bse->bqe", p, v.reshape(b, s_len, hkv * d)).reshape(b, hkv, g, hkv, d)
    return jnp.einsum("bgnhd,gh->bgnd", o, eye).reshape(b, 1, hq, d)


def dense_decode_sdpa(q, k, v, lengths):
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="xla")


def dense_decode_head_major(q, kt, vt, lengths):
    """Grouped einsum over a head-major cache [B,Hkv,S,D] (a dense decoder's best layout: canonical batched GEMV)."""
    b, _, hq, d = q.shape
    hkv, s_len = kt.shape[1], kt.shape[2]
    qg = q[:, 0].reshape(b, hkv, hq // hkv, d)
    s = jnp.einsum("bgnd,bgsd->bgns", qg, kt) / math.sqrt(d)
    s = jnp.where(jnp.arange(s_len)[None, None, None] < lengths[:, None, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bgns,bgsd->bgnd", p, vt).reshape(b, 1, hq, d)


# name -> (function, cache layout it reads: "bshd" = [B,S,Hkv,D] as the model keeps it, "bhsd" = head-major)
DENSE_DECODE = {"einsum": (dense_decode_einsum, "bshd"), "flat-gemm": (dense_decode_flat, "bshd"),
                "jax.nn.dpa": (dense_decode_sdpa, "bshd"), "head-major": (dense_decode_head_major, "bhsd")}


def dense_flash_prefill(q, k, v, chunk: int = 512):
    """Causal flash-style attention in XLA: scan over query chunks, inner loop over key chunks 0..i only."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    nc = t // chunk
    scale = 1.0 / math.sqrt(d)
    qm = q.reshape(b, nc, chunk, hkv, g, d).transpose(1, 0, 3, 2, 4, 5).reshape(nc, b, hkv, chunk * g, d)
    km = k.transpose(0, 2, 1, 3)  # [B,Hkv,T,D]
    vm = v.transpose(0, 2, 1, 3)
    row_pos = jnp.repeat(jnp.arange(chunk), g)

    def q_step(_, x):
        i, qc = x

        def k_step(j, c):
            acc, m, l = c
            kc = jax.lax.dynamic_slice_in_dim(km, j * chunk, chunk, axis=2)
            vc = jax.lax.dynamic_slice_in_dim(vm, j * chunk, chunk, axis=2)
            s = jnp.einsum("bhmd,bhkd->bhmk", qc, kc) * scale
            causal = (j * chunk + jnp.arange(chunk))[None, :] <= (i * chunk + row_pos)[:, None]
            s = jnp.where(causal, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            a = jnp.exp(m - m_new)
            return a[..., None] * acc + jnp.einsum("bhmk,bhkd->bhmd", p, vc), m_new, a * l + p.sum(-1)

        init = (jnp.zeros(qc.shape, jnp.float32), jnp.full(qc.shape[:-1], -jnp.inf), jnp.zeros(qc.shape[:-1]))
        acc, _, l = jax.lax.fori_loop(0, i + 1, k_step, init)
        return None, acc / l[..., None]

    _, o = jax.lax.scan(q_step, None, (jnp.arange(nc), qm))
    return o.reshape(nc, b, hkv, chunk, g, d).transpose(1, 0, 3, 2, 4, 5).reshape(b, t, hq, d)


# --------------------------------------------------------------------------------------------- decode
def bench_decode(s_len: int, cfg: SparseConfig, peaks: dict, hq=32, hkv=2, d=128) -> dict:
    b = 1
    ks = jax.random.split(jax.random.key(s_len), 3)
    k = jax.random.normal(ks[0], (b, s_len, hkv, d), jnp.float32)
    v = jax.random.normal(ks[1], (b, s_len, hkv, d), jnp.float32)
    q = jax.random.normal(ks[2], (b, 1, hq, d), jnp.float32)
    lengths = jnp.array([s_len], jnp.int32)
    cc = jax.jit(lambda k_: compressed_cache_from_keys(k_, lengths - 1, cfg))(k)

    # A decode loop donates its caches (the update is then in place), so the timed step does too.
    @functools.partial(jax.jit, donate_argnums=(3,))
    def sparse_step(q_, k_, v_, cc_, n):
        cc_ = update_compressed_cache(cc_, k_, n, cfg)          # the new key may complete a kernel
        return infllm_v2_decode(q_, k_, v_, n, cc_, cfg, "xla"), cc_

    out, cc = sparse_step(q, k, v, cc, lengths)
    t_sparse, cpu, wall = float("inf"), 0.0, 0.0
    for _ in range(20):
        c0, t0 = time.process_time(), time.perf_counter()
        out, cc = sparse_step(q, k, v, cc, lengths)
        jax.block_until_ready(out)
        dt = time.perf_counter() - t0
        t_sparse, cpu, wall = min(t_sparse, dt), cpu + time.process_time() - c0, wall + dt
    sparse_cores = cpu / wall
    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    dense_times, dense_cores = {}, {}
    for name, (fn, lay) in DENSE_DECODE.items():
        dense_times[name] = best_time(jax.jit(fn), q, *((k, v) if lay == "bshd" else (kt, vt)), lengths)
        dense_cores[name] = best_time.cores
    dense_name = min(dense_times, key=dense_times.get)
    t_dense = dense_times[dense_name]
    # bytes each side must read: dense = the whole K and V; sparse = all compressed kernels + the selected blocks
    esz = 4
    dense_bytes = 2 * s_len * hkv * d * esz
    n_kernels = int(cc.kc.shape[1])
    lists = jax.jit(lambda q_, k_, kc, n: select_block_lists(q_, k_, cfg, q_offset=n - 1, kc=kc, kernel_count=None,
                                                             chunk=1))(q, k, cc.kc, lengths)
    sel_keys = int(np.minimum(np.asarray(lists.count), 10 ** 9).sum()) * cfg.block_size  # over groups
    sparse_bytes = n_kernels * hkv * d * esz + 2 * sel_keys * d * esz
    bw = peaks["bw_gbs"] * 1e9
    return dict(s_len=s_len, t_dense=t_dense, dense_name=dense_name, dense_times=dense_times, t_sparse=t_sparse,
                dense_cores=dense_cores[dense_name], sparse_cores=sparse_cores,
                ratio=t_sparse / t_dense, byte_ratio=sparse_bytes / dense_bytes,
                dense_bw=dense_bytes / t_dense / bw, sparse_bw=sparse_bytes / t_sparse / bw)


# -------------------------------------------------------------------------------------------- prefill
def bench_prefill(t_len: int, cfg: SparseConfig, peaks: dict, hq=16, hkv=1, d=128, chunk=64) -> dict:
    b = 1
    ks = jax.random.split(jax.random.key(t_len), 3)
    q = jax.random.normal(ks[0], (b, t_len, hq, d), jnp.float32)
    k = jax.random.normal(ks[1], (b, t_len, hkv, d), jnp.float32)
    v = jax.random.normal(ks[2], (b, t_len, hkv, d), jnp.float32)
    sparse = jax.jit(lambda q_, k_, v_: infllm_v2_attention(q_, k_, v_, cfg, "xla", chunk=chunk))
    dense = jax.jit(dense_flash_prefill)
    t_sparse = best_time(sparse, q, k, v, reps=1, min_total=0, warmup=False)
    sparse_cores = best_time.cores
    t_dense = best_time(dense, q, k, v, reps=1, min_total=0, warmup=False)
    dense_cores = best_time.cores
    lists = jax.jit(lambda q_, k_: select_block_lists(q_, k_, cfg))(q, k)
    g = hq // hkv
    dense_flops = 4 * d * hq * t_len * (t_len + 1) / 2
    nk = (t_len - cfg.kernel_size) // cfg.kernel_stride + 1
    kpos = np.arange(nk) * cfg.kernel_stride + cfg.kernel_size - 1
    score_pairs = int(np.searchsorted(kpos, np.arange(t_len), side="right").sum())
    sparse_flops = 4 * d * g * attended_pairs(lists, cfg.block_size) + 2 * d * hq * score_pairs
    fl = peaks["gflops"] * 1e9
    return dict(t_len=t_len, t_dense=t_dense, t_sparse=t_sparse, ratio=t_sparse / t_dense,
                flop_ratio=sparse_flops / dense_flops, dense_fl=dense_flops / t_dense / fl,
                sparse_fl=sparse_flops / t_sparse / fl, hq=hq, hkv=hkv, dense_cores=dense_cores,
                sparse_cores=sparse_cores)


# ----------------------------------------------------------------------------------------------- main
def run(*, quick: bool = False, decode_lens: Optional[Sequence[int]] = None, prefill_len: Optional[int] = None,
        chunk: int = 64) -> None:
    """Print the measured peaks, the decode table (per cache length) and the prefill comparison.

    Defaults: decode at 32K and 128K, prefill at 32K (quick: 8K/32K and 8K). prefill_len 0 skips the prefill."""
    if decode_lens is None:
        decode_lens = [8192, 32768] if quick else [32768, 131072]
    if prefill_len is None:
        prefill_len = 8192 if quick else 32768
    cfg = SparseConfig(dense_len=-1)
    print(f"jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPUs); InfLLM v2 {cfg.block_size}/"
          f"{cfg.kernel_size}/{cfg.kernel_stride}, topk {cfg.topk} (init incl.), window {cfg.window_size}, fp32")
    peaks = machine_peaks(quick)
    print(f"measured peaks: read bandwidth {peaks['bw_gbs']:.1f} GB/s, fp32 matmul {peaks['gflops']:.0f} GFLOP/s\n")
    if decode_lens:
        print("decode step, per layer (B=1, 32 q heads, 2 KV heads, D=128); sparse = cache update + select + attend")
        hdr = f"{'cache':>7} {'dense':>16} {'sparse':>9} {'ratio':>6} {'bytes':>6} {'/floor':>6} {'dense BW':>8} " \
              f"{'sparse BW':>9} {'cores d/s':>9}"
        print(hdr)
        for s_len in decode_lens:
            r = bench_decode(s_len, cfg, peaks)
            print(f"{s_len // 1024:>6}K {r['t_dense'] * 1e3:>7.2f} ms {r['dense_name']:>6} "
                  f"{r['t_sparse'] * 1e3:>6.2f} ms {r['ratio']:>6.3f} {r['byte_ratio']:>6.3f} "
                  f"{r['ratio'] / r['byte_ratio']:>6.2f} {r['dense_bw']:>8.0%} {r['sparse_bw']:>9.0%} "
                  f"{r['dense_cores']:>5.1f}/{r['sparse_cores']:.1f}")
            others = ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in r["dense_times"].items())
            print(f"{'':>8}(dense baselines: {others})")
        print("  ratio = sparse/dense time; bytes = sparse/dense bytes read (the floor); /floor = ratio/bytes;")
        print("  cores d/s = CPU seconds per wall second, dense/sparse (XLA:CPU threads only large ops)\n")
    if prefill_len:
        r = bench_prefill(prefill_len, cfg, peaks, chunk=chunk)
        print(f"prefill forward, T={prefill_len}, {r['hq']} q heads / {r['hkv']} KV head, D=128")
        print(f"  dense flash-XLA {r['t_dense']:.2f} s   sparse XLA {r['t_sparse']:.2f} s   ratio {r['ratio']:.3f} "
              f"(useful-FLOP ratio {r['flop_ratio']:.3f})")
        print(f"  achieved fraction of measured matmul rate: dense {r['dense_fl']:.0%}, sparse {r['sparse_fl']:.0%}; "
              f"cores busy: dense {r['dense_cores']:.1f}, sparse {r['sparse_cores']:.1f}")
