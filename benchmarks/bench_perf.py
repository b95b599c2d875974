"""Cost ratios of persedit vs ROME-per-synonym vs LoRA, measured in one run (embedded SmolLM2-135M-Instruct, CPU).

  * editing time per user: persedit (``--users`` users, ONE batched ``edit_users`` call) vs ROME-per-synonym
    (the paper's procedure, user by user: one ungated edit per synonym question, in sequence) vs LoRA
    (``transformers.Trainer``, 20 steps, rank 8), the last two on ``--baseline-users`` users;
  * inference overhead: forward time of one batch (``--batch`` neutral prompts in the chat template, logits of
    the last position as in generation's prefill) with persedit adapters and with LoRA adapters (mixed batches,
    row i → user i mod U), relative to the base model; median of ``--repeats``;
  * adapter bytes per preference: persedit with 1 and with 10 preferences per adapter vs a rank-8 LoRA.

    python benchmarks/bench_perf.py [--users 10] [--baseline-users 3] [--batch 16] [--repeats 5]

Prints the ratios and saves them (with the raw numbers) to ``--out`` (default benchmarks/results/perf.json).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no OpenMP spinning on shared cores

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from peft_persedit.data_paths import dataset_path  # noqa: E402
from peft_persedit.editing.chat import pad_id  # noqa: E402
from peft_persedit.evaluation import EvalConfig  # noqa: E402
from peft_persedit.evaluation.generation import make_chat, render, tail_logits  # noqa: E402
from peft_persedit.evaluation.methods import Method, build_method  # noqa: E402
from peft_persedit.evaluation.users import grouped_users, round_robin, single_users  # noqa: E402
from peft_persedit.preferences import load_preferences  # noqa: E402
from peft_persedit.prompts import load_prompt_set  # noqa: E402


def timed_personalize(name: str, config: EvalConfig, users: dict) -> tuple[Method, float]:
    """A fresh method with ``users`` personalized, and the seconds that took (model loading excluded)."""
    method = build_method(name, config)
    start = time.perf_counter()
    method.personalize(users)
    return method, time.perf_counter() - start


def rome_per_synonym(config: EvalConfig, users: dict) -> float:
    """Seconds per user of ROME-per-synonym run one user at a time (its own model copy each)."""
    total = 0.0
    for user, prefs in users.items():
        method, seconds = timed_personalize("rome", config, {user: prefs})
        total += seconds
        method.close()
    return total / len(users)


def forward_seconds(method: Method, sequences: list[list[int]], adapters: list[str] | None, repeats: int) -> float:
    """Median wall time of one forward pass over the batch (last-position logits)."""
    pad = pad_id(method.tokenizer)
    tail_logits(method.model, sequences, 1, pad, adapters)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tail_logits(method.model, sequences, 1, pad, adapters)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mixed(names: list[str], rows: int) -> list[str]:
    """Row i → ``names[i mod len(names)]``."""
    return [names[i % len(names)] for i in range(rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=10, help="users edited by persedit in one call")
    parser.add_argument("--baseline-users", type=int, default=3, help="users edited by ROME and trained by LoRA")
    parser.add_argument("--batch", type=int, default=16, help="rows of the inference batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/perf.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = EvalConfig(progress=False)
    prefs = round_robin(load_preferences(dataset_path("upqa_balanced100")))
    users = single_users(prefs[: args.users])
    few = dict(list(users.items())[: args.baseline_users])

    persedit, persedit_s = timed_personalize("persedit", config, users)
    lora, lora_s = timed_personalize("lora", config, few)
    rome_s = rome_per_synonym(config, few)
    base = build_method("base", config)

    prompts = load_prompt_set("neutral_prompts")[: args.batch]
    sequences = [render(base.tokenizer, make_chat(p)) for p in prompts]
    t_base = forward_seconds(base, sequences, None, args.repeats)
    t_persedit = forward_seconds(persedit, sequences, mixed(list(users), len(sequences)), args.repeats)
    t_lora = forward_seconds(lora, sequences, mixed(list(few), len(sequences)), args.repeats)

    grouped = grouped_users(prefs[:10], size=10)
    persedit10, _ = timed_personalize("persedit", config, grouped)
    bytes_persedit = persedit.adapter_bytes(next(iter(users)))
    bytes_persedit10 = persedit10.adapter_bytes("g00") / len(grouped["g00"])
    bytes_lora = lora.adapter_bytes(next(iter(few)))

    results = {
        "edit_seconds_per_user": {"persedit_batched": persedit_s / len(users), "rome_per_synonym": rome_s,
                                  "lora": lora_s / len(few)},
        "forward_seconds": {"base": t_base, "persedit": t_persedit, "lora": t_lora,
                            "batch": len(sequences), "tokens": sum(map(len, sequences))},
        "adapter_bytes_per_preference": {"persedit_1_per_adapter": bytes_persedit,
                                         "persedit_10_per_adapter": bytes_persedit10, "lora_rank8": bytes_lora},
        "lora": lora.info,
        "ratios": {
            "rome_per_synonym_over_persedit_edit_time": rome_s / (persedit_s / len(users)),
            "lora_over_persedit_edit_time": (lora_s / len(few)) / (persedit_s / len(users)),
            "persedit_over_base_forward": t_persedit / t_base,
            "lora_over_base_forward": t_lora / t_base,
            "lora_over_persedit_bytes_per_preference": bytes_lora / bytes_persedit,
            "lora_over_persedit10_bytes_per_preference": bytes_lora / bytes_persedit10,
        },
        "settings": vars(args) | {"threads": torch.get_num_threads(), "persedit_users": len(users),
                                  "baseline_users": len(few)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    for name, value in results["ratios"].items():
        print(f"{name:48s} {value:10.2f}")
    print(json.dumps({k: results[k] for k in ("edit_seconds_per_user", "forward_seconds",
                                                "adapter_bytes_per_preference")}, indent=1))


if __name__ == "__main__":
    main()
