"""LoRA baseline: one peft LoRA adapter per user, trained with :class:`transformers.Trainer`.

Per user: rank r = 8 (α = 2r, no dropout) on peft's default targets (``q_proj``, ``v_proj`` of every layer for
Llama-family models), ``lora_steps`` = 20 AdamW steps at a constant lr of 10⁻³ on the user's
question → target pairs in the chat template, loss on the answer tokens only (target + end-of-turn):

    L = −Σ_t∈answer log P(y_t | chat(question), y_<t) / |answer|,   batch = all of the user's pairs (≤ 10)

Each user is trained alone on a scratch copy of the base model that holds only that user's adapter (a
PeftModel with 100 adapters slows every training step down by ~2×), and the trained weights are copied
into the serving model, where all adapters are served together in mixed-adapter batches.
"""

from __future__ import annotations

import copy
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from ...editing.chat import chat_text, encode, pad_batch, pad_id
from ...preferences import Preference
from .method import AdapterMethod, Users

IGNORE = -100


def answer_examples(tokenizer, prefs: list[Preference]) -> list[dict[str, list[int]]]:
    """``input_ids`` = chat(question) ⊕ target ⊕ eos; ``labels`` the same with the prompt masked."""
    examples = []
    for pref in prefs:
        prompt = encode(tokenizer, chat_text(tokenizer, pref.question))
        answer = encode(tokenizer, pref.target + (tokenizer.eos_token or ""))
        examples.append({"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer})
    return examples


class _Collator:
    """Right-pads ``input_ids`` (pad id) and ``labels`` (−100) into a batch with its attention mask."""

    def __init__(self, pad: int) -> None:
        self.pad = pad

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        ids, mask = pad_batch([r["input_ids"] for r in rows], self.pad)
        labels, _ = pad_batch([r["labels"] for r in rows], IGNORE)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class LoRA(AdapterMethod):
    name = "lora"

    def lora_config(self) -> LoraConfig:
        r = self.config.lora_rank
        return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, task_type="CAUSAL_LM")

    def training_args(self, folder: str, batch: int) -> TrainingArguments:
        return TrainingArguments(
            output_dir=folder, max_steps=self.config.lora_steps, learning_rate=self.config.lora_lr,
            per_device_train_batch_size=batch, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            logging_strategy="steps", logging_steps=self.config.lora_steps, save_strategy="no", report_to="none",
            disable_tqdm=True, use_cpu=self.config.device == "cpu", seed=0, remove_unused_columns=False)

    def personalize(self, users: Users) -> None:
        losses, seconds = [], []
        collator = _Collator(pad_id(self.tokenizer))
        scratch = get_peft_model(copy.deepcopy(self.model), self.lora_config(), adapter_name="scratch")
        bar = tqdm(users.items(), desc="lora: train", disable=not self.config.progress, leave=False)
        stale = "scratch"
        with tempfile.TemporaryDirectory() as folder:
            for user, prefs in bar:
                scratch.add_adapter(user, self.lora_config())  # freshly initialized: the only adapter it holds
                scratch.set_adapter(user)
                scratch.delete_adapter(stale)
                stale = user
                data = answer_examples(self.tokenizer, prefs)
                trainer = Trainer(model=scratch, args=self.training_args(folder, len(data)), train_dataset=data,
                                  data_collator=collator)
                trainer.remove_callback(PrinterCallback)  # no log dict per user (the bar shows progress)
                start = time.perf_counter()
                out = trainer.train()
                seconds.append(time.perf_counter() - start)
                losses.append(float(trainer.state.log_history[-2]["loss"]) if len(trainer.state.log_history) > 1
                              else float(out.training_loss))
                self._serve(user, get_peft_model_state_dict(scratch, adapter_name=user))
        del scratch
        self.model.eval()
        self.info.update(steps_per_user=self.config.lora_steps, lr=self.config.lora_lr, rank=self.config.lora_rank,
                         train_seconds_per_user=sum(seconds) / len(seconds), final_loss_mean=sum(losses) / len(losses),
                         trainable_parameters_per_user=sum(
                             p.numel() for n, p in self.model.named_parameters() if f".{user}." in n))

    def _serve(self, user: str, weights: dict[str, torch.Tensor]) -> None:
        """Add ``user``'s trained adapter ``weights`` to the serving model (a PeftModel from the first user on)."""
        if hasattr(self.model, "peft_config"):
            self.model.add_adapter(user, self.lora_config())
        else:
            self.model = get_peft_model(self.model, self.lora_config(), adapter_name=user)
        result = set_peft_model_state_dict(self.model, weights, adapter_name=user)
        missing = [k for k in result.missing_keys if f".{user}." in k]
        if missing:
            raise RuntimeError(f"LoRA weights of {user} did not load into the serving model: {missing[:3]}")
