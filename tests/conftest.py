"""Shared fixtures: tiny base models saved as Hugging Face folders once per test session."""

from __future__ import annotations

import os

import pytest
import torch

import tiny_models

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _saved(tmp_path_factory, name, model):
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return _saved(tmp_path_factory, "llama", tiny_models.llama())


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    return _saved(tmp_path_factory, "gpt2", tiny_models.gpt2())


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    return _saved(tmp_path_factory, "bert", tiny_models.bert())
