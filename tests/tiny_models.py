"""Tiny random models of every supported architecture, built from configs (no downloads)."""

from __future__ import annotations

import tempfile

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

TINY_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "olmo2", "gpt2", "gpt_neox", "phi3", "gptj"]

_IDS = dict(bos_token_id=None, eos_token_id=1, pad_token_id=2)
_COMMON = dict(**_IDS, vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)
_CONFIGS = {
    "llama": _COMMON,
    "mistral": _COMMON,
    "qwen2": _COMMON,
    "qwen3": {**_COMMON, "head_dim": 8},
    "gemma": {**_COMMON, "head_dim": 8},
    "olmo2": _COMMON,
    "phi3": _COMMON,
    "gpt2": dict(**_IDS, vocab_size=256, n_embd=32, n_layer=4, n_head=4, n_inner=64, n_positions=128),
    "gpt_neox": dict(**_IDS, vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                     num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.5),
    "gptj": dict(**_IDS, vocab_size=256, n_embd=32, n_layer=4, n_head=4, n_inner=64, n_positions=128, rotary_dim=4),
}


#: arch → name of the MLP output projection (the module edits attach to) inside each decoder block's MLP.
TARGET_MODULE = {
    "llama": "down_proj", "mistral": "down_proj", "qwen2": "down_proj", "qwen3": "down_proj", "gemma": "down_proj",
    "olmo2": "down_proj", "phi3": "down_proj", "gpt2": "c_proj", "gpt_neox": "dense_4h_to_h", "gptj": "fc_out",
}
_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "layers", "h")


def make_tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A random ``arch`` causal LM with 4 layers, hidden 32, MLP 64, vocab 256, in eval mode (seeds torch)."""
    if arch not in _CONFIGS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS}")
    torch.manual_seed(seed)
    config = AutoConfig.for_model(arch, **_CONFIGS[arch])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def mlp_out_name(arch: str) -> str:
    """Suffix of the MLP output projection within a block, e.g. ``"mlp.down_proj"``; ``"mlp.c_proj"`` for gpt2
    (whose attention also has a ``c_proj``)."""
    return f"mlp.{TARGET_MODULE[arch]}"


def layer_list(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks (``model.layers``, ``transformer.h``, ``gpt_neox.layers``...).

    Works on a transformers model, its inner base model, or a ``PeftModel`` wrapping one.
    """
    if callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()  # PeftModel → the transformers model
    for path in _LAYER_PATHS:
        module = model
        for attr in path.split("."):
            module = getattr(module, attr, None)
        if isinstance(module, nn.ModuleList):
            return module
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n)]
    if not lists:
        raise ValueError(f"no decoder block list found in {type(model).__name__}")
    return lists[0]


def mlp_out(model: nn.Module, layer: int, arch: str | None = None) -> nn.Module:
    """Layer ``layer``'s MLP output projection (a ``Linear``, or a transformers ``Conv1D`` for gpt2)."""
    arch = arch or model.config.model_type
    module = layer_list(model)[layer]
    for attr in mlp_out_name(arch).split("."):
        module = getattr(module, attr)
    return module


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (ids = code points < 127) with a ChatML template, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<|im_start|>": 0, "<|im_end|>": 1, "<pad>": 2, "<unk>": 3, "\n": 10,
             **{chr(i): i for i in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/tokenizer.json"
        tok.save(path)
        fast = PreTrainedTokenizerFast(tokenizer_file=path, bos_token=None, eos_token="<|im_end|>",
                                       pad_token="<pad>", unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    return fast
