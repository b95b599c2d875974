"""The cache: content keys (not paths), self-repair of unreadable entries, bounded size, shipped self-text."""

from __future__ import annotations

import json
import os
import time
import warnings

import pytest
import torch
import transformers
from helpers import edit_layers
from peft import get_peft_model
from tiny_models import make_tiny_model, tiny_tokenizer

from peft_persedit import PersonalizationEditConfig, default_model
from peft_persedit.cache import CacheWarning, prune, read_cached
from peft_persedit.editing import selftext
from peft_persedit.editing.selftext import model_fingerprint, neutral_corpus
from peft_persedit.editing.statistics import STATS_DIR, layer_stats


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSEDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny_pm():
    config = PersonalizationEditConfig(layers_to_transform=[1], synonyms=0, contexts=1)
    return get_peft_model(make_tiny_model("llama"), config).eval()


def test_read_cached_repairs_an_unreadable_entry(tmp_path):
    path = tmp_path / "x.json"
    assert read_cached(path, lambda p: json.loads(p.read_text())) is None  # absent: no warning
    path.write_text('["trunc')
    with pytest.warns(CacheWarning, match=str(path)) as record:
        assert read_cached(path, lambda p: json.loads(p.read_text())) is None
    assert len(record) == 1 and not path.exists()


