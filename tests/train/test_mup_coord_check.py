"""The μP coordinate check at three small widths (64 / 128 / 256 over dim_model_base 64, depth 2, head_dim 32).

After 4 Adam steps at peak_lr 1e-2 on a fixed synthetic batch, the RMS of every layer's output (embedding, attention
out, MLP out, residual stream, logits) at width 256 over its RMS at width 64 must lie in BAND under μP (default
rule). Under standard parametrisation (optim.mup=false, dim_model_base = hidden_size) the attention, MLP, residual
and logit outputs must leave it: with μP switched off (or its learning-rate scaling, init scaling or logit divisor
broken) this test fails. Measured when written: μP 0.90-1.07; SP 1.9 (logits) to 9.5 (MLP out).
"""

import pytest

from minicpm_jax.bench import mup

BAND = (2 / 3, 3 / 2)            # widest / narrowest RMS over a 4x range of width
WIDTHS = (64, 128, 256)
STEP = 4


@pytest.fixture(scope="module")
def rows():
    ids = mup.synthetic_batch(vocab_size=256, batch=4, seq=33, seed=0)
    return mup.coord_check(WIDTHS, ("mup-hidden", "sp"), input_ids=ids, vocab_size=256, layers=2, dim_model_base=64,
                           peak_lr=1e-2, record_steps=(STEP,), head_dim=32)


def test_mup_layer_outputs_stay_the_same_size_across_width(rows):
    ratios = {layer: mup.spread(rows, "mup-hidden", STEP, layer) for layer in mup.LAYERS}
    assert all(BAND[0] <= r <= BAND[1] for r in ratios.values()), ratios


def test_standard_parametrisation_leaves_the_band(rows):
    ratios = {layer: mup.spread(rows, "sp", STEP, layer) for layer in mup.LAYERS}
    assert all(ratios[k] > BAND[1] for k in ("attn_out", "mlp_out", "residual", "logits")), ratios
    # the input embedding is the same under SP and μP for Adam (init std and lr independent of width)
    assert BAND[0] <= ratios["embedding"] <= BAND[1], ratios
