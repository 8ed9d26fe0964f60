"""Which part may import which (../shared/docs/design.md), checked on the source: every import statement, the ones
inside functions included, so a cycle cannot hide behind a function-local import."""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CORE = "minicpm_jax (model level)"


def part_of_module(name: str) -> str | None:
    """The part a dotted module name belongs to, or None for third-party / stdlib modules."""
    top = name.split(".")
    if top[0] == "minicpm_jax":
        sub = top[1] if len(top) > 1 else ""
        return f"minicpm_jax.{sub}" if sub in ("train", "export", "cli", "bench", "evals") else CORE
    if top[0] in ("data_pipeline", "pallas_kernels", "experiments"):
        return top[0]
    return None


def imports(repo: Path = REPO):
    """(file:line, importing part, imported module) for every import in minicpm_jax/, data_pipeline/,
    pallas_kernels/."""
    for root in ("minicpm_jax", "data_pipeline", "pallas_kernels"):
        for path in sorted((repo / root).rglob("*.py")):
            rel = path.relative_to(repo)
            src = part_of_module(".".join(rel.with_suffix("").parts))
            for node in ast.walk(ast.parse(path.read_text(), str(rel))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    # `from minicpm_jax import export` imports the subpackage; `from a.b import f` imports a.b
                    names = ([f"{node.module}.{a.name}" for a in node.names] if "." not in node.module
                             else [node.module])
                else:
                    continue
                for name in names:
                    yield f"{rel}:{node.lineno}", src, name


def import_graph(repo: Path = REPO) -> dict[str, dict[str, set[str]]]:
    """{importing part: {imported part: {"file:line", ...}}}."""
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for where, src, name in imports(repo):
        dst = part_of_module(name)
        if dst is not None and dst != src:
            graph[src][dst].add(where)
    return graph


FORBIDDEN = [
    ("minicpm_jax.train", "minicpm_jax.export"), ("minicpm_jax.export", "minicpm_jax.train"),
    (CORE, "minicpm_jax.train"), (CORE, "minicpm_jax.export"), (CORE, "minicpm_jax.cli"), (CORE, "minicpm_jax.bench"),
    ("minicpm_jax.train", "minicpm_jax.cli"), ("minicpm_jax.export", "minicpm_jax.cli"),
    ("minicpm_jax.bench", "minicpm_jax.cli"), ("data_pipeline", CORE), ("data_pipeline", "minicpm_jax.train"),
    ("data_pipeline", "minicpm_jax.cli"), ("pallas_kernels", CORE), ("pallas_kernels", "data_pipeline"),
    (CORE, "minicpm_jax.evals"), ("minicpm_jax.train", "minicpm_jax.evals"), ("minicpm_jax.export", "minicpm_jax.evals"),
    ("minicpm_jax.evals", "minicpm_jax.cli"), ("data_pipeline", "minicpm_jax.evals"),
] + [(part, "experiments") for part in (CORE, "minicpm_jax.train", "minicpm_jax.export", "minicpm_jax.cli",
                                        "minicpm_jax.bench", "minicpm_jax.evals", "data_pipeline", "pallas_kernels")]


@pytest.mark.parametrize("src,dst", FORBIDDEN, ids=[f"{a} -> {b}" for a, b in FORBIDDEN])
def test_forbidden_import(src, dst):
    where = sorted(import_graph().get(src, {}).get(dst, ()))
    assert not where, f"{src} imports {dst} at {where}"


def test_the_model_level_reads_only_the_tokenizer_from_the_data_side():
    """The weight resolver hands back a checkpoint's tokenizer; nothing else of the data pipeline reaches the model."""
    where = {(w, n) for w, src, n in imports() if src == CORE and n.startswith("data_pipeline")}
    assert {n for _, n in where} <= {"data_pipeline.tokenizer"}, where


def test_evaluation_reaches_export_only_for_running_a_gguf():
    """`minicpm eval --gguf` scores an export through llama.cpp: the evals part reuses `export.llamacpp` (the parity
    settings, the file check, the AMX probe) rather than a second llama.cpp loader, and nothing else of export (the
    reverse, export -> evals, is forbidden above)."""
    used = {n for _, src, n in imports() if src == "minicpm_jax.evals" and part_of_module(n) == "minicpm_jax.export"}
    assert used == {"minicpm_jax.export.llamacpp"}, used


def test_the_graph_finds_imports_inside_functions(tmp_path):
    """The checker itself: a function-local import across parts is seen."""
    pkg = tmp_path / "minicpm_jax" / "export"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("def f():\n    from minicpm_jax.train.loop import run\n")
    (tmp_path / "data_pipeline").mkdir()
    (tmp_path / "pallas_kernels").mkdir()
    assert set(import_graph(tmp_path)["minicpm_jax.export"]["minicpm_jax.train"]) == {"minicpm_jax/export/x.py:2"}


if __name__ == "__main__":   # print the graph (for notes and reviews)
    for s, dsts in sorted(import_graph().items()):
        print(f"{s:28} -> {', '.join(sorted(dsts))}")
