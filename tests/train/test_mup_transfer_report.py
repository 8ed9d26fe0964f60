"""The learning-rate transfer report's arithmetic: the refined best lr and its drift per doubling of width."""

import math

import pytest

from minicpm_jax.bench.mup_transfer import best_lr, drift, fill_shared, optima

LRS = [2.0 ** k for k in range(-10, -5)]          # five lrs a factor 2 apart


def _bowl(best: float):
    """A loss that is a parabola in log2(lr) with its minimum at `best`."""
    return [3.0 + 0.1 * (math.log2(lr) - math.log2(best)) ** 2 for lr in LRS]


def test_best_lr_refines_between_grid_points_and_stays_at_an_edge():
    grid, fit = best_lr(LRS, _bowl(2.0 ** -7.7))
    assert grid == 2.0 ** -8 and fit == pytest.approx(2.0 ** -7.7)
    assert best_lr(LRS, _bowl(2.0 ** -12)) == (2.0 ** -10, 2.0 ** -10)     # below the grid: its lowest lr
    assert best_lr(LRS, [None] * 5) == (None, None)
    assert best_lr(LRS, [None, 3.0, 2.9, 3.1, None])[0] == LRS[2]          # diverged runs are skipped


def test_drift_is_octaves_per_doubling():
    points = [{"param": p, "width": w, "lr": lr, "loss": l}
              for p, shift in (("mup", 0.0), ("sp", -1.0))
              for i, w in enumerate((128, 256, 512))
              for lr, l in zip(LRS, _bowl(2.0 ** (-7.3 + shift * i)))]
    best = optima(points)
    assert drift(best, "mup") == pytest.approx(0.0, abs=1e-6)
    assert drift(best, "sp") == pytest.approx(-1.0, abs=1e-6)


def test_a_width_multiplier_1_mup_run_stands_for_every_parametrisation():
    pts = [{"param": "mup-hidden", "width": 256, "lr": 0.01, "loss": 3.0, "width_mult": 1.0},
           {"param": "sp", "width": 128, "lr": 0.01, "loss": 3.2, "width_mult": 1.0}]   # SP: m = 1 at every width
    filled = fill_shared(pts)
    assert {(p["param"], p["width"]) for p in filled} == {("mup-hidden", 256), ("sp", 256), ("sp", 128)}
    assert filled[2]["shared_from"] == "mup-hidden"
