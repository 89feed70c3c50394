"""Command line: ``python -m bench [--family rl] [--device cpu|cuda] [--out DIR] [--quick]``.

Writes ``DIR/<family>_<device>.json`` (after every case, so an interrupted run keeps what finished) and
``DIR/<family>_<device>.png`` per family, and prints the compact table last.
``--env`` prints the environment record; ``--table FILE.json ...`` prints the table of saved results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench import FAMILIES, env, report, runner


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mgpt-bench", description="mgpt kernel microbenchmarks (fwd+bwd)")
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES),
                        help="family to run (repeatable; default: all)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/out"), help="output folder (default bench/out)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (tests, CI)")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="run only cases whose 'name shape' contains TEXT (repeatable)")
    parser.add_argument("--env", action="store_true", help="print the environment record as JSON and exit")
    parser.add_argument("--table", type=Path, nargs="+", metavar="JSON", help="print the table of saved results")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        print("\n\n".join(report.format_table(json.loads(p.read_text())) for p in args.table))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("mgpt-bench: --device cuda requested but torch sees no CUDA device", file=sys.stderr)
        return 2
    environment = env.capture(device)
    if args.env:
        print(json.dumps(environment, indent=1))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    tables = []
    for family in args.family or sorted(FAMILIES):
        stem = args.out / f"{family}_{device.type}"
        json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
        result = runner.run_family(family, device, args.quick, environment,
                                   after_case=lambda partial: report.write_json(partial, json_path),
                                   only=args.only)
        problem = report.plot(result, png_path)
        result["plot"] = problem or png_path.name
        report.write_json(result, json_path)
        print(f"wrote {json_path}" + (f" ({problem})" if problem else f" and {png_path}"), flush=True)
        tables.append(report.format_table(result))
    print("\n\n".join(tables), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
