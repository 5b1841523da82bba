"""Config values from YAML files and flags (`options.py`): each bad file, key or value is a ConfigError
that names the file and the key."""

from __future__ import annotations

import re
import warnings

import pytest

from reinforce_lm import cli
from reinforce_lm.config import TrainConfig
from reinforce_lm.errors import ConfigError
from reinforce_lm.options import build_config, load_yaml


def yaml_file(tmp_path, text: str | bytes):
    path = tmp_path / "run.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(
    "text, match",
    [
        (b"model: m\nsteps: \xff\n", r"run\.yaml:2: not UTF-8 \(byte 0xff\); re-save"),
        ("model: m\n1: 2\n", r"run\.yaml: key 1 is not an option name"),
        ("model: m\nsteps: 1\nsteps: 2\n", r"run\.yaml:3: key 'steps' is given twice"),
        ("model: m\n[a]: 2\n", r"(?s)run\.yaml: invalid YAML: .*unhashable key"),
    ],
)
def test_bad_yaml_files(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_yaml(yaml_file(tmp_path, text))


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    path = yaml_file(tmp_path, "base: &base {steps: 1, lr: 0.5}\nrun:\n  <<: *base\n  steps: 2\n")
    assert load_yaml(path)["run"] == {"steps": 2, "lr": 0.5}


@pytest.mark.parametrize(
    "values, match",
    [
        ({"steps": True}, r"run\.yaml: steps expects int, got True"),
        ({"lr": False}, r"run\.yaml: lr expects float, got False"),
        ({"progress": 5}, r"run\.yaml: progress expects bool, got 5"),
        ({"progress": "1"}, r"run\.yaml: progress expects bool, got '1'"),
        ({"progress": "maybe"}, r"run\.yaml: progress expects bool, got 'maybe'"),
        ({"reward": {"f": "x.py:g"}}, r"run\.yaml: reward expects list, got \{'f': 'x\.py:g'\}"),
        ({"reward": [["x.py:g"]]}, r"run\.yaml: reward expects list, got \[\['x\.py:g'\]\]"),
        ({"reward_weights": [True]}, r"run\.yaml: reward_weights expects numbers, got \[True\]"),
    ],
)
def test_values_of_the_wrong_type_name_the_key(values, match):
    with pytest.raises(ConfigError, match=match):
        build_config(TrainConfig, {"model": "m", "prompts": "p.jsonl", **values}, "run.yaml")


def test_yaml_booleans_written_as_text_and_empty_booleans():
    base = {"model": "m", "prompts": "p.jsonl", "reward": ["x.py:g"]}
    assert build_config(TrainConfig, {**base, "progress": "off"}).progress is False
    assert build_config(TrainConfig, {**base, "resume": "Yes"}).resume is True
    assert build_config(TrainConfig, {**base, "progress": None}).progress is True  # the default


def test_the_cli_prints_a_yaml_error_as_one_line(tmp_path, capsys):
    path = yaml_file(tmp_path, "model: m\nprompts: p.jsonl\nsteps: 1\nsteps: 2\n")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--config", str(path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err == f"reinforce-lm train: error: {path}:4: key 'steps' is given twice\n"


def test_options_that_do_nothing_in_this_run_are_warned_about():
    """--lora-alpha without --lora-r trains every weight (a LoRA run was likely meant); --estimator with
    --algorithm ppo is not used. Both say so; their defaults, or the options in use, say nothing."""
    from reinforce_lm.config import TrainConfig

    base = dict(model="m", prompts="p.jsonl", reward=["r.py:f"], output_dir="out")
    with pytest.warns(
        UserWarning, match=r"--lora-alpha, --lora-target-modules without --lora-r: LoRA is off"
    ):
        TrainConfig(**base, lora_alpha=32.0, lora_target_modules="q_proj")
    with pytest.warns(UserWarning, match=r"--estimator grpo is for --algorithm reinforce"):
        TrainConfig(**base, algorithm="ppo", estimator="grpo")
    with pytest.warns(
        UserWarning, match=r"--generation-batch-size 2 is below --samples-per-prompt 4: .* one"
    ):
        TrainConfig(**base, generation_batch_size=2, samples_per_prompt=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig(**base, lora_r=4, lora_alpha=32.0)
        TrainConfig(**base, algorithm="ppo")
        TrainConfig(**base, estimator="grpo")
        TrainConfig(**base, generation_batch_size=4, samples_per_prompt=4)


@pytest.mark.parametrize(
    "text, extra, match",
    [
        (
            "model: m\nprompts: p.jsonl\nsamples_per_promt: 4\n",
            [],
            r"run\.yaml:3: unknown key 'samples_per_promt'",
        ),
        ("model: m\nsteps: many\nprompts: p.jsonl\n", [], r"run\.yaml:2: steps expects int, got 'many'"),
        ("model: m\nsteps: many\nprompts: p.jsonl\n", ["--steps", "x"], r"command line: steps expects int"),
    ],
)
def test_a_bad_key_in_a_config_file_is_named_by_its_line(tmp_path, capsys, text, extra, match):
    path = yaml_file(tmp_path, text)
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", str(path), "--reward", "x.py:f", *extra])
    assert re.search(match, capsys.readouterr().err)
