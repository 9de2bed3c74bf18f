"""Recipe ablations (omniquant.ablation): `python -m pipelines.ablation [--study NAME] run [ROW ...]`
runs the rows without metrics (resumable: each finished row is kept), `... report` writes the table
and plots under results/."""
from __future__ import annotations

import argparse
from pathlib import Path

from omniquant import ablation
from omniquant.errors import exit_on_user_error


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(prog="pipelines.ablation", description=__doc__.split("\n")[0])
    parser.add_argument("--study", default="w3a16g128", help="conf/ablation/<study>.yaml")
    parser.add_argument("--root", type=Path, default=Path("."), help="repository root (metrics/, artifacts/)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the rows that have no metrics yet")
    run.add_argument("rows", nargs="*", help="rows to run (default: all)")
    run.add_argument("--force", action="store_true", help="run again rows that have metrics")
    report = sub.add_parser("report", help="write the table and plots")
    report.add_argument("--out", type=Path, default=Path("results"))
    diag = sub.add_parser("diagnose", help="learned clip factors of a cell, and each block's residual-stream error "
                                           "of cells against FP on calibration windows")
    diag.add_argument("--learned", type=Path, required=True, help="a cell's omni_parameters.safetensors")
    diag.add_argument("--record", type=Path, required=True, help="that cell's quant_record.json (block curves)")
    diag.add_argument("--compare", nargs="+", default=[], metavar="NAME=CHECKPOINT", help="quantized checkpoints")
    diag.add_argument("--windows", type=int, default=4, help="calibration windows for the residual errors")
    args = parser.parse_args()
    study = ablation.Study.load(args.study)
    root = args.root.resolve()
    if args.command == "run":
        paths = ablation.run(study, args.rows, root, args.force)
    elif args.command == "report":
        paths = ablation.report(study, root, args.out)
    else:
        paths = [ablation.diagnose(study, root, args.learned, args.record, dict(c.split("=", 1) for c in args.compare),
                                   args.windows)]
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
