"""Compare two runs of an experiment method by method, each on the metric it is compared on.

    python tools/compare_results.py runs/study/tiny_chosen_start/results.json \
        runs/experiments/tiny_imagenet_lt/results.json --split val --methods 'selmix_*'

For every method of both results.json files (matching --methods) that has a compared metric, and every ρ_u:
the metric's mean ± std (ddof = 1) over the seeds both runs have, in %, for A and B, B − A in points, and the
start heads A's runs chose when its `start` listed several (info.start).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from collections import Counter
from pathlib import Path

from selmix_dist.experiments.tables import format_mean_std, mean_std
from selmix_dist.report import markdown_table


def compare(a: dict, b: dict, split: str = "val", patterns: tuple[str, ...] = ("*",)) -> list[dict]:
    """Rows {method, rho_u, metric, a, b, diff, a_starts} for the methods both results have."""
    rows = []
    for name, meta in a["methods"].items():
        metric = meta.get("compared_on")
        if not metric or name not in b["methods"] or not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        for rho_u in a["rho_u"]:
            runs = [{r["seed"]: r for r in x["records"] if r["method"] == name and r["rho_u"] == rho_u}
                    for x in (a, b)]
            seeds = sorted(set(runs[0]) & set(runs[1]))
            if not seeds:
                continue
            values = [[run[s][split][metric] for s in seeds] for run in runs]
            starts = Counter(runs[0][s]["info"].get("start") for s in seeds if "start" in runs[0][s]["info"])
            rows.append({"method": name, "rho_u": f"{rho_u:g}", "metric": metric,
                         "a": format_mean_std(values[0]), "b": format_mean_std(values[1]),
                         "diff": f"{100 * (mean_std(values[1])[0] - mean_std(values[0])[0]):+.1f}",
                         "a_starts": ", ".join(f"{n} ×{c}" for n, c in sorted(starts.items()))})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a", type=Path, help="results.json of run A")
    p.add_argument("b", type=Path, help="results.json of run B")
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--methods", nargs="+", default=["*"], metavar="PATTERN")
    args = p.parse_args(argv)
    a, b = (json.loads(path.read_text()) for path in (args.a, args.b))
    rows = compare(a, b, args.split, tuple(args.methods))
    print(markdown_table(rows, ("method", "rho_u", "metric", "a", "b", "diff", "a_starts"),
                         headers=("Method", "ρ_u", "Metric", f"A ({args.split})", f"B ({args.split})", "B − A",
                                  "A's starts")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
