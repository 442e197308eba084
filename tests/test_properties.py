"""Properties over hostile numbers: whatever the option values or the numbers in a valid adapter file, compose,
merge, train and attach never fail with an internal error or a traceback, and never write (or compute) a tensor that
is not finite. A value is either used correctly or refused: a usage error (exit 2, click's usage line) or one line
(exit 1), and nothing written.

Option values come as text, the way a shell passes them (``--rank=<text>``, so a value that looks like an option is
still a value). Valid counts stay small: a valid but huge --rank or --prefix-length would only measure the machine's
memory (it is refused as "not enough memory" where the allocation fails, and allocated where it does not).
"""

from __future__ import annotations

import itertools
import math
import re
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import tiny_models
from cli_runner import call_cli
from adapterkit import load, save, values
from adapterkit.attach import attach
from adapterkit.compose.methods import METHODS
from adapterkit.errors import AdapterError, RequestError
from adapterkit.example import build_example
from adapterkit.io.checkpoint import Checkpoint
from test_faults import Inputs

TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.0.mlp.up_proj"]
FLOAT32_MAX = float(np.finfo(np.float32).max)
IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 3]])


def examples(count: int) -> settings:
    return settings(max_examples=count, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


PROGRESS_BAR = re.compile(r"^[\w ]+: +\d+%\|.*\|")

#: numbers as a user could type them: specials, garbage, and what floats print as
HOSTILE_NUMBERS = ["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e309", "-1e309", "1e308", "-1e308", "-0", "-0.0",
                   "0", "5e-324", "1e-320", "1e6", "1000000.0000001", "-1e6", "1e7", "1e300", "", " ", "garbage",
                   "0x10", "1_000", "+1", "٣", "1e", ".", "--1", "1,2", "--help", "1e-7", "0.5", "2", "-1", "10",
                   "10.000001"]
numbers = st.one_of(st.sampled_from(HOSTILE_NUMBERS), st.floats().map(repr), st.floats(-10, 10).map(str),
                    st.text(max_size=5))
weight_lists = st.one_of(st.lists(numbers, min_size=1, max_size=3).map(",".join),
                         st.sampled_from(["", ",", ",,", "1,", ",1", "1,,1"]))
#: counts: hostile, and valid but small (large valid ones would only test the machine's memory)
HOSTILE_COUNTS = ["0", "-1", "-0", str(2**31), str(2**63), str(2**64), str(10**30), "1.5", "2.0", "1e3", "", " ",
                  "two", "0x2", "+2", " 2", "٣", "--help", "nan", "inf"]
counts = st.one_of(st.sampled_from(HOSTILE_COUNTS), st.integers(-3, 4).map(str), st.text(max_size=3))
_serial = itertools.count()


def check(result, out, *, folder: bool = False) -> None:
    """The property: no internal error, no traceback; exit 0 with a whole, finite output, or a refusal (2: usage,
    1: one line) that wrote nothing."""
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    assert result.returncode in (0, 1, 2), (result.returncode, result.stderr)
    event(f"exit {result.returncode}")  # --hypothesis-show-statistics: how many examples ran to the end
    if result.returncode == 0:
        if folder:
            with Checkpoint(out) as checkpoint:
                for name in checkpoint.names():
                    assert np.isfinite(checkpoint.get(name).astype(np.float32)).all(), name
        else:
            adapter = load(out)  # strict: a manifest with NaN or Infinity would be refused here
            for name, tensor in adapter.tensors.items():
                assert np.isfinite(np.asarray(tensor, dtype=np.float32)).all(), name
        return
    if result.returncode == 2:
        assert "Error:" in result.stderr and "Usage:" in result.stderr, result.stderr
    else:
        lines = [line for line in re.split(r"[\r\n]", result.stderr) if line.strip() and not PROGRESS_BAR.match(line)]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == [], "a refused command left something behind"


@pytest.fixture(scope="module")
def materials(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("properties")
    model = tiny_models.llama()
    save(tiny_models.random_lora(model, TARGETS, seed=1), root / "a.safetensors")
    save(tiny_models.random_lora(model, TARGETS[:2], seed=2, rank=2), root / "b.safetensors")
    return {"root": root, "base": tiny_llama_dir, "a": root / "a.safetensors", "b": root / "b.safetensors"}


@pytest.fixture(scope="session")
def tiny_example(tmp_path_factory):
    return build_example(tmp_path_factory.mktemp("example") / "example")


@pytest.fixture(autouse=True)
def inputs_untouched(materials, tiny_example):
    """Every input of these tests hashed before and after each test (test_faults.py's guard)."""
    guard = Inputs()
    guard.add(materials["a"], materials["b"], materials["base"], tiny_example["llama"],
              tiny_example["support_formal"])
    yield
    guard.check()


def fresh_output(root, name: str):
    """An output path in a new, empty folder (each example writes its own)."""
    folder = root / f"out-{next(_serial)}"
    folder.mkdir()
    return folder / name


def option(name: str, value) -> list[str]:
    return [] if value is None else [f"--{name}={value}"]


# --- the parsers every number goes through ------------------------------------------------------------------------


anything = st.one_of(st.integers(), st.integers(min_value=2**3000), st.floats(), st.text(), st.booleans(), st.none(),
                     st.decimals(), st.fractions(), st.sampled_from(HOSTILE_NUMBERS + HOSTILE_COUNTS),
                     st.binary(max_size=4), st.lists(st.integers(), max_size=2))


@examples(300)
@given(value=anything)
def test_the_parsers_return_a_value_in_range_or_refuse_in_one_line(value):
    """values.number, values.count and values.weights (what the CLI's option types and the library call): a finite
    float in range, an int in range, finite weights of at most MAX_WEIGHT; else a RequestError of one line."""
    for parse, valid in [
        (lambda v: values.number(v, "x", -1e6, 1e6), lambda r: type(r) is float and abs(r) <= 1e6),
        (lambda v: values.number(v, "x", 0, 1, low_open=True), lambda r: type(r) is float and 0 < r <= 1),
        (lambda v: values.count(v, "x"), lambda r: type(r) is int and 1 <= r <= values.MAX_COUNT),
        (lambda v: values.count(v, "x", low=0), lambda r: type(r) is int and 0 <= r <= values.MAX_COUNT),
        (lambda v: values.weights(v), lambda r: all(math.isfinite(w) and abs(w) <= values.MAX_WEIGHT for w in r)),
    ]:
        try:
            result = parse(value)
        except RequestError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 20_000
        else:
            assert valid(result), result


# --- option values ---------------------------------------------------------------------------------------------------


def sometimes(valid, hostile):
    """Absent half the time, else valid (often at the edge of its range) or hostile: most examples run to the end."""
    return st.one_of(st.none(), st.none(), st.none(), valid, valid, hostile)


edge_weights = st.one_of(st.sampled_from(["1e6", "-1e6", "0", "-0", "1e-300", "5e-324", "0.7"]),
                         st.floats(-1e6, 1e6).map(repr))


@examples(60)
@given(weights=sometimes(st.lists(edge_weights, min_size=2, max_size=2).map(",".join), weight_lists),
       method=st.sampled_from(list(METHODS)), rank=sometimes(st.sampled_from(["1", "2", "6", str(2**31 - 1)]), counts),
       tol=sometimes(st.sampled_from(["0", "0.999999", "1e-300", "0.5"]), numbers),
       density=sometimes(st.sampled_from(["1", "1e-300", "5e-324", "0.5"]), numbers),
       seed=sometimes(st.sampled_from(["0", str(2**31 - 1)]), counts))
def test_compose_options_never_give_an_internal_error_or_a_non_finite_file(materials, weights, method, rank, tol,
                                                                             density, seed):
    out = fresh_output(materials["root"], "composed.safetensors")
    args = ["compose", materials["a"], materials["b"], f"--method={method}", *option("weights", weights),
            *option("rank", rank), *option("tol", tol), *option("density", density), *option("seed", seed)]
    check(call_cli(*args, "-o", out), out)
    shutil.rmtree(out.parent)


@examples(25)
@given(weights=st.none() | st.lists(edge_weights, min_size=1, max_size=2).map(",".join) | weight_lists,
       dtype=st.sampled_from([None, "float32", "float16", "bfloat16"]), both=st.booleans())
def test_merge_options_never_give_an_internal_error_or_a_non_finite_folder(materials, weights, dtype, both):
    out = fresh_output(materials["root"], "merged")
    adapters = [materials["a"], materials["b"]] if both else [materials["a"]]
    args = ["merge", materials["base"], *adapters, *option("weights", weights), *option("dtype", dtype)]
    check(call_cli(*args, "-o", out), out, folder=True)
    shutil.rmtree(out.parent)


TRAIN_METHODS = ["lora", "bitfit", "prefix"]


def train(built, root, method, **options):
    out = fresh_output(root, "trained.safetensors")
    args = ["train", built["llama"], "--data", built["support_formal"], f"--method={method}",
            *(f"--{name.replace('_', '-')}={value}" for name, value in options.items())]
    check(call_cli(*args, "-o", out), out)
    shutil.rmtree(out.parent)


HOSTILE_TRAIN_OPTIONS = ["steps", "epochs", "batch_size", "rank", "alpha", "lr", "prefix_length", "seed"]


@examples(60)
@given(method=st.sampled_from(TRAIN_METHODS), hostile=st.sampled_from(HOSTILE_TRAIN_OPTIONS), count=counts,
       number=numbers)
@example(method="lora", hostile="rank", count=str(2**63), number="")  # were internal errors from torch
@example(method="prefix", hostile="prefix_length", count=str(10**30), number="")
@example(method="lora", hostile="seed", count=str(10**27), number="")
@example(method="lora", hostile="rank", count=str(2**31), number="")
@example(method="bitfit", hostile="lr", count="", number="nan")
def test_hostile_train_options_are_refused_before_any_work(tiny_example, tmp_path_factory, method, hostile, count,
                                                            number):
    """One hostile value among valid ones (--steps 1: an example that is not refused trains one step)."""
    options = {"steps": 1, "epochs": 1, "batch_size": 2, "rank": 2, "alpha": 4, "lr": "1e-3", "prefix_length": 2,
               "seed": 0}
    options[hostile] = number if hostile in ("alpha", "lr") else count
    train(tiny_example, tmp_path_factory.getbasetemp(), method, **options)


@examples(10)
@given(method=st.sampled_from(TRAIN_METHODS), epochs=st.sampled_from(["1", str(2**31 - 1)]),
       batch_size=st.integers(1, 3), rank=st.integers(1, 3),
       alpha=st.sampled_from(["1e6", "-1e6", "0", "5e-324", "16"]),
       lr=st.sampled_from(["10", "1e-300", "1e-3"]), prefix_length=st.integers(1, 3))
def test_train_at_the_edges_of_the_valid_ranges_writes_finite_files_or_refuses(tiny_example, tmp_path_factory, method,
                                                                                epochs, batch_size, rank, alpha, lr,
                                                                                prefix_length):
    """The largest learning rate and alpha can make the weights blow up: then nothing is written, in one line."""
    train(tiny_example, tmp_path_factory.getbasetemp(), method, steps=1, epochs=epochs, batch_size=batch_size,
          rank=rank, alpha=alpha, lr=lr, prefix_length=prefix_length)


# --- numbers inside a valid adapter file -------------------------------------------------------------------------


def scale(alpha: float, rank: int, scaling: str) -> float:
    return alpha / (math.sqrt(rank) if scaling == "rslora" else rank)


huge = st.one_of(st.floats(-1e300, 1e300, allow_subnormal=True), st.sampled_from([0.0, -0.0, 1e300, -1e300, 1e38,
                                                                                     3.5e38, 1e-300, 5e-324]))


@st.composite
def manifest_numbers(draw):
    return {"weight": draw(huge), "alpha": draw(huge), "rank": draw(st.integers(1, 6)),
            "scaling": draw(st.sampled_from(["standard", "rslora"]))}


@examples(40)
@given(numbers=manifest_numbers())
def test_numbers_in_a_valid_adapter_are_used_or_refused_in_one_line(materials, numbers):
    """compose (with a second adapter), merge and attach on an adapter whose weight and alpha go up to 1e300."""
    weight, alpha, rank, scaling = numbers["weight"], numbers["alpha"], numbers["rank"], numbers["scaling"]
    model = tiny_models.llama()
    adapter = tiny_models.random_lora(model, TARGETS, rank=rank, alpha=alpha, scaling=scaling, seed=rank)
    adapter.manifest.components[0].weight = weight
    path = fresh_output(materials["root"], "hostile.safetensors")
    save(adapter, path)  # a valid file: the format puts no bound on weight or alpha

    out = fresh_output(materials["root"], "composed.safetensors")
    check(call_cli("compose", path, materials["a"], "-o", out), out)

    out = fresh_output(materials["root"], "merged")
    check(call_cli("merge", materials["base"], path, "-o", out), out, folder=True)

    try:
        handle = attach(model, adapter)
    except AdapterError as exc:
        assert "\n" not in str(exc)
    else:
        with handle, torch.no_grad():
            logits = model(input_ids=IDS).logits
        assert bool(torch.isfinite(logits).all()), f"attach gave non-finite logits for {numbers}"
    shutil.rmtree(path.parent)
