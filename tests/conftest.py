"""Shared fixtures: tiny models of several architectures, built locally (no download)."""

from __future__ import annotations

import pytest
import torch

from reinforce_lm import toy


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models run faster on one thread than on two contended ones (and CI has two cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _quiet_and_seeded(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    return toy.make_tokenizer()


@pytest.fixture(scope="session", params=toy.ARCHITECTURES)
def tiny_model_dir(request, tmp_path_factory):
    """A saved tiny model + tokenizer directory, once per architecture (gpt2, llama, qwen2)."""
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return toy.save_tiny_model(path, arch=request.param)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """One saved tiny Llama directory, for tests that need only one architecture."""
    return toy.save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama")
