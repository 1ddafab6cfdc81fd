"""``dlbhooks explain CHECKPOINT`` and ``dlbhooks report RESULT``: explain a prediction of
any Hugging Face checkpoint directory on disk (what ``from_pretrained`` reads; no hub
access) and look at it — a text summary, a self-contained HTML report, a saved result."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

import dlbhooks as dlb
from dlbhooks.api import last_logits_only
from dlbhooks.explaining import token_target

#: config architectures suffix -> (transformers Auto class, task)
_HEADS = (("ForCausalLM", "AutoModelForCausalLM"), ("LMHeadModel", "AutoModelForCausalLM"),
          ("ForConditionalGeneration", None),
          ("ForSequenceClassification", "AutoModelForSequenceClassification"),
          ("ForMaskedLM", "AutoModelForMaskedLM"))
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


class CommandError(Exception):
    """A problem with what the command was given, said in one line."""


def add_explain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint directory (config.json + weights; its "
                   "tokenizer too, unless --ids is given)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text to explain the prediction for")
    src.add_argument("--prompt-file", help="a file holding the text")
    src.add_argument("--ids", help="token ids instead of text, comma-separated")
    p.add_argument("--target", default=None, help="what to explain: a token string or id "
                   "(language models), a class index or label (classifiers); default: the "
                   "prediction")
    p.add_argument("--position", type=int, default=None,
                   help="the sequence position explained (default: the last token; masked "
                        "LMs: the mask token)")
    p.add_argument("--mode", choices=["default", "contrastive"], default="default")
    add_loading_arguments(p)
    p.add_argument("--storage", default=None,
                   help="where records keep tensors: cpu, bf16, cpu+bf16 (see README)")
    p.add_argument("--top", type=int, default=10, help="input tokens listed in the summary")
    g = p.add_argument_group("generation (causal LMs): explain each generated token")
    g.add_argument("--generate", type=int, default=None, metavar="N",
                   help="generate N tokens after the prompt and explain them")
    g.add_argument("--explain-tokens", default="all",
                   help="which generated tokens to explain: all, the first K (a number), or "
                        "indices separated by commas (the others are left as NaN rows)")
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None,
                   help="generation's sampling temperature")
    g.add_argument("--num-beams", type=int, default=None)
    g.add_argument("--seed", type=int, default=None, help="torch seed for sampling")
    p.add_argument("--out", help="write the HTML report here")
    p.add_argument("--save", help="write the result (safetensors) here")


def add_loading_arguments(p: argparse.ArgumentParser) -> None:
    """How a checkpoint is loaded (``dlbhooks explain``, ``experts``, ``prune``)."""
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--device-map", default=None,
                   help="accelerate device map for models larger than memory: auto, cpu, ... "
                        "or a JSON object {module: device or \"disk\"}")
    p.add_argument("--offload-folder", default=None,
                   help="where weights mapped to \"disk\" go (with --device-map)")
    p.add_argument("--trust-remote-code", action="store_true")


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("result", help="a result saved with --save (or Explanation.save)")
    p.add_argument("--out", required=True, help="the HTML report to write")
    p.add_argument("--row", type=int, default=0)


def explain_command(args: argparse.Namespace) -> int:
    try:
        model, tokenizer, auto = _load(args)
        inputs, tokens = _inputs(args, model, tokenizer)
        if args.generate is not None:
            return _generation(args, model, tokenizer, auto, inputs)
        target, position = _target(args, model, tokenizer, auto, inputs)
        keep = last_logits_only(model, inputs, {"position": position})  # as dlb.explain
        with dlb.trace(model, storage=args.storage) as tape:
            with torch.no_grad():
                model(**inputs, **keep)
        exp = tape.explain(target, mode=args.mode, position=position)
    except (CommandError, dlb.DLBError) as err:
        print(f"dlbhooks explain: {type(err).__name__}: {err}")
        return 2
    exp.info["tokens"] = tokens
    exp.info["checkpoint"] = str(args.checkpoint)
    print(_summary(exp, tokens, tokenizer, args.top))
    _write(args, exp, lambda: exp.to_html(tokens, title=f"{Path(args.checkpoint).name}: "
                                          f"{_target_text(exp, tokenizer)}"))
    return 0


def _write(args: argparse.Namespace, result: Any, page: Any) -> None:
    """``--out``: the report (``page()``); ``--save``: the result."""
    if args.out:
        Path(args.out).write_text(page(), encoding="utf-8")
        print(f"report: {args.out}")
    if args.save:
        result.save(args.save)
        print(f"saved: {args.save}")


def _generation(args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any, auto: str,
                inputs: dict[str, torch.Tensor]) -> int:
    """``--generate N``: generate, explain each generated token (or the first K), report."""
    if auto != "AutoModelForCausalLM":
        raise CommandError("--generate needs a causal LM checkpoint")
    if args.generate < 1:
        raise CommandError(f"--generate must be at least 1, got {args.generate}")
    options: dict[str, Any] = {"do_sample": args.do_sample}
    for name in ("top_p", "top_k", "temperature", "num_beams"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    ids = inputs["input_ids"]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.generate, **options)
    new = out[0, ids.shape[-1]:]
    only = None
    spec = args.explain_tokens
    if spec.isdigit() and int(spec) >= 1:  # the first K
        new = new[: int(spec)]
    elif spec != "all":  # a list of generated-token indices
        try:
            only = sorted({int(x) for x in spec.split(",")})
        except ValueError:
            only = None
        if not only or only[0] < 0 or only[-1] >= new.numel():
            raise CommandError(f"--explain-tokens: all, a number K (the first K), or indices "
                               f"0..{new.numel() - 1} separated by commas; got {spec!r}")
        new = new[: only[-1] + 1]
    gen = dlb.explain_generation(model, ids, generated_ids=new, mode=args.mode,
                                 storage=args.storage, progress=True, only=only)
    if tokenizer is not None:
        gen.tokens = tokenizer.convert_ids_to_tokens(gen.ids.tolist())
    gen.info["checkpoint"] = str(args.checkpoint)
    names = gen.tokens or [str(i) for i in gen.ids.tolist()]
    T = gen.prompt_length
    print(f"generated {gen.n} token(s), mode {gen.mode}; conservation error "
          f"{gen.conservation_error():.2g}")
    for k in range(gen.n) if only is None else only:
        row = gen.row(k).double()
        best = int(row.abs().argmax())
        print(f"  {k:3d} {names[T + k]!r:>14}  most relevant: {names[best]!r} "
              f"({float(row[best]):+.4g}), absorbed {float(gen.absorbed[k]):.4g}")
    _write(args, gen, lambda: gen.to_html(title=Path(args.checkpoint).name))
    return 0


def report_command(args: argparse.Namespace) -> int:
    try:
        exp: Any = dlb.Explanation.load(args.result)
    except (OSError, dlb.DLBError, KeyError, ValueError):
        try:
            exp = dlb.GenerationExplanation.load(args.result)
        except (OSError, dlb.DLBError, KeyError, ValueError) as err:
            print(f"dlbhooks report: {type(err).__name__}: {err}")
            return 2
        Path(args.out).write_text(exp.to_html(title=str(exp.info.get("checkpoint", ""))),
                                  encoding="utf-8")
        print(f"report: {args.out}")
        return 0
    tokens = exp.info.get("tokens")
    Path(args.out).write_text(exp.to_html(tokens, row=args.row,
                                          title=str(exp.info.get("checkpoint", args.result))),
                              encoding="utf-8")
    print(f"report: {args.out}")
    return 0


# -- loading -------------------------------------------------------------------------------


def _load(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, str]:
    model, auto = load_model(args.checkpoint, dtype=args.dtype, device_map=args.device_map,
                             offload_folder=args.offload_folder,
                             trust_remote_code=args.trust_remote_code)
    tokenizer = None
    if args.ids is None:
        tokenizer = load_tokenizer(args.checkpoint, "give token ids with --ids")
    return model, tokenizer, auto


def load_model(checkpoint: str | Path, *, dtype: str = "float32", device_map: str | None = None,
               offload_folder: str | None = None, trust_remote_code: bool = False
               ) -> tuple[torch.nn.Module, str]:
    """A checkpoint directory on disk (no hub access), in eval mode, with its transformers
    Auto class name. ``device_map``: accelerate's (``auto``, ``cpu``, ... or a JSON object
    {module: device or "disk"})."""
    import transformers  # lazy: only the commands that load checkpoints need it

    path = Path(checkpoint)
    if not (path / "config.json").is_file():
        raise CommandError(f"{path} is not a checkpoint directory: it has no config.json "
                           "(a directory written by save_pretrained)")
    cfg = transformers.AutoConfig.from_pretrained(path, local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
    auto = _head(cfg)
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": _DTYPES[dtype],
                              "trust_remote_code": trust_remote_code}
    moe = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    if dtype == "float64" and moe:
        # (transformers' grouped-mm experts kernel takes no doubles; eager is the same maths)
        kwargs["experts_implementation"] = "eager"
    if device_map:
        dm: Any = device_map
        if dm.lstrip().startswith("{"):
            try:
                dm = json.loads(dm)
            except ValueError as err:
                raise CommandError(f"--device-map is not valid JSON: {err}") from None
        kwargs["device_map"] = dm
        if offload_folder:
            kwargs["offload_folder"] = offload_folder
    return getattr(transformers, auto).from_pretrained(path, **kwargs).eval(), auto


def load_tokenizer(checkpoint: str | Path, instead: str) -> Any:
    """The checkpoint's tokenizer; a CommandError saying what to do ``instead`` if none."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(Path(checkpoint),
                                                          local_files_only=True)
    except (OSError, ValueError) as err:
        raise CommandError(f"{checkpoint} has no tokenizer ({err.__class__.__name__}); "
                           f"{instead}") from None


