"""Copy-task warm-up records (data_pipeline.copy_train): an item is BOS, a span, the same span, EOS; the loss mask
covers the second copy after its first token (not predictable) and the EOS; items are deterministic per seed and
index, span lengths stay in range, ids come only from the pool; the records round-trip with their mask."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline import copy_train as C
from data_pipeline import records

POOL = list(range(100, 140))
SPEC = C.CopyTrainSpec(items=30, min_span=3, max_span=9, seed=5)


def _item(i, spec=SPEC):
    return C.build_item(POOL, spec, i, bos_id=1, eos_id=2)


def test_layout_and_mask():
    for i in range(SPEC.items):
        it = _item(i)
        t, m = it["tokens"].tolist(), it["mask"].tolist()
        n = it["span"]
        assert SPEC.min_span <= n <= SPEC.max_span
        assert len(t) == len(m) == 2 * n + 2
        assert t[0] == 1 and t[-1] == 2
        assert t[1:1 + n] == t[1 + n:1 + 2 * n]                   # the span twice
        assert set(t[1:-1]) <= set(POOL)
        # written out by hand: nothing in the loss up to and including the second copy's first token
        assert m == [0] * (n + 2) + [1] * (n - 1) + [1]


def test_gap_puts_filler_between_the_copies_and_keeps_it_out_of_the_loss():
    spec = C.CopyTrainSpec(items=40, min_span=3, max_span=6, min_gap=2, max_gap=11, seed=7)
    gaps = set()
    for i in range(spec.items):
        it = _item(i, spec)
        t, m, n, g = it["tokens"].tolist(), it["mask"].tolist(), it["span"], it["gap"]
        gaps.add(g)
        assert spec.min_gap <= g <= spec.max_gap and len(t) == len(m) == 2 * n + g + 2
        assert t[1:1 + n] == t[1 + n + g:1 + 2 * n + g] and t[-1] == 2   # the span, filler, the span again
        assert set(t[1 + n:1 + n + g]) <= set(POOL)
        assert m == [0] * (n + g + 2) + [1] * n                           # filler and first copy: no loss
    assert len(gaps) > 3                                                   # the copy distance varies
    assert [_item(i)["gap"] for i in range(5)] == [0] * 5                   # no gap by default
    with pytest.raises(ValueError, match="min_gap"):
        C.CopyTrainSpec(min_gap=5, max_gap=2)


def test_deterministic_and_seeded():
    a = [_item(i)["tokens"] for i in range(5)]
    b = [_item(i)["tokens"] for i in range(5)]
    c = [_item(i, C.CopyTrainSpec(items=5, min_span=3, max_span=9, seed=6))["tokens"] for i in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sum(np.array_equal(x, z) for x, z in zip(a, c)) == 0
    assert len({len(x) for x in a + c}) > 1                     # lengths vary


def test_spec_errors_name_the_field():
    with pytest.raises(ValueError, match="min_span"):
        C.CopyTrainSpec(min_span=10, max_span=4)
    with pytest.raises(ValueError, match="items"):
        C.CopyTrainSpec(items=0)


class _Tok:                                    # the builder needs only bos/eos ids and encode_batch
    bos_id, eos_id = 1, 2

    @staticmethod
    def encode_batch(texts):
        return [[ord(ch) for ch in s] for s in texts]


def test_pool_and_records_round_trip(tmp_path):
    assert C.text_pool(_Tok, ["ba", "ab c"]) == [32, 97, 98, 99]
    # counts a:3 b:3 c:1 " ":1 -> the two most frequent; ties broken by the smaller id (" " = 32 before "c" = 99)
    assert C.text_pool(_Tok, ["ba", "ab c", "a"], size=2) == [97, 98]
    assert C.text_pool(_Tok, ["ba", "ab c", "a"], size=3) == [32, 97, 98]
    with pytest.raises(ValueError, match="pool"):
        C.text_pool(_Tok, [""])
    with pytest.raises(ValueError, match="size"):
        C.text_pool(_Tok, ["ab"], size=1)
    spec = C.CopyTrainSpec(items=7, min_span=2, max_span=4, seed=1)
    s = C.write_records(tmp_path, _Tok, spec, POOL)
    recs = [records.decode_record(r) for r in records.read_shards(sorted((tmp_path / "tokens/train").iterdir()))]
    assert s["items"] == len(recs) == 7
    assert s["loss_tokens"] == sum(int(r["mask"].sum()) for r in recs)
    for i, r in enumerate(sorted(recs, key=lambda r: int(r["id"].rsplit("/", 1)[1]))):
        want = _item(i, spec)
        np.testing.assert_array_equal(np.asarray(r["tokens"]), want["tokens"])
        np.testing.assert_array_equal(np.asarray(r["mask"]), want["mask"])


def test_cli_parses_the_spec_fields():
    from minicpm_jax.cli import build_parser

    a = build_parser().parse_args(["data", "copies", "--tokenizer", "t", "--out", "o", "--items", "9",
                                   "--min-span", "4", "--max-span", "24", "--pool-size", "512", "--max-gap", "96"])
    assert (a.items, a.min_span, a.max_span, a.pool_size, a.seed) == (9, 4, 24, 512, C.CopyTrainSpec.seed)
    assert (a.min_gap, a.max_gap) == (0, 96)
    assert build_parser().parse_args(["data", "copies", "--tokenizer", "t", "--out", "o"]).pool_size is None
