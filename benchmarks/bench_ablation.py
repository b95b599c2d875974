"""Ablation of persedit's editing options on UPQA balanced100 (embedded SmolLM2-135M-Instruct, CPU).

Each setting runs ``evaluate(data="upqa_balanced100", methods=["base", "persedit"], protocols=["single"],
turns=[10], limit=N, gate_sweep=[])`` with ``PersEdit.edit_config`` = the setting's
:class:`~peft_persedit.PersonalizationEditConfig` fields, and prints one line of exact-match scores, the
fluency (distinct-3) of the literal answers, edit seconds per user and peak RSS; results land in ``--out/<name>/``.

    python benchmarks/bench_ablation.py --limit 20 --setting none '{"request_templates": 0, "value_histories": []}'
    python benchmarks/bench_ablation.py --limit 20 --setting default '{}'

Settings run one after another in this process; run several processes with ``OMP_NUM_THREADS=1`` side by side
on a 2-core machine (as for the committed table in benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peft_persedit.evaluation import evaluate
from peft_persedit.evaluation.methods.persedit import PersEdit


def run(name: str, fields: dict, limit: int, out: Path) -> dict:
    """One setting: its exact-match summary row for persedit, edit seconds per user and peak RSS."""
    PersEdit.edit_config = fields
    results = evaluate(data="upqa_balanced100", methods=["base", "persedit"], protocols=["single"], turns=[10],
                       limit=limit, gate_sweep=[], out=out / name, progress=False, plots=False)
    scores = {(r["metric"] + (f"@{r['turns']}" if r["turns"] else "")): round(r["exact"], 2)
              for r in results["summary"] if r["method"] == "persedit"}
    scores["fluency"] = next(round(r["fluency"], 3) for r in results["summary"]
                             if (r["method"], r["metric"]) == ("persedit", "efficacy"))
    cost = next(c for c in results["cost"] if c["method"] == "persedit")
    return {"setting": name, "fields": fields, **dict(sorted(scores.items())),
            "edit_seconds_per_user": round(cost["seconds_per_user"], 2), "peak_rss_mb": cost["peak_rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/ablation_limit20")
    parser.add_argument("--setting", nargs=2, action="append", metavar=("NAME", "JSON"), required=True,
                        help="a name and the PersonalizationEditConfig fields (JSON) of one setting")
    args = parser.parse_args()
    for name, fields in args.setting:
        row = run(name, json.loads(fields), args.limit, Path(args.out))
        print(json.dumps(row))
        with open(Path(args.out) / "rows.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
