"""Does the gate still fire after chat turns? (embedded SmolLM2-135M-Instruct, CPU, UPQA balanced100)

Edits ``--limit`` users (one preference each, default config, one batched call), then, for each user, reads the
edit layer's input at the subject token of the literal question after N of the eval's distractor turns (the
model's own answers, as ``persedit eval`` uses) and compares its gate score s = max_k cos(x − μ, K_k) with τ:

    python benchmarks/bench_gate_drift.py [--limit 20] [--turns 0 2 10]

prints, per N, how many gates fire and the lowest and median margins s − τ.
"""

from __future__ import annotations

import argparse

import torch
from peft import get_peft_model

from peft_persedit import PersonalizationEditConfig, load_default_model
from peft_persedit.data_paths import dataset_path
from peft_persedit.editing import PersonalizationEditor
from peft_persedit.editing.chat import chat_text, encode, subject_token_index
from peft_persedit.evaluation.distractors import model_distractors
from peft_persedit.kernels import cluster_scores
from peft_persedit.layer import PersEditLayer
from peft_persedit.preferences import load_preferences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--turns", type=int, nargs="+", default=[0, 2, 10])
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_default_model()
    prefs = load_preferences(dataset_path("upqa_balanced100"))[: args.limit]
    pm = get_peft_model(model, PersonalizationEditConfig(), adapter_name="template").eval()
    users = {f"u{i}": [p] for i, p in enumerate(prefs)}
    PersonalizationEditor(pm, tokenizer, adapter_name="template", progress=False).edit_users(users, verify=False)
    pairs = model_distractors(pm.get_base_model(), tokenizer)
    layer = next(m for m in pm.modules() if isinstance(m, PersEditLayer))
    seen: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_pre_hook(lambda module, inputs: seen.__setitem__("x", inputs[0].detach()))
    try:
        for turns in args.turns:
            margins = []
            for user, pref in zip(users, prefs):
                text = chat_text(tokenizer, pref.question, history=pairs[:turns])
                subject = subject_token_index(tokenizer, text, pref.question, pref.subject)
                with torch.no_grad(), pm.disable_adapter():  # the layer input does not depend on the edit
                    pm(input_ids=torch.tensor([encode(tokenizer, text)]))
                bank = layer.packed_bank([user])
                x = seen["x"][0]
                scores = cluster_scores(x, bank, torch.zeros(x.shape[0], dtype=torch.long))[:, 0]
                margins.append(float(scores[subject] - bank.tau[0]))
            margins.sort()
            print(f"{turns:>3} turns: gate fires for {sum(m >= 0 for m in margins)}/{len(margins)} users; "
                  f"margin s − τ lowest {margins[0]:+.3f}, median {margins[len(margins) // 2]:+.3f}")
    finally:
        handle.remove()


if __name__ == "__main__":
    main()
