"""The full UPQA comparison on the embedded SmolLM2-135M-Instruct (CPU): all five methods, both protocols.

    python benchmarks/bench_eval.py                  # --limit 100: the full comparison (target ≤ 45 min)
    python benchmarks/bench_eval.py --limit 20       # a cheaper run, labelled with its limit

runs ``persedit eval --data upqa_balanced100 --methods base,ice,lora,rome,persedit,dpl --turns 0,2,6,10
--limit N --workers 2 --out benchmarks/results/eval_limitN`` in this process (2 worker processes of 1 torch
thread each on this 2-core machine) and adds to that folder ``command.txt``
(the exact command) and ``projection.json``: the time the run took per method × protocol × stage, and the
time projected for the full 100 items (personalization and answers scale with the users, locality with
the sampled users, model loading stays).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no OpenMP spinning on shared cores

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from peft_persedit.cli import main as persedit  # noqa: E402

FULL_ITEMS = 100


def command(limit: int, out: str, workers: int, extra: list[str]) -> list[str]:
    """The ``persedit eval`` arguments of the comparison."""
    return ["eval", "--data", "upqa_balanced100", "--methods", "base,ice,lora,rome,persedit,dpl", "--turns", "0,2,6,10",
            "--limit", str(limit), "--workers", str(workers), "--out", out, *extra]


def makespan(seconds: dict[str, float], workers: int) -> float:
    """Wall time of the jobs as the harness runs them: base jobs (and the judge) in the main process, the
    rest longest-first on ``workers``."""
    def alone(job: str) -> bool:
        return job.startswith("base/") or "/" not in job

    finish = [0.0] * max(1, workers)
    for job, cost in sorted(seconds.items(), key=lambda item: -item[1]):
        if not alone(job):
            finish[finish.index(min(finish))] += cost
    return sum(cost for job, cost in seconds.items() if alone(job)) + max(finish)


def _scaled(results: dict, stages_by_job: dict[str, dict[str, float]], full_items: int) -> dict[str, float]:
    """Per job, ``stages_by_job`` scaled to ``full_items``: personalize and answers × users, locality × the
    sampled users, loading unchanged."""
    config = results["config"]
    users_now = results["users"]
    users_full = {"single": full_items, "grouped": full_items // config["group_size"]}

    def sampled(n: int) -> int:  # users whose locality is checked
        return n if not config["locality_users"] else min(n, config["locality_users"])

    projected: dict[str, float] = {}
    for job, stages in stages_by_job.items():
        protocol = job.split("/")[-1]
        if protocol not in users_now:  # e.g. the judge
            projected[job] = sum(stages.values())
            continue
        scale = users_full[protocol] / users_now[protocol]
        locality = sampled(users_full[protocol]) / sampled(users_now[protocol])
        projected[job] = (stages["load"] + scale * (stages["personalize"] + stages["questions"])
                          + locality * stages["locality"])
    return projected


def projection(results: dict, full_items: int = FULL_ITEMS) -> dict:
    """Wall and CPU seconds of this run per job, and both projected to ``full_items`` items.

    The CPU time (all threads) does not depend on what else runs on the machine; with 2 threads kept busy,
    an otherwise idle 2-core machine needs about CPU / 2 of wall time.
    """
    wall, cpu = (_scaled(results, results[key], full_items) for key in ("timings", "cpu_seconds"))
    threads = results["environment"]["threads"]
    workers = results["environment"].get("workers", 1)
    return {"measured_seconds": results["total_seconds"], "measured_cpu_seconds": results["total_cpu_seconds"],
            "items": results["items"], "full_items": full_items,
            "projected_full_seconds_at_measured_speed": round(makespan(wall, workers), 1),
            "projected_full_cpu_seconds": round(sum(cpu.values()), 1),
            f"projected_full_seconds_idle_{threads}_threads": round(sum(cpu.values()) / threads, 1),
            "projected_seconds_per_job": {k: round(v, 1) for k, v in wall.items()},
            "projected_cpu_seconds_per_job": {k: round(v, 1) for k, v in cpu.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=FULL_ITEMS)
    parser.add_argument("--out", help="default: benchmarks/results/eval_limit{N}")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (this machine has 2 cores)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (threads ÷ workers each)")
    args, extra = parser.parse_known_args()  # anything else goes to persedit eval (e.g. --judge PATH)
    torch.set_num_threads(args.threads)
    out = args.out or f"benchmarks/results/eval_limit{args.limit}"
    argv = command(args.limit, out, args.workers, extra)
    line = "OMP_WAIT_POLICY=PASSIVE persedit " + shlex.join(argv) + f"   # torch threads: {args.threads}"
    print(line, flush=True)
    code = persedit(argv)
    if code:
        sys.exit(code)
    results = json.loads((Path(out) / "results.json").read_text())
    summary = projection(results)
    (Path(out) / "command.txt").write_text(f"python {shlex.join(sys.argv)}\n# runs:\n{line}\n")
    (Path(out) / "projection.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if "per_job" not in k}, indent=1))


if __name__ == "__main__":
    main()
