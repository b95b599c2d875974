"""transformers.Trainer trains a PERSEDIT model: adapter tensors only, checkpoints, best model, resuming."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from tiny_models import make_tiny_model
from transformers import Trainer, TrainingArguments

from peft_persedit import PersonalizationEditConfig

TOKENS = torch.randint(3, 256, (16, 12), generator=torch.Generator().manual_seed(0))
DATA = [{"input_ids": ids, "labels": ids} for ids in TOKENS]


def trainer(tmp_path: Path, steps: int, trainable: tuple[str, ...] = ("A", "B"), **arguments) -> Trainer:
    """A Trainer on a fresh tiny llama with two always-on clusters (B = 0), saving every 2 steps."""
    model = make_tiny_model("llama")
    pm = get_peft_model(model, PersonalizationEditConfig(init_clusters=2, init_rank=4, trainable=list(trainable)))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=3e-2,
        gradient_checkpointing=True, save_strategy="steps", save_steps=2, report_to=[], use_cpu=True,
        logging_steps=1, disable_tqdm=True, seed=0, data_seed=0, **arguments)
    return Trainer(model=pm, args=args, train_dataset=DATA, eval_dataset=DATA[:4])


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


@pytest.mark.parametrize("trainable", [("A", "B"), ("B", "shift")])
def test_trainer_changes_only_trainable_adapter_tensors(tmp_path, trainable):
    tr = trainer(tmp_path, steps=4, trainable=trainable)
    before = snapshot(tr.model)
    tr.train()
    assert tr.model.base_model.model.is_gradient_checkpointing
    after = snapshot(tr.model)
    changed = {name.split(".")[-2] for name in before if not torch.equal(before[name], after[name])}
    assert changed == {f"persedit_{t}" for t in trainable}  # base weights (and buffers) bit-identical
    for step in (2, 4):
        files = {p.name for p in (tmp_path / f"checkpoint-{step}").iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files and "model.safetensors" not in files
    saved = load_file(tmp_path / "checkpoint-4" / "adapter_model.safetensors")
    assert {name.split(".")[-1] for name in saved} == {"persedit_A", "persedit_B", "persedit_keys", "persedit_shift",
                                                       "persedit_tau", "persedit_key_cluster",
                                                       "persedit_rank_cluster", "persedit_center"}


def test_load_best_model_at_end(tmp_path):
    tr = trainer(tmp_path, steps=6, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                 metric_for_best_model="eval_loss", greater_is_better=False)
    tr.train()
    best = Path(tr.state.best_model_checkpoint)
    losses = {f"checkpoint-{e['step']}": e["eval_loss"] for e in tr.state.log_history if "eval_loss" in e}
    assert best.name == min(losses, key=losses.get)
    saved = load_file(best / "adapter_model.safetensors")
    live = {name.replace(".default", ""): t for name, t in tr.model.state_dict().items() if "persedit_" in name}
    assert live.keys() == saved.keys() and all(torch.equal(live[name], t) for name, t in saved.items())


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    straight = trainer(tmp_path / "straight", steps=6)
    straight.train()
    resumed = trainer(tmp_path / "resumed", steps=6)  # a fresh model and Trainer, picking up at step 4
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-4"))
    assert resumed.state.global_step == 6

    def losses(tr: Trainer) -> list[float]:
        return [e["loss"] for e in tr.state.log_history if "loss" in e]

    assert len(losses(resumed)) == 6 and losses(resumed) == pytest.approx(losses(straight), abs=1e-5)
    final, expected = snapshot(resumed.model), snapshot(straight.model)
    assert all(torch.allclose(final[name], expected[name], atol=1e-6) for name in expected)
    b = next(name for name in final if "persedit_B" in name)
    assert final[b].abs().sum() > 0  # trained away from B = 0
