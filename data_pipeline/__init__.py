"""Data side of minicpm-jax: real offline bilingual corpus, SentencePiece tokenizer, UltraClean classifier, grain.

    from data_pipeline.config import DataConfig
    from data_pipeline.prepare import prepare_data
    from data_pipeline.pipeline import make_train_iterator, make_eval_iterator

    cfg = DataConfig.from_dict(experiment["data"])
    prepared = prepare_data("runs/data", cfg)          # corpus, tokenizer, classifier, token shards (cached)
    it = make_train_iterator(prepared, cfg, process_index=0, process_count=1)
    batch = next(it)   # input_ids, segment_ids, positions, loss_mask: int32 [batch_size, seq_len]

This package knows no model and no trainer (it never imports minicpm_jax); importing it is cheap, each module
loads its heavy dependencies (grain, sentencepiece, fastText) itself.
"""
