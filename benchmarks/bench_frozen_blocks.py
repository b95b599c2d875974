"""A/B of the value step's frozen lower blocks (embedded SmolLM2-135M-Instruct, CPU), interleaved in one process.

Edits ``--prefs`` UPQA balanced100 preferences (one user each) with ``--steps`` full value steps, ``--repeats``
times with the blocks below the edit layer replayed (``editing/frozen_blocks.py``) and without (every block runs
every step), alternating, and prints the value-stage seconds of each and the mean ratio.

    python benchmarks/bench_frozen_blocks.py [--prefs 40] [--steps 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

from peft import get_peft_model

import peft_persedit.editing.editor as editor_module
from peft_persedit import PersonalizationEditConfig, load_default_model
from peft_persedit.data_paths import dataset_path
from peft_persedit.editing import PersonalizationEditor
from peft_persedit.editing.frozen_blocks import FrozenBlocks
from peft_persedit.preferences import load_preferences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefs", type=int, default=40)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model, tokenizer = load_default_model()
    prefs = load_preferences(dataset_path("upqa_balanced100"))[: args.prefs]
    pm = get_peft_model(model, PersonalizationEditConfig(value_steps=args.steps), adapter_name="ab").eval()
    optimize, seconds = editor_module.optimize_values, {}

    def timed(*a, **k):
        start = time.perf_counter()
        result = optimize(*a, **k)
        seconds["values"] = time.perf_counter() - start
        return result

    editor_module.optimize_values = timed
    editor = PersonalizationEditor(pm, tokenizer, adapter_name="ab", progress=False)
    on, off = FrozenBlocks.__bool__, lambda self: False
    times: dict[str, list[float]] = {"frozen": [], "every block": []}
    for repeat in range(args.repeats):
        for name, switch in (("frozen", on), ("every block", off)):
            FrozenBlocks.__bool__ = switch
            editor.edit_users({f"u{repeat}{name[0]}{i}": [p] for i, p in enumerate(prefs)}, verify=False)
            times[name].append(round(seconds["values"], 1))
    FrozenBlocks.__bool__ = on
    ratio = statistics.mean(times["frozen"]) / statistics.mean(times["every block"])
    print(f"value stage s, {args.prefs} preferences, {args.steps} full steps: {times}; "
          f"frozen / every block {ratio:.3f}")


if __name__ == "__main__":
    main()
