"""grain pipeline: packing exactness, resume, per-process shards, determinism, workers, orbax checkpointing."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest

from data_pipeline.packing import unpack_rows
from data_pipeline.pipeline import make_eval_iterator, make_train_iterator
from tests.data.conftest import take_all


def expected_pieces(docs, seq_len):
    """Each document cut into seq_len pieces: what the packed stream must contain, each exactly once."""
    return collections.Counter(tuple(int(x) for x in d["tokens"][i:i + seq_len])
                               for d in docs for i in range(0, len(d["tokens"]), seq_len))


def stream_pieces(batches):
    return collections.Counter(tuple(int(x) for x in p) for b in batches for p, _ in unpack_rows(b))


def check_layout(b, cfg, pad_id):
    B, L = cfg.batch_size, cfg.seq_len
    for k in ("input_ids", "segment_ids", "positions", "loss_mask"):
        assert b[k].shape == (B, L) and b[k].dtype == np.int32, (k, b[k].shape, b[k].dtype)
    for r in range(B):
        seg, pos = b["segment_ids"][r], b["positions"][r]
        n_seg = int(seg.max(initial=0))
        real = seg > 0
        # segments are 1..n, contiguous, in order; padding only at the end
        if n_seg:
            assert list(dict.fromkeys(seg[real].tolist())) == list(range(1, n_seg + 1))
            assert not real[int(real.sum()):].any()
        for s in range(1, n_seg + 1):
            assert (pos[seg == s] == np.arange((seg == s).sum())).all()  # positions restart per piece
        assert (pos[~real] == 0).all() and (b["loss_mask"][r][~real] == 0).all()
        assert (b["input_ids"][r][~real] == pad_id).all()
        assert (b["loss_mask"][r][real] == 1).all()  # pretraining: every real token is a target


def test_every_token_once_in_order_no_crossing(prepared, data_cfg, token_docs):
    cfg = data_cfg.replace(filter_quality=False)
    batches = take_all(make_train_iterator(prepared, cfg, process_index=0, process_count=1, num_epochs=1))
    for b in batches:
        check_layout(b, cfg, prepared.tokenizer.pad_id)
    want = expected_pieces(token_docs, cfg.seq_len)
    assert stream_pieces(batches) == want
    # long documents were split, not dropped: the sample has documents far longer than a row
    assert max(len(d["tokens"]) for d in token_docs) > 4 * cfg.seq_len
    assert sum(n for p, n in want.items() if len(p) == cfg.seq_len) > 0


def test_documents_begin_with_bos_and_end_with_eos(prepared, data_cfg, token_docs):
    tok = prepared.tokenizer
    assert all(d["tokens"][0] == tok.bos_id and d["tokens"][-1] == tok.eos_id for d in token_docs)


def test_filter_keeps_exactly_documents_at_or_above_threshold(prepared, data_cfg, token_docs):
    thr = 0.5
    cfg = data_cfg.replace(filter_quality=True, classifier=dataclasses.replace(data_cfg.classifier, threshold=thr))
    batches = take_all(make_train_iterator(prepared, cfg, process_index=0, process_count=1, num_epochs=1))
    kept = [d for d in token_docs if d["score"] >= thr]
    assert 0 < len(kept) < len(token_docs)  # the threshold splits the sample
    assert stream_pieces(batches) == expected_pieces(kept, cfg.seq_len)


def test_resume_from_saved_state_yields_the_remaining_stream(prepared, data_cfg):
    it = make_train_iterator(prepared, data_cfg, process_index=0, process_count=1)
    for _ in range(7):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(6)]
    it2 = make_train_iterator(prepared, data_cfg, process_index=0, process_count=1)
    it2.set_state(state)
    got = [next(it2) for _ in range(6)]
    for a, b in zip(want, got):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_process_shards_are_disjoint_and_cover(prepared, data_cfg, token_docs):
    cfg = data_cfg.replace(filter_quality=False)
    parts = [stream_pieces(take_all(make_train_iterator(prepared, cfg, process_index=i, process_count=2,
                                                        num_epochs=1))) for i in range(2)]
    want = expected_pieces(token_docs, cfg.seq_len)
    assert parts[0] + parts[1] == want  # counts add up: no piece twice, none missing
    n0, n1 = sum(parts[0].values()), sum(parts[1].values())
    assert abs(n0 - n1) < 0.2 * (n0 + n1)  # record i goes to process i % 2: about half each


def test_deterministic_for_a_seed(prepared, data_cfg):
    def first(cfg, n=5):
        it = make_train_iterator(prepared, cfg, process_index=0, process_count=1)
        out = [next(it)["input_ids"] for _ in range(n)]
        it.close()
        return np.stack(out)

    a, b = first(data_cfg), first(data_cfg)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, first(data_cfg.replace(seed=1)))


def test_worker_processes_resume_and_cover(prepared, data_cfg, token_docs):
    cfg = data_cfg.replace(num_workers=2, filter_quality=False)
    it = make_train_iterator(prepared, cfg, process_index=0, process_count=1, num_epochs=1)
    head = [next(it) for _ in range(3)]
    state = it.get_state()
    rest = take_all(it)
    # one epoch through two workers holds every piece exactly once
    assert stream_pieces(head + rest) == expected_pieces(token_docs, cfg.seq_len)
    it2 = make_train_iterator(prepared, cfg, process_index=0, process_count=1, num_epochs=1)
    it2.set_state(state)
    resumed = take_all(it2)
    assert len(resumed) == len(rest)
    for a, b in zip(rest, resumed):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_orbax_composite_checkpoint_restores_the_iterator(prepared, data_cfg, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    it = make_train_iterator(prepared, data_cfg, process_index=0, process_count=1)
    for _ in range(4):
        next(it)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(4, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = next(it)
    fresh = make_train_iterator(prepared, data_cfg, process_index=0, process_count=1)
    mngr.restore(4, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    got = next(fresh)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k])
    mngr.close()


def test_eval_iterator_one_ordered_pass(prepared, data_cfg):
    from data_pipeline import records

    batches = take_all(make_eval_iterator(prepared, data_cfg, process_index=0, process_count=1))
    docs = [records.decode_record(r) for v in prepared.shards("eval").values() for r in records.read_shards(v)]
    assert stream_pieces(batches) == expected_pieces(docs, data_cfg.seq_len)
    for b in batches:
        check_layout(b, data_cfg, prepared.tokenizer.pad_id)
    again = take_all(make_eval_iterator(prepared, data_cfg, process_index=0, process_count=1))
    assert len(again) == len(batches) and all((a["input_ids"] == b["input_ids"]).all()
                                              for a, b in zip(batches, again))


def test_unknown_eval_source_is_a_clear_error(prepared, data_cfg):
    with pytest.raises(ValueError, match="not prepared"):
        make_eval_iterator(prepared, data_cfg, process_index=0, process_count=1, sources=["no_such_source"])


def test_parquet_source_through_the_pipeline(prepared, data_cfg, corpus_dir, tmp_path):
    """Parquet text files (row groups read on demand) go through tokenize + pack like ArrayRecord shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipeline.corpus import iter_docs
    from data_pipeline.pipeline import ParquetSource

    texts = [d["text"] for d in iter_docs(corpus_dir, ["wiki_en", "reviews_zh"])][:120]
    for i in range(2):
        part = texts[i * 60:(i + 1) * 60]
        pq.write_table(pa.table({"text": part, "n": list(range(len(part)))}), tmp_path / f"p{i}.parquet",
                       row_group_size=16)
    src = ParquetSource([tmp_path / "p0.parquet", tmp_path / "p1.parquet"])
    assert len(src) == 120 and src[75]["text"] == texts[75] and src[3]["n"] == 3
    cfg = data_cfg.replace(filter_quality=False, tokenizer=dataclasses.replace(
        data_cfg.tokenizer, path=str(prepared.tokenizer_dir)))
    batches = take_all(make_train_iterator(str(tmp_path / "*.parquet"), cfg, process_index=0, process_count=1,
                                           num_epochs=1))
    tok = prepared.tokenizer
    docs = [{"tokens": np.asarray(tok.encode(t, add_bos=True, add_eos=True))} for t in texts]
    assert stream_pieces(batches) == expected_pieces(docs, cfg.seq_len)


def test_unpacked_rows_hold_one_document_piece_each(prepared, data_cfg, token_docs):
    """data.pack=false (sparse attention): one piece per row, padded; still every token once."""
    cfg = data_cfg.replace(filter_quality=False, pack=False)
    batches = take_all(make_train_iterator(prepared, cfg, process_index=0, process_count=1, num_epochs=1))
    for b in batches:
        check_layout(b, cfg, prepared.tokenizer.pad_id)
        assert (b["segment_ids"].max(axis=1) <= 1).all()
    assert stream_pieces(batches) == expected_pieces(token_docs, cfg.seq_len)
