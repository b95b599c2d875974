"""Adapter files are never half-written, bad files are refused at load naming file and tensor, and preferences
are not published by accident."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import safetensors.torch
import transformers.utils.hub
from helpers import IDS, add_random_clusters, edit_layers
from peft import PeftModel, get_peft_model
from tiny_models import make_tiny_model

import peft_persedit
from peft_persedit import PersonalizationEditConfig
from peft_persedit.loading import check_adapter_dir, looks_local
from peft_persedit.validation import AdapterWeightsError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def saved_adapter(path: Path, clusters: int = 2, **config) -> PeftModel:
    pm = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(**config))
    add_random_clusters(edit_layers(pm)[0], "default", clusters)
    pm.save_pretrained(path)
    return pm


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def clusters_of(pm: PeftModel, adapter: str = "default") -> int:
    return edit_layers(pm)[0].num_clusters(adapter)


# ------------------------------------------------------------------------------------------- atomic saves


def test_interrupted_weights_write_keeps_the_old_adapter(tmp_path, monkeypatch):
    pm = saved_adapter(tmp_path)
    before = snapshot(tmp_path)
    add_random_clusters(edit_layers(pm)[0], "default", 3, seed=1)
    real_save = safetensors.torch.save_file

    def save_half_then_fail(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        pm.save_pretrained(tmp_path)
    assert snapshot(tmp_path) == before  # byte-identical, and no temp files left behind
    assert sorted(os.listdir(tmp_path)) == sorted(before)
    assert clusters_of(PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path)) == 2


def test_interrupted_config_write_keeps_both_files(tmp_path, monkeypatch):
    pm = saved_adapter(tmp_path)
    before = snapshot(tmp_path)
    add_random_clusters(edit_layers(pm)[0], "default", 3, seed=1)
    real_dumps = json.dumps

    def fail_on_config(obj, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("peft_type") == "PERSEDIT":
            raise KeyboardInterrupt
        return real_dumps(obj, *args, **kwargs)

    monkeypatch.setattr(json, "dumps", fail_on_config)
    with pytest.raises(KeyboardInterrupt):
        pm.save_pretrained(tmp_path)  # the new weights were complete, but the pair is committed together
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == sorted(before)
    assert clusters_of(peft_persedit.from_pretrained(make_tiny_model("llama"), tmp_path)) == 2


def test_atomic_save_overwrites_and_keeps_permissions(tmp_path):
    pm = saved_adapter(tmp_path)
    os.chmod(tmp_path / WEIGHTS, 0o640)
    add_random_clusters(edit_layers(pm)[0], "default", 1, seed=1)
    pm.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", CONFIG, WEIGHTS]
    assert (tmp_path / WEIGHTS).stat().st_mode & 0o777 == 0o640
    assert clusters_of(PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path)) == 3


# ------------------------------------------------------------------------------------ corrupted weight files


def overwrite_tensor_bytes(file: Path, tensor: str, data: bytes) -> None:
    """Overwrite the first bytes of ``tensor``'s data in place (the header stays intact)."""
    raw = bytearray(file.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    (key,) = [k for k in header if k.endswith(f".{tensor}")]
    start = 8 + header_len + header[key]["data_offsets"][0]
    raw[start:start + len(data)] = data
    file.write_bytes(bytes(raw))


CORRUPTIONS = [
    ("persedit_key_cluster", struct.pack("<q", -72057594037927681), r"cluster index -72057594037927681 out of range"),
    ("persedit_rank_cluster", struct.pack("<q", 2), r"cluster index 2 out of range for a bank of 2 clusters"),
    ("persedit_A", struct.pack("<f", float("nan")), r"1 of \d+ values are NaN or infinite"),
    ("persedit_shift", struct.pack("<f", float("inf")), r"1 of 64 values are NaN or infinite"),
    ("persedit_tau", struct.pack("<f", float("nan")), r"1 of 2 values are NaN$"),
]


@pytest.mark.parametrize(("tensor", "data", "message"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupted_weights_are_refused_at_load(tmp_path, tensor, data, message):
    saved_adapter(tmp_path)
    overwrite_tensor_bytes(tmp_path / WEIGHTS, tensor, data)
    pattern = rf"{tmp_path / WEIGHTS}: .*{tensor}\.default: {message}"
    with pytest.raises(AdapterWeightsError, match=pattern):
        PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path)
    with pytest.raises(ValueError, match=pattern):
        peft_persedit.from_pretrained(make_tiny_model("llama"), tmp_path)


def test_corrupted_second_adapter_is_not_left_half_loaded(tmp_path):
    saved_adapter(tmp_path / "good")
    saved_adapter(tmp_path / "bad")
    overwrite_tensor_bytes(tmp_path / "bad" / WEIGHTS, "persedit_key_cluster", b"\xff" * 8)
    pm = peft_persedit.from_pretrained(make_tiny_model("llama"), tmp_path / "good")
    with pytest.raises(AdapterWeightsError, match=r"bad/adapter_model.safetensors: .*persedit_key_cluster.bob"):
        pm.load_adapter(tmp_path / "bad", adapter_name="bob")
    assert list(pm.peft_config) == ["default"] and pm.base_model.loaded_adapters() == ["default"]
    pm(IDS)  # still serves the good adapter


def test_transformers_load_adapter_checks_the_banks(tmp_path):
    saved_adapter(tmp_path)
    overwrite_tensor_bytes(tmp_path / WEIGHTS, "persedit_key_cluster", struct.pack("<q", 7))
    model = make_tiny_model("llama")
    with pytest.raises(AdapterWeightsError, match=rf"{tmp_path / WEIGHTS}: .*persedit_key_cluster.alice: cluster "
                                                  r"index 7 out of range"):
        model.load_adapter(str(tmp_path), adapter_name="alice")
    layer = next(m for m in model.modules() if isinstance(m, peft_persedit.PersEditLinear))
    assert "alice" not in (getattr(model, "peft_config", None) or {}) or layer.num_clusters("alice") == 0
    model(IDS)  # nothing corrupt was left in the model


def test_weights_and_config_that_do_not_belong_together(tmp_path):
    saved_adapter(tmp_path / "two", clusters=2)
    saved_adapter(tmp_path / "three", clusters=3)
    (tmp_path / "three" / CONFIG).write_bytes((tmp_path / "two" / CONFIG).read_bytes())
    with pytest.raises(AdapterWeightsError, match=rf"three/{CONFIG}: bank_sizes\[.*down_proj'\] is \[4, 2, 4\] .*"
                                                  r"holds \[6, 3, 6\].*do not belong together"):
        PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path / "three")


# ------------------------------------------------------------------------------------- unreadable adapters


@pytest.mark.parametrize(("keep", "message"), [(0, r"the file is empty \(0 bytes\)"),
                                               (5, "truncated or not a safetensors file"),
                                               (-100, "truncated or not a safetensors file")])
def test_truncated_weights_file(tmp_path, keep, message):
    saved_adapter(tmp_path)
    data = (tmp_path / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[:keep])
    with pytest.raises(ValueError, match=rf"{tmp_path / WEIGHTS}: {message}"):
        check_adapter_dir(tmp_path)
    with pytest.raises(ValueError, match=message):
        peft_persedit.from_pretrained(make_tiny_model("llama"), tmp_path)


@pytest.mark.parametrize(("content", "kind"), [("[1, 2]", "list"), ('"PERSEDIT"', "str"), ("null", "NoneType")])
def test_config_must_be_a_json_object(tmp_path, content, kind):
    saved_adapter(tmp_path)
    (tmp_path / CONFIG).write_text(content)
    with pytest.raises(ValueError, match=rf"{CONFIG}: expected a JSON object, got a JSON {kind}"):
        check_adapter_dir(tmp_path)


def test_missing_local_folder_fails_fast(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    start = time.perf_counter()
    for path in ("out/nope", "./nope", "nope/a/b", tmp_path / "nope"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            peft_persedit.from_pretrained(make_tiny_model("llama"), path)
    assert time.perf_counter() - start < 5  # no Hub retries
    assert looks_local("out/nope") and not looks_local("someuser/some-adapter")


# -------------------------------------------------------------------------------------------------- privacy


@pytest.fixture
def offline_hub(monkeypatch):
    """Capture what push_to_hub would send: the ``private`` flag and the uploaded files (no network)."""
    sent: dict = {"private": [], "files": []}

    def create_repo(*args, **kwargs):
        sent["private"].append(kwargs.get("private"))
        return SimpleNamespace(repo_id=kwargs.get("repo_id") or args[-1])

    def create_commit(*args, **kwargs):
        sent["files"] += [op.path_in_repo for op in kwargs["operations"]]
        return "https://huggingface.co/u/r/commit/0"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    for name, fake in (("create_repo", create_repo), ("create_commit", create_commit)):  # transformers 4
        monkeypatch.setattr(transformers.utils.hub, name, fake, raising=False)
    monkeypatch.setattr(transformers.utils.hub, "create_and_tag_model_card",
                        lambda *a, **k: huggingface_hub.ModelCard("---\n---\n"))
    return sent


PREFS = [{"subject": "hobby", "question": "What is my hobby?", "target": "birdwatching"}]


def test_push_with_preferences_is_private_by_default(offline_hub, tmp_path):
    pm = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig(preferences=PREFS))
    with pytest.warns(UserWarning, match=r"'default' \(1 preference\) store their preferences in plain text in "
                                         r"adapter_config.json.*PRIVATE.*private=False"):
        pm.push_to_hub("user/alice")
    with pytest.warns(UserWarning, match="which will be public"):
        pm.push_to_hub("user/alice", private=False)
    pm.push_to_hub("user/alice", private=True)
    assert offline_hub["private"] == [True, False, True]
    assert CONFIG in offline_hub["files"] and WEIGHTS in offline_hub["files"]


def test_push_without_preferences_is_unchanged(offline_hub, recwarn):
    pm = get_peft_model(make_tiny_model("llama"), PersonalizationEditConfig())
    pm.push_to_hub("user/empty")
    assert offline_hub["private"] == [None]
    assert not [w for w in recwarn if "preferences" in str(w.message)]


def test_transformers_model_with_adapter_push_is_private(offline_hub, tmp_path):
    saved_adapter(tmp_path, preferences=PREFS)
    model = make_tiny_model("llama")
    model.load_adapter(str(tmp_path), adapter_name="alice")
    model.save_pretrained = lambda folder, **kwargs: None  # transformers 5 saves adapters only with peft >= 0.22
    with pytest.warns(UserWarning, match=r"'alice' \(1 preference\).*PRIVATE"):
        model.push_to_hub("user/alice")
    del model.save_pretrained
    with pytest.warns(UserWarning, match="PRIVATE"):
        try:
            model.save_pretrained(str(tmp_path / "push"), push_to_hub=True, repo_id="user/alice")
        except ValueError as err:  # transformers 5 saves adapters only with peft >= 0.22 (after creating the repo)
            assert "version of PEFT" in str(err)
    assert offline_hub["private"] == [True, True]

