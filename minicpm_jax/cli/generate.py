"""`minicpm generate`: text from a run or HF checkpoint (JAX), an exported GGUF (llama.cpp), or a random preset."""

from __future__ import annotations

import sys

import jax

import minicpm_jax as mc
from data_pipeline.tokenizer import Tokenizer
from minicpm_jax.export.llamacpp import generate_text
from minicpm_jax.sampling import GenerationSettings
from minicpm_jax.speculative.hf import load_draft_hf
from minicpm_jax.weights import load_weights


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint, a GGUF file or a random model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="HF directory (config.json + safetensors) or a training run directory")
    src.add_argument("--gguf", help="an exported GGUF file, run through llama.cpp (llama-cpp-python)")
    src.add_argument("--preset", help="a randomly initialised preset (tiny, minicpm4_0_5b, minicpm4_8b)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a training run (default: latest)")
    p.add_argument("--tokenizer", help="tokenizer.model / directory (default: the checkpoint's own)")
    p.add_argument("--prompt", default=None, help="prompt text")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template (user turn)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--truncate-prompt", action="store_true",
                   help="drop the oldest prompt tokens when prompt + --max-new-tokens exceed the model's positions "
                        "(default: refuse)")
    p.add_argument("--attention", default=None, choices=("auto", "dense", "sparse"),
                   help="default: the run's model.attention (auto for HF checkpoints and presets)")
    p.add_argument("--draft", default=None,
                   help="an EAGLE draft head directory (minicpm_jax.speculative.hf): decode speculatively (JAX only)")
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per target pass (a chain)")
    p.add_argument("--draft-tree", default=None,
                   help="comma-separated children per depth, e.g. 4,2,1: the draft proposes a static tree instead of "
                        "a chain (--draft-tokens is then unused)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    if args.prompt is None and args.prompt_ids is None:
        raise ValueError("give --prompt TEXT or --prompt-ids 1,2,3")
    if args.prompt is not None:
        try:
            args.prompt.encode("utf-8")
        except UnicodeEncodeError as e:   # bytes that are not UTF-8 reach Python as lone surrogates
            bad = args.prompt[e.start].encode("utf-8", "surrogateescape")
            raise ValueError(f"--prompt is not valid UTF-8 text (byte {bad!r} at character {e.start})") from None
    try:
        prompt_ids = [int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids else None
    except ValueError:
        raise ValueError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    draft_tree = None
    if args.draft_tree is not None:
        if not args.draft:
            raise ValueError("--draft-tree needs --draft DIR")
        try:
            draft_tree = tuple(int(x) for x in args.draft_tree.split(","))
        except ValueError:
            raise ValueError(f"--draft-tree must be comma-separated integers, got {args.draft_tree!r}") from None
        if any(x < 1 for x in draft_tree):
            raise ValueError(f"--draft-tree needs at least one child per depth, got {args.draft_tree!r}")
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_k, args.top_p)   # one check for both
    if args.draft and args.gguf:
        raise ValueError("--draft runs speculative decoding in JAX; it does not apply to --gguf")
    if args.gguf:
        print(generate_text(args.gguf, prompt=args.prompt, prompt_ids=prompt_ids, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            chat=args.chat, truncate_prompt=args.truncate_prompt))
        return 0
    tokenizer, attention = None, "auto"
    if args.checkpoint:
        w = load_weights(args.checkpoint, step=args.step)
        print(f"weights: {w.describe()}", file=sys.stderr)
        cfg, params, tokenizer, attention = w.cfg, w.params, w.tokenizer, w.attention
    else:
        cfg = mc.ModelConfig.from_preset(args.preset or "tiny")
        params = mc.init_params(cfg, jax.random.key(args.seed))
    if args.tokenizer:
        tokenizer = Tokenizer.load(args.tokenizer)
    if prompt_ids is None:
        if tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer; pass --tokenizer or --prompt-ids")
        text = (tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
                if args.chat else args.prompt)
        prompt_ids = tokenizer.encode(text, add_bos=True)
    prompt_ids = prompt_ids[settings.fit_prompt(len(prompt_ids), cfg.max_position_embeddings, args.truncate_prompt):]
    draft = load_draft_hf(args.draft, cfg) if args.draft else None
    out = mc.generate(params, cfg, [prompt_ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, rng=jax.random.key(args.seed),
                      attention=args.attention or attention, draft=draft, draft_tokens=args.draft_tokens,
                      draft_tree=draft_tree)
    ids = out.sequences()[0]
    if draft is not None:
        passes, kept = int(out.target_passes[0]), int(out.accepted[0])
        print(f"speculative: {len(ids)} tokens in {passes} target passes after the prefill ({kept} drafted tokens "
              f"kept, {(kept + passes) / max(passes, 1):.2f} tokens per pass)", file=sys.stderr)
    print(tokenizer.decode(ids) if tokenizer is not None else ",".join(map(str, ids)))
    return 0
