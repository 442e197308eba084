"""The reader never crashes: thousands of files mutated from the valid vectors each give a valid Adapter or an
AdapterError, never another exception (spec §11). Mutations: bit flips, byte overwrites, truncations, header regions
spliced or repeated, changed header lengths, and random JSON edits to the header and to the manifest inside it."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterkit import Adapter, AdapterError
from adapterkit.io.adapter_file import MANIFEST_KEY, parse
from adapterkit.summary import describe, render
from cli_runner import call_cli, run_cli

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
EXPECTED = json.loads((VECTORS / "expected.json").read_text())
SEEDS = [(VECTORS / name).read_bytes() for name, verdict in sorted(EXPECTED.items()) if verdict["valid"]]


def split(file: bytes) -> tuple[bytes, bytes]:
    (length,) = struct.unpack("<Q", file[:8])
    return file[8 : 8 + length], file[8 + length :]


def join(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


# --- byte-level mutations -------------------------------------------------------------------------------------------

@st.composite
def bit_flip(draw, file: bytes) -> bytes:
    position = draw(st.integers(0, len(file) * 8 - 1))
    out = bytearray(file)
    out[position // 8] ^= 1 << (position % 8)
    return bytes(out)


@st.composite
def overwrite(draw, file: bytes) -> bytes:
    position = draw(st.integers(0, len(file) - 1))
    return file[:position] + draw(st.binary(min_size=1, max_size=16)) + file[position + 16 :]


@st.composite
def truncate(draw, file: bytes) -> bytes:
    return file[: draw(st.integers(0, len(file) - 1))]


@st.composite
def splice_header(draw, file: bytes) -> bytes:
    """Copy a region of the header to another place in it (duplicated keys, broken nesting), fixing the length."""
    header, data = split(file)
    if not header:
        return draw(overwrite(file))
    start = draw(st.integers(0, len(header) - 1))
    end = draw(st.integers(start, min(len(header), start + 200)))
    at = draw(st.integers(0, len(header)))
    return join(header[:at] + header[start:end] + header[at:], data)


@st.composite
def change_header_length(draw, file: bytes) -> bytes:
    (length,) = struct.unpack("<Q", file[:8])
    new = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(max(0, length - 16), length + 16)))
    return struct.pack("<Q", new) + file[8:]


# --- JSON-level mutations -------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["lora", "prefix", "bitfit", "full", "F32", "BF16", "2.0", "1.1"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def containers(value, path=()):
    """Every (path, container) inside a parsed JSON value, the value itself first."""
    if isinstance(value, (dict, list)):
        yield path, value
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, child in items:
            yield from containers(child, (*path, key))


@st.composite
def edit_json(draw, document):
    """Replace, delete or add one entry somewhere in ``document`` (edited in place)."""
    places = list(containers(document))
    _, container = places[draw(st.integers(0, len(places) - 1))]
    keys = list(container) if isinstance(container, dict) else list(range(len(container)))
    action = draw(st.sampled_from(["replace", "delete", "add"] if keys else ["add"]))
    if action == "add":
        if isinstance(container, dict):
            container[draw(st.text(max_size=8) | st.sampled_from(keys or ["x"]))] = draw(json_values)
        else:
            container.append(draw(json_values))
        return
    key = draw(st.sampled_from(keys))
    if action == "delete":
        del container[key]
    else:
        container[key] = draw(json_values | st.just(container[key] * 2 if isinstance(container[key], int) else -1))


@st.composite
def json_edits(draw, file: bytes) -> bytes:
    """Edit the header JSON, or the manifest JSON stored in it, then write the header back (valid JSON, new length)."""
    header_bytes, data = split(file)
    header = json.loads(header_bytes)
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if draw(st.booleans()) and isinstance(metadata, dict) and isinstance(metadata.get(MANIFEST_KEY), str):
        manifest = json.loads(metadata[MANIFEST_KEY])
        for _ in range(draw(st.integers(1, 3))):
            draw(edit_json(manifest))
        metadata[MANIFEST_KEY] = json.dumps(manifest)
    else:
        for _ in range(draw(st.integers(1, 3))):
            draw(edit_json(header))
    return join(json.dumps(header).encode(), data)


# JSON edits are listed three times: byte mutations mostly break the header's JSON, edits reach the deeper rules.
MUTATIONS = [bit_flip, overwrite, truncate, splice_header, change_header_length, json_edits, json_edits, json_edits]


@st.composite
def mutated_files(draw) -> bytes:
    file = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 3))):
        if len(file) < 9:
            break
        mutation = draw(st.sampled_from(MUTATIONS))
        try:
            file = draw(mutation(file))
        except (ValueError, struct.error, UnicodeDecodeError):  # the header is already too broken to edit as JSON
            file = draw(bit_flip(file))
    return file


@settings(max_examples=2000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated_files())
def test_mutated_files_give_an_adapter_or_an_adapter_error(file):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that a bytes object is read-only; the reader never writes it
        try:
            result = parse(file, "fuzzed.safetensors")
        except AdapterError as exc:
            assert str(exc).startswith("fuzzed.safetensors: ") and "\n" not in str(exc)
            return
    assert isinstance(result, Adapter)
    assert render(describe(result))  # what `adapterkit inspect` shows of any file the reader accepts


REGRESSIONS = {
    # each once crashed (or hung) the reader with something other than AdapterError
    "integer of 5000 digits": b'{"__metadata__": {"x": "y"}, "t": {"dtype": "F32", "shape": [' + b"9" * 5000 + b"]}}",
    "arrays nested 100,000 deep": b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "NaN in the header": b'{"t": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}',
    "65 dimensions": json.dumps({"t": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}).encode(),
    "zero-size tensor of enormous shape": json.dumps(
        {"t": {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}}).encode(),
}


@pytest.mark.parametrize("label", sorted(REGRESSIONS))
def test_former_crashes_are_adapter_errors(label):
    header = REGRESSIONS[label]
    data = b"\0" * 4 if b"[0, 4]" in header else b""
    with pytest.raises(AdapterError):
        parse(join(header, data))


@pytest.mark.parametrize("manifest_edit", [
    lambda m: m["components"][0].__setitem__("weight", 1e400),
    lambda m: m.__setitem__("training", json.loads("[" * 500 + "]" * 500)),
    lambda m: m.__setitem__("training", {"nested": json.loads("[" * 40 + "]" * 40)}),
    lambda m: m["components"][0].__setitem__("weight", float("nan")),
    lambda m: m["components"][0]["params"].__setitem__("rank", 10**30),
])
def test_manifest_values_that_json_allows_but_the_format_does_not(manifest_edit):
    header_bytes, data = split(SEEDS[0])
    header = json.loads(header_bytes)
    manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
    manifest_edit(manifest)
    text = json.dumps(manifest).replace("1e+400", "1e400")
    header["__metadata__"][MANIFEST_KEY] = text
    with pytest.raises(AdapterError, match="manifest"):
        parse(join(json.dumps(header).encode(), data))


@pytest.mark.parametrize("command", ["validate", "inspect"])
def test_cli_reports_a_mangled_file_in_one_line(tmp_path, command):
    mangled = bytearray(SEEDS[0])
    mangled[40:48] = b"\xff\x00{[]}\"\\"
    path = tmp_path / "mangled.safetensors"
    path.write_bytes(bytes(mangled))
    result = (run_cli if command == "validate" else call_cli)(command, path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output and "internal error" not in output
    assert len(output.strip().splitlines()) == 1 and str(path) in output
