"""UltraClean quality classifier: fastText (`fasttext-numpy2`) trained on verified seeds, refined iteratively, and
evaluated on sources held out whole (never a random split, which is too easy: every variant scores >= 0.985 there).

Round 0 trains on a `seed_fraction` of the labelled training documents (hq -> `__label__pos`, raw ->
`__label__neg`). Each later round scores the pool (every other training document), adds the confident
predictions (P(pos) >= confident_pos as positives, <= confident_neg as negatives) to the seeds, rebalances
(pos:neg = 1:neg_ratio, capped at max_train_docs) and retrains: the paper's iterative loop. Every round is scored
on the held-out sources: precision, recall and F1 at the threshold, and ROC AUC. The score of a document is
P(__label__pos).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from data_pipeline import corpus as C
from data_pipeline import records
from data_pipeline.config import ClassifierConfig, DataConfig
from data_pipeline.normalize import Preprocessor
from data_pipeline.tokenizer import Tokenizer

log = logging.getLogger("data_pipeline")

POS, NEG = "__label__pos", "__label__neg"


# ---------------------------------------------------------------- metrics
def roc_auc(scores: np.ndarray, labels: np.ndarray) -> Optional[float]:
    """Area under the ROC curve (Mann-Whitney U, ties count half); None without both classes."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), float)
    s = scores[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    pred = scores >= threshold
    tp = int((pred & labels).sum())
    fp = int((pred & ~labels).sum())
    fn = int((~pred & labels).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    auc = roc_auc(scores, labels)
    return {"n_pos": int(labels.sum()), "n_neg": int((~labels).sum()), "precision": round(precision, 4),
            "recall": round(recall, 4), "f1": round(f1, 4), "accuracy": round(float((pred == labels).mean()), 4)
            if len(labels) else None, "auc": None if auc is None else round(auc, 4)}


# ---------------------------------------------------------------- model
class QualityClassifier:
    """A trained fastText model plus its preprocessing; `score(texts)` -> P(pos) per text.

    Picklable (grain workers): the fastText model and tokenizer are loaded lazily in each process.
    """

    def __init__(self, model_path: str | Path, tokenization: str = "spm", tokenizer_path: Optional[str] = None,
                 threshold: float = 0.5):
        self.model_path = str(model_path)
        self.tokenization = tokenization
        self.tokenizer_path = tokenizer_path
        self.threshold = threshold
        self._model = None
        self._pre: Optional[Preprocessor] = None

    @classmethod
    def load(cls, directory: str | Path) -> "QualityClassifier":
        d = Path(directory)
        meta = records.read_json(d / "classifier.json")
        tok = meta.get("tokenizer_path")
        return cls(d / meta["model"], meta["tokenization"], tok, meta["threshold"])

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_model", "_pre")} | {"_model": None,
                                                                                           "_pre": None}

    @property
    def model(self):
        if self._model is None:
            import fasttext   # C extension: loaded only where a classifier is trained or run

            self._model = fasttext.load_model(self.model_path)
        return self._model

    @property
    def preprocess(self) -> Preprocessor:
        if self._pre is None:
            self._pre = preprocessor(self.tokenization, self.tokenizer_path)
        return self._pre

    def predict_lines(self, lines: Sequence[str]) -> np.ndarray:
        """P(pos) for already preprocessed lines (empty lines score 0: nothing to judge)."""
        return predict_pos(self.model, lines)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        return self.predict_lines(self.preprocess.many(texts))


def preprocessor(tokenization: str, tokenizer_path: Optional[str]) -> Preprocessor:
    if tokenization != "spm":
        return Preprocessor(tokenization)

    if tokenizer_path is None:
        raise ValueError("classifier.tokenization 'spm' needs a tokenizer path")
    tok = Tokenizer.load(tokenizer_path)
    pieces = [p for p, _, _ in tok.pieces()]
    return Preprocessor("spm", pieces, tok.encode_batch)


def preprocess_many(texts: Sequence[str], tokenization: str, tokenizer_path: Optional[str]) -> list[str]:
    """Preprocess many texts (the Python side is the bottleneck of scoring: fastText predicts ~20k docs/s)."""
    return preprocessor(tokenization, tokenizer_path).many(texts)


def predict_pos(model, lines: Sequence[str]) -> np.ndarray:
    out = np.zeros(len(lines), np.float32)
    idx = [i for i, line in enumerate(lines) if line.strip()]
    if not idx:
        return out
    labels, probs = model.predict([lines[i] for i in idx], k=2)
    for j, (labs, ps) in enumerate(zip(labels, probs)):
        p = dict(zip(labs, ps))
        out[idx[j]] = min(1.0, max(0.0, float(p.get(POS, 1.0 - p.get(NEG, 1.0)))))
    return out


def _run_ftrain(args: dict) -> None:
    """Run data_pipeline.ftrain in a child interpreter with zero-filled malloc (see its docstring for why)."""
    path = [str(Path(__file__).resolve().parent.parent)] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "MALLOC_PERTURB_": "255"}  # zero-filled malloc
    r = subprocess.run([sys.executable, "-m", "data_pipeline.ftrain", json.dumps(args)], capture_output=True,
                       text=True, env=env)
    if r.returncode == 3:
        raise FloatingPointError(r.stderr.strip())
    if r.returncode != 0:
        raise RuntimeError(f"fastText subprocess failed ({r.returncode}): {r.stderr.strip()[-800:]}")


