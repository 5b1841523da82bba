"""Checkpoint rotation counts only complete checkpoints, and checkpoints are as readable as the umask
allows (a shared file system: teammates and inference servers read them)."""

from __future__ import annotations

import os
import stat
import time

import pytest
from transformers import AutoModelForCausalLM

from reinforce_lm import checkpoint, toy


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tok = toy.make_tokenizer()
    return toy.make_model("llama", tok), tok


def save(out, step, model_and_tokenizer, keep=2):
    model, tok = model_and_tokenizer
    return checkpoint.save_checkpoint(out, step, {"policy": model}, tok, {"x": step}, keep=keep)


def incomplete(out, step):
    """What a partial copy leaves: a checkpoint directory without the trainer state."""
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_rotation_counts_and_deletes_only_complete_checkpoints(tmp_path, model_and_tokenizer):
    save(tmp_path, 1, model_and_tokenizer)
    save(tmp_path, 2, model_and_tokenizer)
    junk = incomplete(tmp_path, 400)  # sorts after every real step
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    save(tmp_path, 3, model_and_tokenizer)
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    assert kept == ["checkpoint-2", "checkpoint-3", "checkpoint-400"]  # the leftover is left alone
    assert junk.is_dir()
    assert checkpoint.latest_checkpoint(tmp_path).name == "checkpoint-3"


def test_a_killed_saves_temporary_directory_goes_with_the_next_save(tmp_path, model_and_tokenizer):
    stale, busy = tmp_path / ".tmp-checkpoint-4-xusso7wf", tmp_path / ".tmp-checkpoint-9-another"
    for d in (stale, busy):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"half")
    hours_ago = time.time() - 2 * checkpoint.STALE_SECONDS
    for p in (stale, stale / "model.safetensors"):
        os.utime(p, (hours_ago, hours_ago))
    save(tmp_path, 5, model_and_tokenizer)
    assert not stale.exists()  # killed long ago
    assert busy.is_dir()  # written to just now: maybe another process still saving
    assert sorted(p.name for p in tmp_path.iterdir()) == [busy.name, "checkpoint-5", "latest"]


def test_the_checkpoint_just_written_is_never_rotated_away(tmp_path, model_and_tokenizer):
    """A complete checkpoint with a higher step (an older run in the same directory) does not push out
    the one just saved, even with keep=1."""
    save(tmp_path, 9, model_and_tokenizer)
    final = save(tmp_path, 3, model_and_tokenizer, keep=1)
    assert final.is_dir() and not (tmp_path / "checkpoint-9").exists()
    AutoModelForCausalLM.from_pretrained(final)


def test_latest_checkpoint_skips_a_missing_or_incomplete_latest(tmp_path, model_and_tokenizer):
    save(tmp_path, 2, model_and_tokenizer)
    incomplete(tmp_path, 400)
    (tmp_path / "latest").write_text("checkpoint-400\n")
    assert checkpoint.latest_checkpoint(tmp_path).name == "checkpoint-2"
    (tmp_path / "latest").write_text("checkpoint-999\n")
    assert checkpoint.latest_checkpoint(tmp_path).name == "checkpoint-2"


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=oct)
def test_checkpoint_modes_follow_the_umask(tmp_path, model_and_tokenizer, umask):
    """mkdtemp makes 0700 and transformers writes model.safetensors 0600; the rename keeps both."""
    old = os.umask(umask)
    try:
        final = save(tmp_path / "out", 1, model_and_tokenizer)
    finally:
        os.umask(old)
    assert stat.S_IMODE(final.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "out" / "latest").stat().st_mode) == 0o666 & ~umask
    files = [p for p in final.rglob("*") if p.is_file()]
    assert {"model.safetensors", "config.json", checkpoint.STATE_FILE} <= {p.name for p in files}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p.name


def test_a_save_draws_no_progress_bar_and_leaves_the_setting_as_it_was(tmp_path, model_and_tokenizer, capfd):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    save(tmp_path, 1, model_and_tokenizer)
    assert "Writing model shards" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()
    model, _ = model_and_tokenizer
    model.save_pretrained(tmp_path / "plain")  # transformers' own bar, which the test above would see
    assert "Writing model shards" in capfd.readouterr().err
