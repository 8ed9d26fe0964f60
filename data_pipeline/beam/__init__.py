"""Corpus-scale preparation on Apache Beam (`minicpm data process`): the local preparation's steps as a pipeline
that runs embedded (DirectRunner, in-process or multi-process) or on Dataflow / Flink / Spark.

    read (JSONL / Parquet / text, any Beam filesystem) -> split into corpus documents -> exact dedup (hash of the
    normalised text) -> near-duplicate removal (MinHash LSH) -> UltraClean score -> threshold -> tokenize ->
    ArrayRecord token shards + manifest.json + report.json + drops-*.jsonl

One idea per module: `config` (ProcessConfig), `read` (files -> documents, dead letters), `dedup` (exact and
MinHash LSH), `score` (classifier + tokenizer, loaded once per worker), `write` (token shards), `report` (counts,
histogram, manifest), `run` (the pipeline and its driver). Every step calls the functions the local path calls
(corpus.parse_jsonl_line / user_doc_pieces, QualityClassifier.score, Tokenizer.encode_batch,
records.document_token_record), so both write the same records. Importing `data_pipeline` does not import Beam.
"""
