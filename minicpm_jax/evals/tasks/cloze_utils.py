"""Builder of the `minicpm_cloze_en` lm-eval task (see minicpm_jax/evals/cloze.py). --metadata: cloze_samples
(default 500), seed."""

from __future__ import annotations

from minicpm_jax.evals.cloze import cloze_items


def cloze_en(**kwargs):
    import datasets

    items = cloze_items(n=int(kwargs.get("cloze_samples") or 500), seed=int(kwargs.get("seed") or 0))
    return {"test": datasets.Dataset.from_list(items)}
