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


def shingles(text: str, n: int) -> list[bytes]:
    """Distinct n-grams of the normaliser's tokens (words; one token per CJK character) of the normalised text."""
    toks = simple_tokens(clean(text))
    if len(toks) <= n:
        return [" ".join(toks).encode("utf-8")]
    return list({" ".join(toks[i:i + n]).encode("utf-8") for i in range(len(toks) - n + 1)})


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
        template = MinHash(num_perm=self.cfg.num_perm, seed=self.cfg.seed)
        self.perms, self.scheme = template.permutations, template.scheme

    def process(self, doc):
        m = MinHash(num_perm=self.cfg.num_perm, seed=self.cfg.seed, permutations=self.perms, scheme=self.scheme)
        m.update_batch(shingles(doc["text"], self.cfg.shingle))
        sig = np.asarray(m.hashvalues)
        for b in range(self.bands):
            band = sig[b * self.rows:(b + 1) * self.rows].tobytes()
            yield (b, hashlib.sha1(band).hexdigest()[:16]), (doc["uid"], doc["id"], sig)


class FindNearDuplicates(beam.DoFn):
    """(band bucket, members) -> (uid, (earlier id, estimated Jaccard)) for members similar to an earlier one."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg

    def process(self, element):
        _, members = element
        members = sorted(members, key=lambda m: m[0])
        for j in range(1, len(members)):
            uid, _, sig = members[j]
            for k in range(max(0, j - self.cfg.max_bucket_compare), j):
                est = float(np.mean(members[k][2] == sig))
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