def test_prune_deletes_only_older_matching_siblings(tmp_path):
    names = ["m-aaaa", "m-bbbb", "m-cccc", "m-keep", "other", "m-aaaa.bak"]
    for age, name in enumerate(names):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (1e9 + age,) * 2)  # later in the list = more recently used
    (tmp_path / "m-dddd").write_text("a file")
    os.utime(tmp_path / "m-dddd", (1e9 - 1,) * 2)
    deleted = prune(tmp_path / "m-keep", r"m-[a-z]{4}", max_entries=2)
    assert sorted(p.name for p in deleted) == ["m-aaaa", "m-bbbb", "m-dddd"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-aaaa.bak", "m-cccc", "m-keep", "other"]


def test_fingerprint_is_content_not_path_nor_peft_wrapping(tmp_path):
    tok = tiny_tokenizer()
    for folder in ("a", "b"):
        make_tiny_model("llama").save_pretrained(tmp_path / folder)
    model_a, model_b = (type(make_tiny_model("llama")).from_pretrained(tmp_path / f) for f in ("a", "b"))
    assert model_a.config._name_or_path != model_b.config._name_or_path
    reference = model_fingerprint(model_a, tok)
    assert model_fingerprint(model_b, tok) == reference
    pm = get_peft_model(model_b, PersonalizationEditConfig(layers_to_transform=[1]))
    assert model_fingerprint(pm, tok) == model_fingerprint(pm.get_base_model(), tok) == reference
    with torch.no_grad():
        edit_layers(pm)[0].base_layer.weight.add_(1e-3)  # a dense change of one matrix
    assert model_fingerprint(pm, tok) != reference
    assert model_fingerprint(model_a, tok) != model_fingerprint(model_a.to(torch.bfloat16), tok)
    other = tiny_tokenizer()
    other.chat_template = "{{ messages[0]['content'] }}"
    assert model_fingerprint(make_tiny_model("llama"), other) != reference


def test_layer_stats_cache_is_safetensors_and_repairs_itself(cache):
    pm, tok = tiny_pm(), tiny_tokenizer()
    modules = pm.base_model.edit_layers()
    first = layer_stats(pm, tok, modules)
    (name,) = modules
    files = list((cache / STATS_DIR).glob("*/*.safetensors"))
    assert [f.name for f in files] == [f"{name}.safetensors"]
    files[0].write_bytes(files[0].read_bytes()[:1000])  # truncated, e.g. by a full disk
    with pytest.warns(CacheWarning, match=str(files[0])) as record:
        repaired = layer_stats(pm, tok, modules)
    assert len(record) == 1
    for stats in (repaired, layer_stats(pm, tok, modules)):  # recomputed, and readable again
        assert torch.equal(stats[name].second_moment, first[name].second_moment)
        assert torch.equal(stats[name].samples, first[name].samples)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        layer_stats(pm, tok, modules)


def test_layer_stats_with_wrong_shapes_are_recomputed(cache):
    pm, tok = tiny_pm(), tiny_tokenizer()
    modules = pm.base_model.edit_layers()
    first = layer_stats(pm, tok, modules)
    (path,) = (cache / STATS_DIR).glob("*/*.safetensors")
    from safetensors.torch import save_file

    save_file({"mean": torch.zeros(3), "second_moment": torch.eye(3), "samples": torch.zeros(2, 3)}, path)
    with pytest.warns(CacheWarning, match="shapes"):
        again = layer_stats(pm, tok, modules)
    assert all(torch.equal(again[n].mean, first[n].mean) for n in modules)


def test_shipped_text_is_used_only_for_its_fingerprint(cache, monkeypatch):
    pm, tok = tiny_pm(), tiny_tokenizer()
    name = selftext.corpus_name()
    shipped = {"fingerprint": model_fingerprint(pm, tok), "texts": {name: ["shipped text"]}}
    monkeypatch.setattr(selftext, "shipped_texts", lambda: shipped)
    assert neutral_corpus(pm, tok) == ["shipped text"]
    assert not list((cache / "selftext").glob(f"*/{name}.json"))  # nothing generated, nothing written
    shipped["fingerprint"] = "0" * 16
    generated = neutral_corpus(pm, tok)
    assert generated != ["shipped text"] and len(generated) == len(selftext._corpus_prompts()) + 12


def _fake_gguf(tmp_path, name: str, content: bytes):
    path = tmp_path / name / default_model.GGUF_FILE
    path.parent.mkdir()
    path.write_bytes(content)
    return path


def test_converted_folder_is_keyed_by_gguf_content(cache, tmp_path):
    one, two = _fake_gguf(tmp_path, "venv1", b"gguf" * 1000), _fake_gguf(tmp_path, "venv2", b"gguf" * 1000)
    os.utime(two, (1e9, 1e9))
    other = _fake_gguf(tmp_path, "venv3", b"GGUF" * 1000)
    assert default_model._cached_folder(one) == default_model._cached_folder(two)  # other path, other mtime
    assert default_model._cached_folder(one) != default_model._cached_folder(other)


def _tiny_convert(gguf, folder) -> None:
    """Stands in for the GGUF dequantization (tens of seconds): writes a tiny model folder instead."""
    from peft_persedit.atomic import atomic_dir

    with atomic_dir(folder) as tmp:
        make_tiny_model("llama").save_pretrained(tmp)
        tiny_tokenizer().save_pretrained(tmp)


def test_default_model_folder_is_shared_bounded_and_repaired(cache, tmp_path, monkeypatch):
    gguf = _fake_gguf(tmp_path, "venv", b"gguf" * 1000)
    monkeypatch.setattr(default_model, "gguf_path", lambda: gguf)
    monkeypatch.setattr(default_model, "_convert", _tiny_convert)
    models = cache / "models"
    models.mkdir(parents=True)
    older, recent = (models / f"{default_model.DEFAULT_MODEL_NAME}-{key}" for key in ("0123456789ab", "ba9876543210"))
    unrelated = [models / "my-notes", models / f"{default_model.DEFAULT_MODEL_NAME}-keep-me"]
    for path in [older, recent, *unrelated]:
        path.mkdir()
    os.utime(older, (time.time() - 3600,) * 2)
    model, _ = default_model.load_default_model()
    expected = {k: t.clone() for k, t in model.state_dict().items()}
    folder = default_model._cached_folder(gguf)
    # bounded: the most recently used other copy (e.g. another transformers version's) stays, older ones go
    assert sorted(models.iterdir()) == sorted([folder, recent, *unrelated])
    weights = folder / "model.safetensors"
    damaged = weights.read_bytes()[:100]
    weights.unlink()  # (not truncated in place: the loaded model may still map the file)
    weights.write_bytes(damaged)
    with pytest.warns(CacheWarning, match=str(folder)):
        again, _ = default_model.load_default_model()
    assert all(torch.equal(t, expected[k]) for k, t in again.state_dict().items())


@pytest.mark.real_model
def test_shipped_selftext_matches_the_embedded_model(smol):
    model, tokenizer = smol
    shipped = selftext.shipped_texts()
    made_with = shipped["transformers"].split(".")[0]
    if transformers.__version__.split(".")[0] != made_with:  # its GGUF conversion gives another tokenizer (eos)
        pytest.skip(f"shipped text is for transformers {made_with}.x; this one generates its own")
    assert shipped["gguf_sha256"] == default_model.gguf_sha256(default_model.gguf_path())
    assert shipped["fingerprint"] == model_fingerprint(model, tokenizer)  # so the default path generates nothing
    assert set(shipped["texts"]) == {f"contexts_{PersonalizationEditConfig().contexts}_10", selftext.corpus_name()}
