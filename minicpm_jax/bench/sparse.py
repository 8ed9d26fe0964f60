"""InfLLM v2 sparse vs dense attention on this machine (CPU by default), both variants: decode steps and prefill.

Run:  minicpm bench sparse [--quick] [--variants minicpm4 minicpm4.1] [--decode-lens 32768 131072]
                           [--prefill-len 32768] [--prefill-reps 1]

Prints, side by side in one run (about 4 minutes on 2 CPU cores with the defaults; --quick about 1):
  * the machine's measured peaks: read bandwidth of a large (1 GiB) reduction and the fp32 matmul rate (2048^3);
  * decode with a 32K / 128K cache at the MiniCPM4-8B attention shape (32 q heads, 2 KV heads, head dim 128), for
    each variant ("minicpm4": lse_approx off; "minicpm4.1": on, the official defaults): the sparse step
    (compressed-cache update + selection + attention, XLA path) against the fastest of four dense baselines
    (measured once per cache length). Beside the time ratio: the byte ratio (bytes sparse must read / bytes dense
    must read: the compressed kernels, the coarse ones with lse_approx, and the selected K/V blocks vs all of K/V),
    ratio/bytes (the floor relative to dense), and the absolute byte floor = bytes sparse must read / measured read
    bandwidth, with the sparse time as a multiple of it; each side's achieved fraction of the measured bandwidth.
    Every timed decode call starts with a cold cache (768 MiB are read in between, more than this CPU's L3), as
    in a model that runs many layers per token: re-reading one layer's few MB would be served from the cache;
  * prefill forward at 32K tokens (heads reduced to one KV group of 16 query heads to fit a CPU), per variant:
    sparse (selection + attention, XLA path; the selection alone is also timed) vs a flash-style chunked dense XLA
    attention with causal block skipping (the strongest dense we can build on a CPU: jax.nn.dot_product_attention
    would materialise 32K x 32K logits per head); each side's achieved fraction of the measured matmul rate,
    counting useful FLOPs only (sparse: the attended (query, key) pairs plus the kernel scoring, coarse kernels
    included with lse_approx).
Goals (issue #11): 32K prefill sparse/dense <= 0.40; decode at 128K within 1.5x of the byte floor.
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
from minicpm_jax.sparse.compress import coarse_sizes, num_kernels
from minicpm_jax.sparse.config import VARIANTS
from minicpm_jax.sparse.select import attended_pairs, select_block_lists

FLUSH_MIB = 768  # > this CPU's L3 (480 MiB on the 2-core development machine)


# ----------------------------------------------------------------------------------------------- measuring
def best_time(fn, *args, reps: int = 5, min_total: float = 0.5, warmup: bool = True, flush=None) -> float:
    """Best wall time of fn(*args) over `reps` runs, in seconds. fn must be jitted.

    warmup=False compiles ahead of time instead of running once (for the long prefill runs). flush: called
    (untimed) before every timed run. The CPU time the process used per wall second over the timed runs (how many
    cores the computation kept busy) is left in best_time.cores."""
    if warmup:
        jax.block_until_ready(fn(*args))
    else:
        fn = fn.lower(*args).compile()
    best, total, n, cpu = float("inf"), 0.0, 0, 0.0
    while n < reps or (total < min_total and n < 50):
        if flush is not None:
            flush()
        c0, t0 = time.process_time(), time.perf_counter()
        jax.block_until_ready(fn(*args))
        dt = time.perf_counter() - t0
        cpu += time.process_time() - c0
        best, total, n = min(best, dt), total + dt, n + 1
    best_time.cores = cpu / total
    return best


class CacheFlush:
    """Reads `mib` MiB (more than the last-level cache), so that the next timed call starts cold."""

    def __init__(self, mib: int = FLUSH_MIB):
        self.x = jnp.ones((mib * 2 ** 18,), jnp.float32)
        self.f = jax.jit(jnp.sum)
        jax.block_until_ready(self.f(self.x))

    def __call__(self):
        jax.block_until_ready(self.f(self.x))


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
def decode_inputs(s_len: int, hq=32, hkv=2, d=128):
    ks = jax.random.split(jax.random.key(s_len), 3)
    k = jax.random.normal(ks[0], (1, s_len, hkv, d), jnp.float32)
    v = jax.random.normal(ks[1], (1, s_len, hkv, d), jnp.float32)
    q = jax.random.normal(ks[2], (1, 1, hq, d), jnp.float32)
    return q, k, v, jnp.array([s_len], jnp.int32)


def bench_dense_decode(q, k, v, lengths, peaks: dict, flush=None) -> dict:
    """Every dense decode baseline; the fastest is the one sparse is compared with."""
    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    times, cores = {}, {}
    for name, (fn, lay) in DENSE_DECODE.items():
        times[name] = best_time(jax.jit(fn), q, *((k, v) if lay == "bshd" else (kt, vt)), lengths, flush=flush)
        cores[name] = best_time.cores
    name = min(times, key=times.get)
    s_len, hkv, d = k.shape[1], k.shape[2], k.shape[3]
    dense_bytes = 2 * s_len * hkv * d * k.dtype.itemsize
    return dict(t_dense=times[name], dense_name=name, dense_times=times, dense_cores=cores[name],
                dense_bytes=dense_bytes, dense_bw=dense_bytes / times[name] / (peaks["bw_gbs"] * 1e9))


def decode_bytes(cc, lists, cfg: SparseConfig, d: int, esz: int) -> int:
    """Bytes a sparse decode step must read: the stored kernels (fine, and coarse with lse_approx) of every KV
    head and the K and V rows of the selected blocks (per KV head)."""
    hkv = cc.kc.shape[2]
    kernels = int(np.asarray(cc.count).sum())
    if cc.kc2 is not None:
        kernels += int(np.asarray(cc.count2).sum())
    sel_keys = int(np.asarray(lists.count).sum()) * cfg.block_size  # summed over KV heads
    return kernels * hkv * d * esz + 2 * sel_keys * d * esz


def bench_decode(s_len: int, cfg: SparseConfig, peaks: dict, dense: Optional[dict] = None, flush=None,
                 hq=32, hkv=2, d=128, steps: int = 20) -> dict:
    """Sparse decode step (donated compressed cache, as in a decode loop) vs the dense baselines (`dense`: the
    result of bench_dense_decode on the same inputs, measured here when None)."""
    q, k, v, lengths = decode_inputs(s_len, hq, hkv, d)
    if dense is None:
        dense = bench_dense_decode(q, k, v, lengths, peaks, flush)
    cc = jax.jit(lambda k_: compressed_cache_from_keys(k_, lengths - 1, cfg))(k)

    # A decode loop donates its caches (the update is then in place), so the timed step does too.
    @functools.partial(jax.jit, donate_argnums=(3,))
    def sparse_step(q_, k_, v_, cc_, n):
        cc_ = update_compressed_cache(cc_, k_, n, cfg)          # the new key may complete a kernel
        return infllm_v2_decode(q_, k_, v_, n, cc_, cfg, "xla"), cc_

    out, cc = sparse_step(q, k, v, cc, lengths)
    t_sparse, cpu, wall = float("inf"), 0.0, 0.0
    for _ in range(steps):
        if flush is not None:
            flush()
        c0, t0 = time.process_time(), time.perf_counter()
        out, cc = sparse_step(q, k, v, cc, lengths)
        jax.block_until_ready(out)
        dt = time.perf_counter() - t0
        t_sparse, cpu, wall = min(t_sparse, dt), cpu + time.process_time() - c0, wall + dt
    lists = jax.jit(lambda q_, k_, cc_, n: select_block_lists(q_, k_, cfg, q_offset=n - 1, kc=cc_.kc, kc2=cc_.kc2,
                                                              kernel_count=cc_.count, kernel_count2=cc_.count2,
                                                              chunk=1))(q, k, cc, lengths)
    sparse_bytes = decode_bytes(cc, lists, cfg, d, k.dtype.itemsize)
    bw = peaks["bw_gbs"] * 1e9
    floor = sparse_bytes / bw
    return dict(dense, s_len=s_len, t_sparse=t_sparse, sparse_cores=cpu / wall, ratio=t_sparse / dense["t_dense"],
                byte_ratio=sparse_bytes / dense["dense_bytes"], sparse_bytes=sparse_bytes, floor=floor,
                x_floor=t_sparse / floor, sparse_bw=floor / t_sparse)


# -------------------------------------------------------------------------------------------- prefill
def prefill_inputs(t_len: int, hq=16, hkv=1, d=128):
    ks = jax.random.split(jax.random.key(t_len), 3)
    q = jax.random.normal(ks[0], (1, t_len, hq, d), jnp.float32)
    k = jax.random.normal(ks[1], (1, t_len, hkv, d), jnp.float32)
    v = jax.random.normal(ks[2], (1, t_len, hkv, d), jnp.float32)
    return q, k, v


def scored_pairs(t_len: int, kernel_size: int, stride: int) -> int:
    """(query, kernel) pairs with the kernel visible to the query, for queries at 0 .. t_len-1."""
    nk = num_kernels(t_len, kernel_size, stride)
    kpos = np.arange(nk) * stride + kernel_size - 1
    return int(np.searchsorted(kpos, np.arange(t_len), side="right").sum())


def prefill_flops(lists, cfg: SparseConfig, t_len: int, hq: int, hkv: int, d: int) -> tuple[float, float]:
    """Useful FLOPs of (dense causal attention, sparse attention + kernel scoring) at this shape."""
    dense = 4 * d * hq * t_len * (t_len + 1) / 2
    score = scored_pairs(t_len, cfg.kernel_size, cfg.kernel_stride)
    if cfg.lse_approx:
        score += scored_pairs(t_len, *coarse_sizes(cfg))
    return dense, 4 * d * (hq // hkv) * attended_pairs(lists, cfg.block_size) + 2 * d * hq * score


def bench_dense_prefill(q, k, v, reps: int = 1) -> dict:
    t = best_time(jax.jit(dense_flash_prefill), q, k, v, reps=reps, min_total=0, warmup=False)
    return dict(t_dense=t, dense_cores=best_time.cores)


def bench_prefill(t_len: int, cfg: SparseConfig, peaks: dict, dense: Optional[dict] = None, hq=16, hkv=1, d=128,
                  chunk=64, reps: int = 1) -> dict:
    q, k, v = prefill_inputs(t_len, hq, hkv, d)
    if dense is None:
        dense = bench_dense_prefill(q, k, v, reps)
    sparse = jax.jit(lambda q_, k_, v_: infllm_v2_attention(q_, k_, v_, cfg, "xla", chunk=chunk))
    t_sparse = best_time(sparse, q, k, v, reps=reps, min_total=0, warmup=False)
    sparse_cores = best_time.cores
    select = jax.jit(lambda q_, k_: select_block_lists(q_, k_, cfg))
    t_select = best_time(select, q, k, reps=reps, min_total=0, warmup=False)
    lists = select(q, k)
    dense_flops, sparse_flops = prefill_flops(lists, cfg, t_len, hq, hkv, d)
    fl = peaks["gflops"] * 1e9
    return dict(dense, t_len=t_len, t_sparse=t_sparse, t_select=t_select, ratio=t_sparse / dense["t_dense"],
                flop_ratio=sparse_flops / dense_flops, dense_fl=dense_flops / dense["t_dense"] / fl,
                sparse_fl=sparse_flops / t_sparse / fl, hq=hq, hkv=hkv, sparse_cores=sparse_cores)


# ----------------------------------------------------------------------------------------------- main
def _lse(cfg: SparseConfig) -> str:
    return "on" if cfg.lse_approx else "off"


def run(*, quick: bool = False, decode_lens: Optional[Sequence[int]] = None, prefill_len: Optional[int] = None,
        chunk: int = 64, variants: Optional[Sequence[str]] = None, prefill_reps: int = 1) -> dict:
    """Print the measured peaks, the decode table (per cache length and variant) and the prefill comparison;
    return them as {"peaks": .., "decode": [row dicts], "prefill": [row dicts]} (rows carry "variant").

    Defaults: both variants with their default lse_approx; decode at 32K and 128K, prefill at 32K (quick: 8K/32K
    and 8K). prefill_len 0 skips the prefill; an empty decode_lens skips the decode."""
    t_start = time.perf_counter()
    if decode_lens is None:
        decode_lens = [8192, 32768] if quick else [32768, 131072]
    if prefill_len is None:
        prefill_len = 8192 if quick else 32768
    cfgs = [SparseConfig(dense_len=-1, variant=v) for v in (variants or VARIANTS)]
    c0 = cfgs[0]
    print(f"jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPUs); InfLLM v2 {c0.block_size}/"
          f"{c0.kernel_size}/{c0.kernel_stride}, topk {c0.topk}, window {c0.window_size}, fp32; variants: "
          + ", ".join(f"{c.variant} (local {c.local_blocks} blocks + {c.topk_slots} top-k slots incl. init, "
                      f"lse_approx {_lse(c)})" for c in cfgs))
    peaks = machine_peaks(quick)
    rows = {"peaks": peaks, "decode": [], "prefill": []}
    print(f"measured peaks: read bandwidth {peaks['bw_gbs']:.1f} GB/s, fp32 matmul {peaks['gflops']:.0f} GFLOP/s; "
          f"load average {os.getloadavg()[0]:.1f} (other processes share these cores)\n")
    if decode_lens:
        flush = CacheFlush()
        print("decode step, per layer (B=1, 32 q heads, 2 KV heads, D=128); sparse = cache update + select + attend;"
              " every timed call starts cold")
        print(f"{'cache':>6} {'variant':<10} {'lse':>3} | {'dense ms':>8} {'(best of 4)':<11} {'sparse ms':>9} | "
              f"{'ratio':>6} {'bytes':>6} {'r/bytes':>7} | {'floor ms':>8} {'x floor':>7} | {'dense BW':>8} "
              f"{'sparse BW':>9} | {'cores d/s':>9}")
        for s_len in decode_lens:
            q, k, v, lengths = decode_inputs(s_len)
            dense = bench_dense_decode(q, k, v, lengths, peaks, flush)
            del q, k, v
            for cfg in cfgs:
                r = bench_decode(s_len, cfg, peaks, dense, flush)
                rows["decode"].append(dict(r, variant=cfg.variant))
                print(f"{s_len // 1024:>5}K {cfg.variant:<10} {_lse(cfg):>3} | {r['t_dense'] * 1e3:>8.2f} "
                      f"{r['dense_name']:<11} {r['t_sparse'] * 1e3:>9.2f} | {r['ratio']:>6.3f} {r['byte_ratio']:>6.3f} "
                      f"{r['ratio'] / r['byte_ratio']:>7.2f} | {r['floor'] * 1e3:>8.2f} {r['x_floor']:>7.2f} | "
                      f"{r['dense_bw']:>8.0%} {r['sparse_bw']:>9.0%} | "
                      f"{r['dense_cores']:>5.1f}/{r['sparse_cores']:.1f}")
            others = ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in dense["dense_times"].items())
            print(f"{'':>6} (dense baselines: {others})")
        print("  ratio = sparse/dense time; bytes = sparse/dense bytes that must be read; r/bytes = ratio/bytes (the")
        print("  floor relative to dense); floor = sparse bytes / measured read bandwidth; x floor = sparse time /")
        print("  floor; BW = achieved fraction of the measured read bandwidth; cores d/s = CPU s per wall s\n")
        del flush
    if prefill_len:
        q, k, v = prefill_inputs(prefill_len)
        dense = bench_dense_prefill(q, k, v, prefill_reps)
        del q, k, v
        print(f"prefill forward, T={prefill_len}, 16 q heads / 1 KV head, D=128; dense = flash-style XLA "
              f"({dense['t_dense']:.2f} s, {dense['dense_cores']:.1f} cores busy)")
        print(f"  {'variant':<10} {'lse':>3} | {'dense s':>7} {'sparse s':>8} {'(select)':>8} | {'ratio':>6} "
              f"{'FLOPs':>6} | {'dense %peak':>11} {'sparse %peak':>12} | {'cores d/s':>9}")
        for cfg in cfgs:
            r = bench_prefill(prefill_len, cfg, peaks, dense, chunk=chunk, reps=prefill_reps)
            rows["prefill"].append(dict(r, variant=cfg.variant))
            print(f"  {cfg.variant:<10} {_lse(cfg):>3} | {r['t_dense']:>7.2f} {r['t_sparse']:>8.2f} "
                  f"{r['t_select']:>8.2f} | {r['ratio']:>6.3f} {r['flop_ratio']:>6.3f} | {r['dense_fl']:>11.0%} "
                  f"{r['sparse_fl']:>12.0%} | {r['dense_cores']:>5.1f}/{r['sparse_cores']:.1f}")
        print("  ratio = sparse/dense time (sparse = selection + attention; select = the selection alone);")
        print("  FLOPs = useful-FLOP ratio (attended pairs + kernel scoring vs causal dense); %peak = useful FLOP rate"
              " / measured matmul rate")
    print(f"\n(bench ran {time.perf_counter() - t_start:.0f} s; load average now {os.getloadavg()[0]:.1f})")
    return rows