def _head(cfg: Any) -> str:
    archs = list(getattr(cfg, "architectures", None) or [])
    for suffix, auto in _HEADS:
        if any(a.endswith(suffix) for a in archs):
            if auto is None:
                raise CommandError(f"{archs[0]}: encoder-decoder checkpoints need decoder "
                                   "inputs; explain them from Python (README, 'Transformers "
                                   "and LLMs')")
            return auto
    if getattr(cfg, "is_decoder", False) or not archs:
        return "AutoModelForCausalLM"
    raise CommandError(f"no supported head among the checkpoint's architectures {archs}: "
                       "dlbhooks explain handles causal LMs, sequence classifiers and masked "
                       "LMs")


def _inputs(args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any
            ) -> tuple[dict[str, torch.Tensor], list[str]]:
    if args.ids is not None:
        try:
            ids = torch.tensor([[int(x) for x in args.ids.split(",")]])
        except ValueError:
            raise CommandError(
                f"--ids must be comma-separated integers, got {args.ids!r}") from None
        tokens = [str(i) for i in ids[0].tolist()]
        enc = {"input_ids": ids}
    else:
        text = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text(
            encoding="utf-8")
        enc = dict(tokenizer(text, return_tensors="pt"))
        tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    limit = getattr(model.config, "max_position_embeddings", None)
    length = enc["input_ids"].shape[-1]
    if limit is not None and length > limit:
        raise CommandError(f"the prompt has {length} tokens; the model's context is {limit}")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and int(enc["input_ids"].max()) >= vocab:
        raise CommandError(f"token id {int(enc['input_ids'].max())} is outside the model's "
                           f"vocabulary of {vocab}")
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in enc.items()}, tokens


