"""`minicpm eval --gguf`: the JAX model and its f32 / q8_0 exports scored on the same items, side by side; a GGUF
alone; and the errors for a missing or damaged file."""

from __future__ import annotations

import json

from minicpm_jax.cli import main
from minicpm_jax.evals.needles import read_jsonl
from tests.evals.test_cli_eval import minicpm


def test_checkpoint_and_two_exports_side_by_side(tiny, tiny_gguf, tmp_path):
    report = tmp_path / "out" / "report.json"
    r = minicpm("eval", "--checkpoint", str(tiny.hf_dir), "--gguf", str(tiny_gguf.f32), "--gguf", str(tiny_gguf.q8_0),
                "--tasks", "niah_en,minicpm_cloze_en", "--lengths", "256,512", "--depths", "0,1", "--samples", "1",
                "--limit", "4", "--batch-size", "4", "--gguf-threads", "1", "--report", str(report), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(report.read_text())
    assert doc["reference"] == "jax" and list(doc["models"]) == ["jax", "m-f32", "m-q8_0"]
    assert doc["mismatched_items"] == []
    models = doc["models"]
    assert "MOSTLY_Q8_0" in models["m-q8_0"]["model"]["model_source"]
    assert models["m-f32"]["model"]["backend"] == "minicpm_gguf" and models["jax"]["model"]["backend"] == "minicpm_jax"
    for m in models.values():
        assert set(m["tasks"]) == {"niah_en", "minicpm_cloze_en"} and all(t["seconds"] > 0 for t in m["tasks"].values())
    assert len({m["tasks"]["niah_en"]["items_sha256"] for m in models.values()}) == 1
    preds = {k: [p["prediction"] for p in read_jsonl(report.parent / "items" / k / "niah_en.predictions.jsonl")]
             for k in models}
    assert preds["m-f32"] == preds["jax"] and len(preds["jax"]) == 4
    assert models["m-f32"]["tasks"]["minicpm_cloze_en"]["value"] == models["jax"]["tasks"]["minicpm_cloze_en"]["value"]
    assert "| task | metric | jax | m-f32 | m-q8_0 | seconds (jax / m-f32 / m-q8_0) |" in r.stdout, r.stdout
    assert "| minicpm_cloze_en | acc |" in r.stdout and "| niah_en @ 512 | accuracy |" in r.stdout
    assert report.with_suffix(".png").stat().st_size > 10_000


def test_a_gguf_alone(tiny_gguf, tmp_path):
    """No checkpoint: the file's own tokenizer sizes the needle task that lm-eval builds (minicpm_niah_en)."""
    report = tmp_path / "report.json"
    r = minicpm("eval", "--gguf", str(tiny_gguf.q8_0), "--tasks", "minicpm_cloze_en,minicpm_niah_en", "--lengths",
                "1024", "--depths", "0", "--samples", "1", "--limit", "4", "--gguf-threads", "1", "--report",
                str(report), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(report.read_text())
    assert doc["model"]["backend"] == "minicpm_gguf" and set(doc["tasks"]) == {"minicpm_cloze_en", "minicpm_niah_en"}
    assert doc["tasks"]["minicpm_cloze_en"]["n"] == 4 and doc["tasks"]["minicpm_niah_en"]["n"] == 1


def test_missing_and_damaged_files_are_named(tiny, tiny_gguf, tmp_path, capsys):
    """In this process (the errors come before any model loads): exit status 2 and one line naming the file."""
    def run(*args) -> str:
        assert main(["eval", *args]) == 2
        return capsys.readouterr().err

    err = run("--checkpoint", str(tiny.hf_dir), "--gguf", str(tmp_path / "nope.gguf"), "--tasks", "niah_en")
    assert f"GGUF file {tmp_path / 'nope.gguf'} does not exist" in err, err
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 64)
    err = run("--gguf", str(junk), "--tasks", "niah_en")
    assert f"{junk}: not a readable GGUF file" in err, err
    assert "give --checkpoint RUN_OR_HF_DIR and/or --gguf FILE" in run("--tasks", "niah_en")
    assert "mesh overrides {'data': 2} place the JAX model" in run("--gguf", str(tiny_gguf.f32), "--tasks", "x",
                                                                 "mesh.data=2")
