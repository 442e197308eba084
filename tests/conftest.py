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


@pytest.fixture(scope="session")
def tiny_dirs(tiny_llama_dir, tiny_gpt2_dir, tiny_bert_dir):
    """The three tiny bases of tiny_models.MODELS, saved, by name."""
    return {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir, "bert": tiny_bert_dir}


@pytest.fixture(scope="session")
def example(tmp_path_factory):
    """The built-in example (adapterkit example), with a short held-out sample that keeps a causal LM's per-epoch
    evaluation quick."""
    from adapterkit.example import build_example

    paths = build_example(tmp_path_factory.mktemp("example") / "example")
    lines = paths["support_casual"].read_text().splitlines()
    paths["support_sample"] = paths["support_casual"].with_name("support_sample.jsonl")
    paths["support_sample"].write_text("\n".join(lines[::20]) + "\n")
    return paths
