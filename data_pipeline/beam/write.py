"""Kept token records -> `<out>/<split>/<source>-XXXXX-of-YYYYY.array_record`, the shard layout the grain
pipeline reads (records.list_shards / shard_prefix; `group_size:1` as records.write_shards writes).

A source gets ceil(token bytes / target_shard_mb) shards; a record's shard is a hash of its uid and records in a
shard are sorted by uid, so the files do not depend on the runner or the number of workers.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from data_pipeline import records


def shard_of(uid: str, n: int) -> int:
    return int(hashlib.sha1(uid.encode("utf-8")).hexdigest()[:8], 16) % n


class WriteShard(beam.DoFn):
    """((split, source, index, count), [(uid, record, tokens)]) -> one ArrayRecord shard; yields its summary."""

    def __init__(self, out: str):
        self.out = out

    def process(self, element):
        from array_record.python.array_record_module import ArrayRecordWriter  # C extension

        (split, source, index, count), recs = element
        recs = sorted(recs, key=lambda r: r[0])
        rel = f"{split}/{records.shard_name(source, index, count)}"
        final = FileSystems.join(self.out, split, records.shard_name(source, index, count))
        local_dir = os.path.dirname(final) if "://" not in final else None
        if local_dir:
            os.makedirs(local_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{source}-{index:05d}.", dir=local_dir)
        os.close(fd)
        try:
            w = ArrayRecordWriter(tmp, "group_size:1")
            for _, rec, _ in recs:
                w.write(rec)
            w.close()
            if local_dir:
                os.replace(tmp, final)  # atomic: a shard is never visible half-written
            else:
                with open(tmp, "rb") as src, FileSystems.create(final) as dst:
                    shutil.copyfileobj(src, dst)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        yield {"split": split, "source": source, "path": rel, "records": len(recs),
               "tokens": sum(r[2] for r in recs)}


class WriteTokenShards(beam.PTransform):
    """(split, source, uid, record, tokens, text bytes) -> shard summaries {split, source, path, records, tokens}."""

    def __init__(self, out: str, target_shard_bytes: int):
        super().__init__()
        self.out = out
        self.target = target_shard_bytes

    def expand(self, kept):
        sizes = (kept | "RecordBytes" >> beam.Map(lambda k: ((k[0], k[1]), len(k[3])))
                 | "BytesPerSource" >> beam.CombinePerKey(sum))
        target = self.target

        def key(k, sizes):
            n = max(1, math.ceil(sizes[(k[0], k[1])] / target))
            return (k[0], k[1], shard_of(k[2], n), n), (k[2], k[3], k[4])

        return (kept | "ShardKey" >> beam.Map(key, sizes=beam.pvalue.AsDict(sizes))
                | "GroupByShard" >> beam.GroupByKey()
                | "WriteShard" >> beam.ParDo(WriteShard(self.out)))
