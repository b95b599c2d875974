"""Does the gate still fire after chat turns? (embedded SmolLM2-135M-Instruct, CPU, UPQA balanced100)

Edits ``--limit`` users (one preference each, default config, one batched call), then, for each user, reads the
edit layer's input at the subject token of the literal question after N of the eval's distractor turns (the
model's own answers, as ``persedit eval`` uses) and compares its gate score s = max_k cos(x − μ, K_k) with τ:

    python benchmarks/bench_gate_drift.py [--limit 20] [--turns 0 2 10] [--config '{"key_histories": []}']

prints, per N, how many gates fire and the lowest and median margins s − τ.
"""

from __future__ import annotations

import argparse
import json

import torch
from peft import get_peft_model

from peft_persedit import PersonalizationEditConfig, load_default_model
from peft_persedit.data_paths import dataset_path
from peft_persedit.editing import PersonalizationEditor
from peft_persedit.editing.chat import chat_text, encode, pad_id, subject_token_index
from peft_persedit.editing.keys import layer_inputs
from peft_persedit.evaluation.distractors import model_distractors
from peft_persedit.kernels import cluster_scores
from peft_persedit.layer import PersEditLayer
from peft_persedit.preferences import load_preferences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--turns", type=int, nargs="+", default=[0, 2, 10])
    parser.add_argument("--config", type=json.loads, default={},
                        help='config fields over the defaults, e.g. \'{"key_histories": []}\'')
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_default_model()
    prefs = load_preferences(dataset_path("upqa_balanced100"))[: args.limit]
    pm = get_peft_model(model, PersonalizationEditConfig(**args.config), adapter_name="template").eval()
    users = {f"u{i}": [p] for i, p in enumerate(prefs)}
    PersonalizationEditor(pm, tokenizer, adapter_name="template", progress=False).edit_users(users, verify=False)
    pairs = model_distractors(pm.get_base_model(), tokenizer)
    layer = next(m for m in pm.modules() if isinstance(m, PersEditLayer))
    for turns in args.turns:
        texts = [chat_text(tokenizer, p.question, history=pairs[:turns]) for p in prefs]
        subjects = [subject_token_index(tokenizer, t, p.question, p.subject) for t, p in zip(texts, prefs)]
        # the edit layer's input does not depend on its own edit
        inputs = layer_inputs(pm, [layer], [encode(tokenizer, t) for t in texts], pad_id(tokenizer), subjects)[0]
        margins = sorted(float(cluster_scores(x[None], bank, torch.zeros(1, dtype=torch.long))[0, 0] - bank.tau[0])
                         for x, bank in zip(inputs, (layer.packed_bank([user]) for user in users)))
        print(f"{turns:>3} turns: gate fires for {sum(m >= 0 for m in margins)}/{len(margins)} users; "
              f"margin s − τ lowest {margins[0]:+.3f}, median {margins[len(margins) // 2]:+.3f}")


if __name__ == "__main__":
    main()
