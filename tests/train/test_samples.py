"""End-of-run samples: sampled with the config's temperature / top-p (greedy text of a small model degenerates)."""

import jax

import minicpm_jax as mc
from data_pipeline.prepare import load_prepared
from minicpm_jax.train.config import TrainLoopConfig
from minicpm_jax.train.samples import sample_text


def test_samples_use_temperature_and_top_p_and_greedy_stays_available(prepared_data_dir):
    tok = load_prepared(prepared_data_dir).tokenizer
    cfg = mc.ModelConfig.tiny(vocab_size=512, num_hidden_layers=2, hidden_size=128, intermediate_size=256,
                              dim_model_base=128, eos_token_id=tok.eos_id,
                              initializer_range=0.02)   # a flat untrained model: samples vary by seed
    params = mc.init_params(cfg, jax.random.key(3))
    d = TrainLoopConfig()
    assert d.sample_temperature > 0 and d.sample_top_p < 1           # the defaults a run uses
    prompts = ["The history of"]
    greedy = sample_text(params, cfg, tok, prompts, 24, temperature=0.0)
    ids = tok.encode(prompts[0], add_bos=True)
    ref = mc.generate(params, cfg, [ids], max_new_tokens=24, temperature=0.0).sequences()[0]
    assert greedy == [prompts[0] + tok.decode(ref)]                  # temperature 0 is exactly greedy decoding
    sampled = [sample_text(params, cfg, tok, prompts, 24, temperature=d.sample_temperature, top_p=d.sample_top_p,
                           seed=s)[0] for s in range(8)]
    # an untrained model is peaked, so a sample may equal the greedy text; across seeds they must vary
    assert any(s != greedy[0] for s in sampled) and len(set(sampled)) >= 3, (greedy, sampled)