def _target(args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any, auto: str,
            inputs: dict[str, torch.Tensor]) -> tuple[Any, int | None]:
    position = args.position
    if auto == "AutoModelForMaskedLM" and position is None:
        mask_id = getattr(tokenizer, "mask_token_id", None)
        hits = (inputs["input_ids"][0] == mask_id).nonzero() if mask_id is not None else []
        if len(hits) == 0:
            raise CommandError("a masked LM explains one position: put the mask token in the "
                               "prompt or give --position")
        position = int(hits[0])
    if args.target is None:
        return None, position
    if auto == "AutoModelForSequenceClassification":
        labels = getattr(model.config, "label2id", {}) or {}
        if args.target in labels:
            return int(labels[args.target]), position
        if not args.target.lstrip("-").isdigit():
            raise CommandError(f"target {args.target!r} is not a class index or one of the "
                               f"labels {sorted(labels)}")
        return int(args.target), position
    if args.target.lstrip("-").isdigit():
        tid = int(args.target)
    elif tokenizer is None:
        raise CommandError("a token string target needs the tokenizer; give its id")
    else:
        tid = token_target(args.target, tokenizer)  # (a TargetError names the problem)
    vocab = model.config.vocab_size
    if not -vocab <= tid < vocab:
        raise CommandError(f"target id {tid} is outside the vocabulary of {vocab}")
    return tid, position


# -- output --------------------------------------------------------------------------------


def _target_text(exp: dlb.Explanation, tokenizer: Any) -> str:
    t = exp.target[0] if isinstance(exp.target, list) and exp.target else exp.target
    if tokenizer is not None and isinstance(t, int):
        return f"target {tokenizer.convert_ids_to_tokens(t)!r} (id {t})"
    return f"target {t}"


def _summary(exp: dlb.Explanation, tokens: list[str], tokenizer: Any, top: int) -> str:
    rel = exp.inputs["input_ids"][0].double() if "input_ids" in exp.inputs else None
    lines = [f"explained: {_target_text(exp, tokenizer)}, mode {exp.mode}"
             + (f", position {exp.info['position'][0]}" if "position" in exp.info else "")]
    if rel is not None:
        order = rel.abs().argsort(descending=True)[:top].tolist()
        lines.append("most relevant input tokens:")
        for i in order:
            lines.append(f"  {i:4d} {tokens[i]!r:>18}  {float(rel[i]):+.4g}")
    seeded = exp.ledger[0].relevance_out if exp.ledger else None
    lines.append(f"seeded {seeded}, reached the inputs {_num(exp.total_input)}, absorbed "
                 f"{_num(exp.total_absorbed)}; conservation error "
                 f"{exp.conservation_error():.2g} of the seed")
    by_type: dict[str, float] = {}
    types = {e.key: e.type for e in exp.ledger}
    for key, value in exp.absorbed.items():
        by_type[types.get(key, "?")] = by_type.get(types.get(key, "?"), 0.0) + value
    big = sorted(by_type.items(), key=lambda kv: -abs(kv[1]))[:5]
    if any(v for _, v in big):
        lines.append("absorbed by: " + ", ".join(f"{k} {v:.4g}" for k, v in big if v))
    return "\n".join(lines)


def _num(v: Any) -> str:
    return " / ".join(f"{x:.6g}" for x in v) if isinstance(v, tuple) else f"{float(v):.6g}"
