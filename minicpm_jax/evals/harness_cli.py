"""lm-eval's own command line, with the `minicpm_jax` model registered and our task directory on the include path.

    python -m minicpm_jax.evals.harness_cli run --model minicpm_jax --model_args pretrained=runs/tiny,step=200 \\
        --tasks minicpm_cloze_en,minicpm_niah_en --batch_size 8 --metadata '{"max_seq_lengths": [1024, 2048]}'

Every argument is lm-eval's (`lm-eval run --help`). lm-eval has no plugin entry point for models, so its `lm-eval`
script cannot see a model that lives in another package; this module is that script plus the registration. Give
the batch size with `--batch_size` (lm-eval passes its own default of 1 to the model; a `batch_size` in
--model_args as well would be a duplicate argument).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import minicpm_jax.evals as ev   # registers "minicpm_jax"

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("run", "ls", "validate") or any(a.startswith("--model") for a in args):
        if not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
            args += ["--include_path", str(ev.TASKS_DIR)]
    sys.argv = ["lm-eval"] + args
    cli_evaluate()


if __name__ == "__main__":
    main()
