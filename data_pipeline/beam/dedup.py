"""Exact and near-duplicate removal, before scoring (the paper de-duplicates before filtering).

Both compare the *normalised* text (normalize.clean: whitespace runs, case, diacritics; the exact hash also
treats every whitespace run as one space), so copies that differ only in formatting are exact duplicates. Of a group of duplicates the document with the smallest `uid` (input
file, line, piece) is kept, whatever the runner's order or worker count. Near duplicates: datasketch MinHash
signatures of word shingles, grouped by LSH band with Beam's GroupByKey; within a band bucket each document is
compared with the earlier ones (estimated Jaccard = share of equal signature values) and dropped when one is at
or above the threshold. A chain A~B~C drops B and C even when A and C are not similar themselves.
"""

from __future__ import annotations

import hashlib
import zlib

import apache_beam as beam
import numpy as np
from datasketch import MinHash

from data_pipeline.beam.config import DedupConfig
from data_pipeline.beam.read import DROPPED, drop_row
from data_pipeline.normalize import clean, simple_tokens


def text_key(text: str) -> str:
    """Hash of the normalised text with every whitespace run as one space: equal for documents differing only in
    whitespace (line breaks included), case or diacritics."""
    return hashlib.sha1(" ".join(clean(text).split()).encode("utf-8")).hexdigest()


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """32-bit hashes of the distinct n-grams of the normaliser's tokens (words; one token per CJK character) of the
    normalised text. Each token is hashed once (crc32) and an n-gram's hash is a polynomial of its tokens' hashes,
    computed for all n-grams at once: hashing every n-gram string (datasketch's default, sha1 per shingle) was most
    of the dedup time."""
    toks = simple_tokens(clean(text))
    th = np.fromiter((zlib.crc32(t.encode("utf-8")) for t in toks), np.uint64, len(toks))
    if len(th) <= n:  # a short text is one shingle
        return np.array([zlib.crc32(" ".join(toks).encode("utf-8"))], np.uint64)
    m = len(th) - n + 1
    h = np.zeros(m, np.uint64)
    for k in range(n):  # uint64 arithmetic wraps: deterministic on every machine
        h = h * np.uint64(1_000_003) + th[k:k + m]
    return np.unique(h & np.uint64(0xFFFFFFFF))


def _drop(doc: dict, reason: str, detail: str) -> beam.pvalue.TaggedOutput:
    return beam.pvalue.TaggedOutput(DROPPED, drop_row(doc["file"], doc["line"], reason, detail, source=doc["source"],
                                                      doc_id=doc["id"], nbytes=len(doc["text"].encode("utf-8"))))


class KeepFirstOfGroup(beam.DoFn):
    """(hash, documents) -> the document with the smallest uid; the others are dropped as duplicate_exact."""

    def process(self, element):
        _, docs = element
        docs = sorted(docs, key=lambda d: d["uid"])
        yield docs[0]
        for d in docs[1:]:
            yield _drop(d, "duplicate_exact", f"same normalised text as {docs[0]['id']}")


class ExactDedup(beam.PTransform):
    """documents -> documents without exact duplicates (+ DROPPED)."""

    def expand(self, docs):
        return (docs | "HashText" >> beam.Map(lambda d: (text_key(d["text"]), d))
                | "GroupByHash" >> beam.GroupByKey()
                | "KeepFirst" >> beam.ParDo(KeepFirstOfGroup()).with_outputs(DROPPED, main="docs"))


class BandKeys(beam.DoFn):
    """document -> ((band, hash of the band's signature rows), (uid, signature)) for each LSH band."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg

    def setup(self):
        self.bands, self.rows = self.cfg.band_rows()
        # one set of permutations for every signature (datasketch would draw them again per MinHash)
        template = MinHash(num_perm=self.cfg.num_perm, seed=self.cfg.seed, hashfunc=int)
        self.perms, self.scheme = template.permutations, template.scheme

    def process(self, doc):
        # the shingle hashes are the values datasketch permutes (hashfunc=int: already hashed)
        m = MinHash(num_perm=self.cfg.num_perm, seed=self.cfg.seed, hashfunc=int, permutations=self.perms,
                    scheme=self.scheme)
        m.update_batch(shingle_hashes(doc["text"], self.cfg.shingle).tolist())
        sig = np.asarray(m.hashvalues).tobytes()  # bytes: pickled between stages far faster than an ndarray
        width = self.rows * m.hashvalues.itemsize
        for b in range(self.bands):
            yield (b, hashlib.sha1(sig[b * width:(b + 1) * width]).digest()[:8]), (doc["uid"], doc["id"], sig)


class FindNearDuplicates(beam.DoFn):
    """(band bucket, members) -> (uid, (earlier id, estimated Jaccard)) for members similar to an earlier one."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg

    def process(self, element):
        _, members = element
        if len(members) < 2:
            return
        members = sorted(members, key=lambda m: m[0])
        dtype = np.uint32 if len(members[0][2]) == 4 * self.cfg.num_perm else np.uint64  # the MinHash scheme's
        sigs = [np.frombuffer(m[2], dtype) for m in members]
        for j in range(1, len(members)):
            uid = members[j][0]
            for k in range(max(0, j - self.cfg.max_bucket_compare), j):
                est = float(np.mean(sigs[k] == sigs[j]))
                if est >= self.cfg.jaccard:
                    yield uid, (members[k][1], est)
                    break


class DropMarked(beam.DoFn):
    """(uid, {"doc": [document], "dup": [(earlier id, Jaccard)...]}) -> the document, or a duplicate_near drop."""

    def process(self, element):
        _, g = element
        for doc in g["doc"]:
            if g["dup"]:
                other, est = min(g["dup"])
                yield _drop(doc, "duplicate_near", f"estimated Jaccard {est:.3f} with {other}")
            else:
                yield doc


class NearDedup(beam.PTransform):
    """documents -> documents without MinHash-LSH near duplicates (+ DROPPED)."""

    def __init__(self, cfg: DedupConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, docs):
        marks = (docs | "BandKeys" >> beam.ParDo(BandKeys(self.cfg))
                 | "GroupByBand" >> beam.GroupByKey()
                 | "Compare" >> beam.ParDo(FindNearDuplicates(self.cfg)))
        by_uid = docs | "KeyByUid" >> beam.Map(lambda d: (d["uid"], d))
        return ({"doc": by_uid, "dup": marks} | "JoinMarks" >> beam.CoGroupByKey()
                | "DropMarked" >> beam.ParDo(DropMarked()).with_outputs(DROPPED, main="docs"))
