"""Old code against new, side by side: alternating blocks of the same benchmark, two checkouts.

    python bench/compare_commits.py --old DIR [--new DIR] [--blocks 3] [--decode-loop] [--json OUT]

Each block runs `bench/hot_path_cases.py` (this tree's copy, which speaks the API both trees
offer) once under each checkout (`PYTHONPATH=<checkout>`, old and new in turns, the order
flipped every block, so drift of the host hits both alike), then, with `--decode-loop`,
`bench/decode_loop.py --quick` the same way (its FlashInfer `attnsync` steps/s). It prints, per
case, the median over blocks of each side's median and the ratio new / old (host time: lower is
better; steps/s: higher is better). The checkout's compiled module, if any, must be built for
this Python (`python -m attnsync._native_build` in it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    extra = env.get("ATTNSYNC_SITE", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), extra) if p)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return env


def _cases(tree: Path, iters: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, str(HERE / "hot_path_cases.py"), "--json", "--iters", str(iters)],
                         env=_env(tree), check=True, capture_output=True, text=True).stdout
    doc = json.loads(out.strip().splitlines()[-1])
    if Path(doc["attnsync"]).resolve() != (tree / "attnsync").resolve():
        raise SystemExit(f"{tree}: the child imported attnsync from {doc['attnsync']}")
    return doc["us"]


def _decode_loop(tree: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, str(HERE / "decode_loop.py"), "--quick", "--out", folder],
                       env=_env(tree), check=True, capture_output=True, text=True)
        report = json.loads((Path(folder) / "decode_loop.json").read_text())
    if "flashinfer" not in report:
        return {}
    modes = report["flashinfer"]["modes"]
    return {f"decode_loop {mode} steps/s": modes[mode]["steps_per_s"] for mode in modes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="checkout of the old commit")
    parser.add_argument("--new", type=Path, default=HERE.parent, help="checkout of the new code (default: this one)")
    parser.add_argument("--blocks", type=int, default=3, help="alternating blocks (default 3)")
    parser.add_argument("--iters", type=int, default=2000, help="timed calls per case in each block (default 2000)")
    parser.add_argument("--decode-loop", action="store_true", help="also bench/decode_loop.py --quick (GPU + FlashInfer)")
    parser.add_argument("--json", type=Path, help="write the readings and ratios here")
    args = parser.parse_args(argv)
    sides = {"old": args.old.resolve(), "new": args.new.resolve()}
    readings: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    for block in range(args.blocks):
        order = ("old", "new") if block % 2 == 0 else ("new", "old")
        for side in order:
            values = _cases(sides[side], args.iters)
            if args.decode_loop:
                values.update(_decode_loop(sides[side]))
            for name, value in values.items():
                readings[side].setdefault(name, []).append(value)
            print(f"[compare] block {block} {side}: " + ", ".join(f"{k} {v:.1f}" for k, v in values.items()),
                  flush=True)
    rows = []
    print("\n| case | old | new | new / old |\n|---|---:|---:|---:|")
    for name in readings["new"]:
        old = statistics.median(readings["old"].get(name, [float("nan")]))
        new = statistics.median(readings["new"][name])
        rows.append({"case": name, "old": old, "new": new, "ratio": new / old})
        unit = "" if "steps/s" in name else " us"
        print(f"| {name} | {old:.1f}{unit} | {new:.1f}{unit} | {new / old:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"sides": {k: str(v) for k, v in sides.items()}, "rows": rows,
                                         "readings": readings}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
