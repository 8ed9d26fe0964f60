"""HF checkpoints: save -> load is bit-exact (sharded and single file, fp32 and bf16); broken ones fail clearly."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import minicpm_jax as mc
from minicpm_jax.convert.hf import INDEX_NAME, params_to_hf_tensors


def tiny(**kw):
    return mc.ModelConfig.tiny(num_hidden_layers=2, vocab_size=384, **kw)


def same_tree(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("shard_bytes", [None, 300_000])
def test_round_trip_is_bit_exact(tmp_path, tied, shard_bytes):
    cfg = tiny(tie_word_embeddings=tied)
    params = mc.init_params(cfg, jax.random.key(0))
    kw = {} if shard_bytes is None else {"max_shard_bytes": shard_bytes}
    mc.save_hf(tmp_path / "ckpt", cfg, params, **kw)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    if shard_bytes:
        assert INDEX_NAME in files and sum(f.endswith(".safetensors") for f in files) > 2
    else:
        assert "model.safetensors" in files and INDEX_NAME not in files
    cfg2, params2 = mc.load_hf(tmp_path / "ckpt")
    assert cfg2.replace(extra={}) == cfg and cfg2.extra == {"torch_dtype": "float32"}
    assert same_tree(params, params2)
    ids = jnp.arange(24, dtype=jnp.int32).reshape(2, 12)
    assert np.array_equal(mc.forward(params, cfg, ids), mc.forward(params2, cfg2, ids))
    names = set()
    for f in (tmp_path / "ckpt").glob("*.safetensors"):
        names |= set(load_file(f))
    assert ("lm_head.weight" in names) == (not tied)


def test_bf16_round_trip_and_dtype_cast(tmp_path):
    cfg = tiny(param_dtype="bfloat16", dtype="bfloat16")
    params = mc.init_params(cfg, jax.random.key(1))
    mc.save_hf(tmp_path / "bf16", cfg, params)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    cfg2, params2 = mc.load_hf(tmp_path / "bf16", dtype=jnp.bfloat16)
    assert same_tree(params, params2)
    _, as_f32 = mc.load_hf(tmp_path / "bf16", dtype=jnp.float32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(as_f32))
    assert same_tree(jax.tree.map(lambda x: x.astype(jnp.bfloat16), as_f32), params)


def test_saving_over_an_existing_checkpoint_replaces_it_atomically(tmp_path):
    cfg = tiny()
    mc.save_hf(tmp_path / "c", cfg, mc.init_params(cfg, jax.random.key(0)))
    new = mc.init_params(cfg, jax.random.key(1))
    mc.save_hf(tmp_path / "c", cfg, new)
    assert same_tree(mc.load_hf(tmp_path / "c")[1], new)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]          # no temporary or old directories left


def _broken(tmp_path, mutate):
    cfg = tiny(tie_word_embeddings=False)
    mc.save_hf(tmp_path / "c", cfg, mc.init_params(cfg, jax.random.key(0)))
    f = tmp_path / "c" / "model.safetensors"
    tensors = load_file(f)
    mutate(tensors)
    save_file(tensors, f)
    return tmp_path / "c"


def test_missing_tensor_is_named_with_expected_shape(tmp_path):
    path = _broken(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight\s+expected shape \[768, 256\]"):
        mc.load_hf(path)


def test_extra_tensor_is_named(tmp_path):
    path = _broken(tmp_path, lambda t: t.__setitem__("model.layers.2.mlp.up_proj.weight", t["lm_head.weight"]))
    with pytest.raises(ValueError, match=r"unexpected tensor.*\n\s+model\.layers\.2\.mlp\.up_proj\.weight"):
        mc.load_hf(path)


def test_misshaped_tensor_names_both_shapes(tmp_path):
    path = _broken(tmp_path, lambda t: t.__setitem__("model.norm.weight", np.ones(255, np.float32)))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \[255\], expected \[256\]"):
        mc.load_hf(path)


def test_tied_config_with_a_different_head_is_rejected(tmp_path):
    path = _broken(tmp_path, lambda t: None)
    cfg_file = path / "config.json"
    d = json.loads(cfg_file.read_text())
    d["tie_word_embeddings"] = True
    cfg_file.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="lm_head.weight.*tie_word_embeddings"):
        mc.load_hf(path)


def test_broken_config_and_missing_shard_are_reported(tmp_path):
    cfg = tiny()
    mc.save_hf(tmp_path / "s", cfg, mc.init_params(cfg, jax.random.key(0)), max_shard_bytes=300_000)
    shard = sorted((tmp_path / "s").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        mc.load_hf(tmp_path / "s")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"hidden_size": 64,\n "num_attention_heads": }')
    with pytest.raises(ValueError, match=r"config\.json: invalid JSON at line 2"):
        mc.load_hf(tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 5}))
    with pytest.raises(ValueError, match="config.json.*num_attention_heads"):
        mc.load_hf(tmp_path / "bad")


def test_hf_tensor_layout_matches_minicpm_names():
    cfg = tiny(tie_word_embeddings=False)
    t = params_to_hf_tensors(cfg, mc.init_params(cfg, jax.random.key(0)))
    assert t["model.layers.0.self_attn.q_proj.weight"].shape == (256, 256)
    assert t["model.layers.1.self_attn.k_proj.weight"].shape == (128, 256)
    assert t["model.layers.0.self_attn.o_proj.weight"].shape == (256, 256)
    assert t["model.layers.0.mlp.down_proj.weight"].shape == (256, 768)
    assert t["lm_head.weight"].shape == (384, 256) and t["model.embed_tokens.weight"].shape == (384, 256)
    assert len(t) == 2 + 2 * 9 + 1
