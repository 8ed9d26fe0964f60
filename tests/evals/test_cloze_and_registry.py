"""The offline cloze task's items, and the lazy lm-eval registration of "minicpm_jax"."""

from __future__ import annotations

import subprocess
import sys

from minicpm_jax.evals import haystack
from minicpm_jax.evals.cloze import cloze_items


def test_cloze_items_rebuild_held_out_sentences():
    items = cloze_items(n=200, seed=1)
    assert items == cloze_items(n=200, seed=1) and items != cloze_items(n=200, seed=2)
    held_out = set(haystack.sentences("en"))
    for it in items:
        answer = it["choices"][it["label"]]
        assert f"{it['context']} {answer}{it['ending']}" in held_out
        assert len(set(c.lower() for c in it["choices"])) == 4
        assert sum(c == answer for c in it["choices"]) == 1
    labels = [it["label"] for it in items]
    assert all(labels.count(k) > 20 for k in range(4))          # the answer is not always in one place


def test_importing_the_package_registers_the_model():
    """A fresh process: lm-eval finds "minicpm_jax" after `import minicpm_jax.evals` (the class loads on lookup)."""
    code = ("import minicpm_jax.evals, lm_eval.api.registry as r; "
            "assert 'minicpm_jax.evals.harness' not in __import__('sys').modules; "
            "from minicpm_jax.evals.harness import MiniCPMLM; assert r.get_model('minicpm_jax') is MiniCPMLM")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
