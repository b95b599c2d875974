"""v* in fp32 vs under a bf16 autocast (``value_precision``), A/B in one process on the embedded
SmolLM2-135M-Instruct (CPU), UPQA balanced100: each item one user, all edited in one batched call per setting.

Prints and saves (``--out``, default benchmarks/results/value_precision): per setting and round the edit's stage
timings, then the value-stage and total-edit time ratios fp32 / bf16, and the efficacy, paraphrase and implicit
accuracy of the edited users (answered in the model's own fp32) and the locality of all users in one adapter.

    python benchmarks/bench_value_precision.py [--limit 100] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_edit import accuracy, edit_all, union_adapter
from peft import get_peft_model

from peft_persedit import PersonalizationEditConfig, load_default_model
from peft_persedit.data_paths import dataset_path
from peft_persedit.editing.verify import answer_questions
from peft_persedit.preferences import load_preferences
from peft_persedit.prompts import load_prompt_set

PRECISIONS = ("float32", "bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1, help="A/B rounds (fp32 then bf16 in each)")
    parser.add_argument("--out", default="benchmarks/results/value_precision")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_default_model()
    prefs = load_preferences(dataset_path("upqa_balanced100"))[: args.limit]
    neutral = load_prompt_set("neutral_prompts")[:50]
    pm = get_peft_model(model, PersonalizationEditConfig(), adapter_name="default").eval()
    base_out = answer_questions(pm, tokenizer, neutral, ["__base__"] * len(neutral))
    results: dict = {"command": f"python benchmarks/bench_value_precision.py --limit {args.limit} "
                                f"--rounds {args.rounds}", "limit": args.limit, "runs": []}
    for round_ in range(args.rounds):
        for precision in PRECISIONS:
            name = f"v_{precision}"  # an adapter may not be named like a module attribute (bfloat16)
            pm.add_adapter(name, PersonalizationEditConfig(value_precision=precision))
            users, timings = edit_all(pm, tokenizer, prefs, f"{precision}_", name)
            run = {"round": round_, "precision": precision, "timings": timings,
                   **accuracy(pm, tokenizer, prefs, users)}
            union_adapter(pm, users, "all")
            all_out = answer_questions(pm, tokenizer, neutral, ["all"] * len(neutral))
            run["locality_all_in_one"] = sum(a == b for a, b in zip(base_out, all_out)) / len(neutral)
            for user in [*users, "all", name]:
                pm.delete_adapter(user)
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    for stage in ("values", "total"):
        seconds = {p: sum(r["timings"][stage] for r in results["runs"] if r["precision"] == p) for p in PRECISIONS}
        results[f"{stage}_seconds"] = seconds
        results[f"{stage}_ratio_fp32_over_bf16"] = seconds["float32"] / seconds["bfloat16"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
