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


def _is_window(seq, text):
    return len(seq) > 0 and seq == list(range(seq[0], seq[0] + len(seq))) and seq[0] >= text[0] \
        and seq[-1] <= text[-1]


def test_text_filler_and_lead_are_windows_of_the_running_text():
    text = list(range(1000, 1400))                 # distinct ids outside the pool: a window is identifiable
    spec = C.CopyTrainSpec(items=40, min_span=3, max_span=6, min_gap=5, max_gap=30, min_lead=1, max_lead=20,
                           seed=3, filler="text")
    starts, leads = set(), set()
    for i in range(spec.items):
        it = C.build_item(POOL, spec, i, bos_id=1, eos_id=2, text_ids=text)
        t, m, n, g, ld = it["tokens"].tolist(), it["mask"].tolist(), it["span"], it["gap"], it["lead"]
        assert len(t) == len(m) == ld + 2 * n + g + 2 and t[0] == 1 and t[-1] == 2
        lead, first = t[1:1 + ld], t[1 + ld:1 + ld + n]
        gap, second = t[1 + ld + n:1 + ld + n + g], t[1 + ld + n + g:-1]
        assert spec.min_gap <= g <= spec.max_gap and spec.min_lead <= ld <= spec.max_lead
        assert _is_window(gap, text) and _is_window(lead, text)        # contiguous running text, both fillers
        assert set(first) <= set(POOL) and first == second
        assert m == [0] * (ld + n + g + 2) + [1] * n                    # lead, copy, gap: no loss
        starts.add(gap[0])
        leads.add(ld)
    assert len(starts) > 20 and len(leads) > 5    # windows from all over the text; the first copy moves
    again = C.build_item(POOL, spec, 4, bos_id=1, eos_id=2, text_ids=text)["tokens"]
    np.testing.assert_array_equal(again, C.build_item(POOL, spec, 4, 1, 2, text_ids=text)["tokens"])
    with pytest.raises(ValueError, match="30 text ids, got 20"):
        C.build_item(POOL, spec, 0, bos_id=1, eos_id=2, text_ids=text[:20])     # too little text for the gap
    with pytest.raises(ValueError, match="filler"):
        C.CopyTrainSpec(filler="prose")
    with pytest.raises(ValueError, match="min_lead"):
        C.CopyTrainSpec(min_lead=3, max_lead=1)
    assert C.running_text(_Tok, ["ab", "c"]).tolist() == [32, 97, 98, 32, 99]
    assert C.running_text(_Tok, ["a", "b", "c"], paragraph=2).tolist() == [10, 97, 32, 98, 10, 99]   # "\n" = 10
    with pytest.raises(ValueError, match="paragraph"):
        C.running_text(_Tok, ["a"], paragraph=-1)
    with pytest.raises(ValueError, match="needs filler='text'"):
        C.CopyTrainSpec(paragraph=3)                     # line breaks only make sense in a prose filler
    pool, ids = C.item_inputs(_Tok, ["a", "b", "c"], C.CopyTrainSpec(filler="text", paragraph=2, span_chars="01"))
    assert pool == [48, 49] and ids.tolist() == [10, 97, 32, 98, 10, 99]
    assert C.item_inputs(_Tok, ["ba", "ab c"], C.CopyTrainSpec()) == ([32, 97, 98, 99], None)


def test_lead_of_random_ids_and_no_lead_by_default():
    spec = C.CopyTrainSpec(items=20, min_span=3, max_span=6, max_gap=4, max_lead=9, seed=8)
    its = [_item(i, spec) for i in range(spec.items)]
    assert {it["lead"] for it in its} - {0} and all(set(it["tokens"][1:-1].tolist()) <= set(POOL) for it in its)
    assert [_item(i)["lead"] for i in range(5)] == [0] * 5
    # items without a lead are unchanged by the option's existence (no rng draw): the gap-only records still match
    gap_only = C.CopyTrainSpec(items=5, min_span=3, max_span=6, max_gap=4, seed=8)
    for i in range(5):
        a, b = _item(i, gap_only), _item(i, spec)
        n, g = a["span"], a["gap"]
        assert (b["span"], b["gap"]) == (n, g) and b["tokens"][1 + b["lead"]:].tolist() == a["tokens"][1:].tolist()


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


class _Tok:                                    # the builder needs only bos/eos ids, encode and encode_batch
    bos_id, eos_id = 1, 2

    @staticmethod
    def encode(s):
        return [ord(ch) for ch in s]

    @classmethod
    def encode_batch(cls, texts):
        return [cls.encode(s) for s in texts]


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
    assert (a.min_gap, a.max_gap, a.filler) == (0, 96, "ids")
    assert build_parser().parse_args(["data", "copies", "--tokenizer", "t", "--out", "o", "--filler",
                                      "text", "--max-lead", "7", "--paragraph", "3"]).paragraph == 3
    assert build_parser().parse_args(["data", "copies", "--tokenizer", "t", "--out", "o"]).pool_size is None


def test_char_pool_takes_single_token_characters_only():
    assert C.char_pool(_Tok, "0120") == [48, 49, 50]               # one id per distinct character, sorted

    class _Merging(_Tok):                                          # "x" is two tokens under this tokenizer
        @staticmethod
        def encode(s):
            return [7, 8] if s == "x" else [ord(ch) for ch in s]

    with pytest.raises(ValueError, match="'x' encodes to 2 tokens"):
        C.char_pool(_Merging, "0x")
    with pytest.raises(ValueError, match="2 distinct"):
        C.char_pool(_Tok, "11")
    spec = C.CopyTrainSpec(items=10, min_span=5, max_span=9, seed=2)
    digits = C.char_pool(_Tok, "0123456789")
    spans = [_item_from(digits, spec, i) for i in range(spec.items)]
    assert all(set(s) <= set(digits) for s in spans) and any(len(set(s)) < len(s) for s in spans)   # repeats


def _item_from(pool, spec, i):
    it = C.build_item(pool, spec, i, bos_id=1, eos_id=2)
    return it["tokens"][1:1 + it["span"]].tolist()