def _train_fasttext(lines: list[str], labels: list[bool], cfg: ClassifierConfig, tmp_dir: Path, seed: int):
    """Train on (line, label) pairs in a fresh process and load the model here."""
    import fasttext   # C extension: loaded only where a classifier is trained or run

    tmp_dir.mkdir(parents=True, exist_ok=True)
    path = tmp_dir / f".train-{os.getpid()}.txt"
    model_path = tmp_dir / f".model-{os.getpid()}.bin"
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)  # fastText reads the file in order: sorted labels make SGD diverge
    try:
        with open(path, "w", encoding="utf-8") as f:
            for i in order:
                f.write(f"{POS if labels[i] else NEG} {lines[i]}\n")
        lr = cfg.lr
        n_tokens = sum(line.count(" ") + 1 for line in lines)
        epochs = min(100, max(cfg.epochs, -(-cfg.min_updates // max(n_tokens, 1))))
        for attempt in range(3):
            params = dict(dim=cfg.dim, lr=lr, wordNgrams=cfg.word_ngrams, minCount=cfg.min_count, epoch=epochs,
                          bucket=cfg.bucket, thread=cfg.threads, seed=seed, verbose=0, loss="softmax")
            try:
                _run_ftrain({"input": str(path), "output": str(model_path), "params": params})
                model = fasttext.load_model(str(model_path))
                model.train_epochs = epochs  # what was used, for the report
                return model
            except FloatingPointError as e:  # SGD diverged ("Encountered NaN"): halve the learning rate
                if attempt == 2:
                    raise RuntimeError(f"fastText training diverged down to lr={lr}: {e}; lower data.classifier.lr")
                log.warning("fastText diverged with lr=%g; retrying with lr=%g", lr, lr / 2)
                lr /= 2
    finally:
        for p in (path, model_path):
            if p.exists():
                p.unlink()


def _quantize(model_path: Path, out_path: Path, threads: int):
    import fasttext   # C extension: loaded only where a classifier is trained or run

    _run_ftrain({"quantize_from": str(model_path), "output": str(out_path), "thread": threads})
    return fasttext.load_model(str(out_path))


# ---------------------------------------------------------------- training loop
@dataclasses.dataclass
class _Docs:
    lines: list[str]
    labels: list[Optional[bool]]  # seed label from the source (None = unlabelled)
    sources: list[str]


def _load(corpus_dir: Path, names: Sequence[str], split: Optional[str], lines_by_id: dict[str, str]) -> _Docs:
    lines, labels, srcs = [], [], []
    for d in C.iter_docs(corpus_dir, names, split=split):
        lines.append(lines_by_id[d["id"]])
        labels.append(None if d.get("label") is None else d["label"] == "hq")
        srcs.append(d["source"])
    return _Docs(lines, labels, srcs)


def preprocess_corpus(corpus_dir: str | Path, tokenization: str, tokenizer_path: Optional[str]) -> dict[str, str]:
    """doc id -> classifier input line, for every document of a built corpus."""
    docs = list(C.iter_docs(corpus_dir))
    lines = preprocess_many([d["text"] for d in docs], tokenization, tokenizer_path)
    return {d["id"]: line for d, line in zip(docs, lines)}


def heldout_sources(manifest: dict, cfg: ClassifierConfig) -> list[str]:
    if cfg.heldout_sources:
        missing = [s for s in cfg.heldout_sources if s not in manifest["sources"]]
        if missing:
            raise ValueError(f"data.classifier.heldout_sources: {missing} are not in the corpus "
                             f"({', '.join(manifest['sources'])})")
        return list(cfg.heldout_sources)
    return [n for n, m in manifest["sources"].items() if m.get("heldout") and m.get("label")]


def _balance(pos: list[int], neg: list[int], cfg: ClassifierConfig, rank: dict[int, str]) -> tuple[list, list]:
    """pos:neg = 1:neg_ratio, at most max_train_docs: the first documents in the seeded hash order."""
    n_pos = min(len(pos), int(cfg.max_train_docs / (1 + cfg.neg_ratio)), int(len(neg) / cfg.neg_ratio))
    n_neg = min(len(neg), int(round(n_pos * cfg.neg_ratio)))
    return sorted(pos, key=rank.__getitem__)[:n_pos], sorted(neg, key=rank.__getitem__)[:n_neg]


def _per_source(scores: np.ndarray, sources: list[str], threshold: float) -> dict:
    out = {}
    for s in sorted(set(sources)):
        m = np.array([x == s for x in sources])
        out[s] = {"docs": int(m.sum()), "mean_score": round(float(scores[m].mean()), 4),
                  "kept": round(float((scores[m] >= threshold).mean()), 4)}
    return out


def train_classifier(corpus_dir: str | Path, out_dir: str | Path, cfg: DataConfig,
                     tokenizer_path: Optional[str | Path] = None,
                     lines_by_id: Optional[dict[str, str]] = None) -> dict:
    """Train the iterative UltraClean classifier on a built corpus; write `model.ftz|bin`, `classifier.json`
    (how to load it) and `rounds.json` (metrics per round); return the report. `lines_by_id` (from
    preprocess_corpus) saves preprocessing the corpus again."""
    t_all = time.time()
    ccfg = cfg.classifier
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = C.load_manifest(corpus_dir)
    tok_path = str(tokenizer_path) if tokenizer_path else None
    held = heldout_sources(manifest, ccfg)
    train_names = [n for n in manifest["sources"] if n not in held]
    t0 = time.time()
    if lines_by_id is None:
        lines_by_id = preprocess_corpus(corpus_dir, ccfg.tokenization, tok_path)
    train = _load(corpus_dir, train_names, "train", lines_by_id)
    test = _load(corpus_dir, held, None, lines_by_id)
    test = _Docs(*zip(*[(l, y, s) for l, y, s in zip(test.lines, test.labels, test.sources) if y is not None])) \
        if any(y is not None for y in test.labels) else _Docs([], [], [])
    t_pre = time.time() - t0
    n_docs = len(train.lines) + len(test.lines)
    log.info("classifier: %d docs ready in %.1f s; held out: %s", n_docs, t_pre, ", ".join(held) or "none")

    # Documents are ranked by a seeded hash of their content (not a shuffle of the list): which ones become seeds
    # does not change when a few documents more or fewer exist on another machine.
    rank = {i: hashlib.sha1(f"{cfg.seed}/{line}".encode()).hexdigest() for i, line in enumerate(train.lines)}
    labelled = sorted((i for i, y in enumerate(train.labels) if y is not None), key=rank.__getitem__)
    n_seed = max(2, int(round(len(labelled) * ccfg.seed_fraction)))
    seed_list = labelled[:n_seed]
    seeds = set(seed_list)
    seed_pos = [i for i in seed_list if train.labels[i]]
    seed_neg = [i for i in seed_list if not train.labels[i]]
    if not seed_pos or not seed_neg:
        raise ValueError(f"classifier: need seed documents of both labels; got {len(seed_pos)} hq and "
                         f"{len(seed_neg)} raw from sources {train_names}")
    pool = [i for i in range(len(train.lines)) if i not in seeds]
    test_y = np.array(test.labels, bool)

    rounds, model = [], None
    pos, neg = seed_pos, seed_neg
    for r in range(ccfg.rounds):
        if r > 0:  # score the pool, promote confident predictions to seeds
            ps = predict_pos(model, [train.lines[i] for i in pool])
            new_pos = [i for i, p in zip(pool, ps) if p >= ccfg.confident_pos]
            new_neg = [i for i, p in zip(pool, ps) if p <= ccfg.confident_neg]
            pos, neg = seed_pos + new_pos, seed_neg + new_neg
            known = [(train.labels[i], True) for i in new_pos] + [(train.labels[i], False) for i in new_neg]
            agree = [a == b for a, b in known if a is not None]
        bp, bn = _balance(pos, neg, ccfg, rank)
        t1 = time.time()
        model = _train_fasttext([train.lines[i] for i in bp + bn], [True] * len(bp) + [False] * len(bn), ccfg,
                                out_dir, cfg.seed)
        t_train = time.time() - t1
        info = {"round": r, "train_pos": len(bp), "train_neg": len(bn), "epochs": model.train_epochs,
                "train_seconds": round(t_train, 2)}
        if r > 0:
            info.update(promoted_pos=len(pos) - len(seed_pos), promoted_neg=len(neg) - len(seed_neg),
                        promoted_agree_with_source_label=round(float(np.mean(agree)), 4) if agree else None)
        if len(test.lines):
            s = predict_pos(model, test.lines)
            info["heldout"] = binary_metrics(s, test_y, ccfg.threshold)
            info["heldout_by_source"] = _per_source(s, list(test.sources), ccfg.threshold)
        rounds.append(info)
        h = info.get("heldout") or {}
        log.info("classifier round %d: %d pos / %d neg, %.1f s; held-out P=%s R=%s AUC=%s", r, len(bp), len(bn),
                 t_train, h.get("precision"), h.get("recall"), h.get("auc"))

    model_name = "model.ftz" if ccfg.quantize else "model.bin"
    final = {}
    with records.atomic_path(out_dir / "model.bin") as tmp:
        model.save_model(str(tmp))
    if ccfg.quantize:
        t1 = time.time()
        with records.atomic_path(out_dir / "model.ftz") as tmp:
            model = _quantize(out_dir / "model.bin", tmp, ccfg.threads)
        (out_dir / "model.bin").unlink()
        final["quantize_seconds"] = round(time.time() - t1, 2)
    if len(test.lines):
        s = predict_pos(model, test.lines)
        final["heldout"] = binary_metrics(s, test_y, ccfg.threshold)
    final["model_bytes"] = (out_dir / model_name).stat().st_size
    meta = {"model": model_name, "tokenization": ccfg.tokenization, "tokenizer_path": tok_path,
            "threshold": ccfg.threshold, "config": dataclasses.asdict(ccfg), "heldout_sources": held,
            "train_sources": train_names}
    records.write_json(out_dir / "classifier.json", meta)
    report = {"rounds": rounds, "final": final, "heldout_sources": held, "train_sources": train_names,
              "seconds": round(time.time() - t_all, 2), "config": dataclasses.asdict(ccfg)}
    records.write_json(out_dir / "rounds.json", report)
    return report


def format_rounds(report: dict) -> str:
    """A table of held-out precision / recall / F1 / AUC per round."""
    lines = [f"{'round':>5} {'pos':>6} {'neg':>6} {'P':>6} {'R':>6} {'F1':>6} {'AUC':>6}"]
    for r in report["rounds"]:
        h = r.get("heldout") or {}
        lines.append(f"{r['round']:>5} {r['train_pos']:>6} {r['train_neg']:>6} {h.get('precision', '-')!s:>6} "
                     f"{h.get('recall', '-')!s:>6} {h.get('f1', '-')!s:>6} {h.get('auc', '-')!s:>6}")
    f = report.get("final", {}).get("heldout")
    if f:
        lines.append(f"final (saved{' quantized' if report['config']['quantize'] else ''}): P={f['precision']} "
                     f"R={f['recall']} AUC={f['auc']}  ({report['final']['model_bytes'] / 1e6:.1f} MB)")
    lines.append("held out by source: " + ", ".join(report["heldout_sources"]))
    if report["rounds"] and report["rounds"][-1].get("heldout_by_source"):
        for s, m in report["rounds"][-1]["heldout_by_source"].items():
            lines.append(f"  {s:24s} docs={m['docs']:5d} mean={m['mean_score']:.3f} kept={m['kept']:.3f}")
    return "\n".join(lines)
