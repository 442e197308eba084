"""Write the conformance vectors of spec/SPEC.md §12 into spec/vectors/, byte for byte the same on every run.

    python spec/make_vectors.py [OUTPUT_FOLDER]      # default: spec/vectors next to this script

Every file is built by hand here, with a tiny safetensors writer of our own (8-byte little-endian header length,
JSON header padded with spaces to a multiple of 8, data buffer), so invalid files can break exactly one rule and the
bytes do not depend on the version of any library. Tensor values are small exact fractions, not random numbers.
``expected.json`` gives each file's verdict: ``{"valid": true}`` or ``{"valid": false, "reason": "<substring of the
error message>"}``.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

import numpy as np

VERSION = "1.0"
PRODUCER = {"name": "adapterkit-spec-vectors", "version": "1.0"}
BASE_ID = "example/tiny-base"

# The tiny base model the adapters are written for (also vector invalid_no_manifest_plain_base.safetensors, and the fingerprint
# worked example of the spec). Hidden size 8, two key/value heads of size 2, a 16-token vocabulary, two classes.
Q_PROJ = "model.layers.0.self_attn.q_proj"
V_PROJ = "model.layers.0.self_attn.v_proj"
ATTENTION = "model.layers.0.self_attn"
EMBED = "model.embed_tokens"
HEAD = "score"


def values(shape, start=0, dtype=np.float32):
    """Small exact fractions (-3..3)/8, different per ``start``: deterministic and identical in every dtype."""
    count = int(np.prod(shape, dtype=np.int64))
    return (((np.arange(count) * 5 + start) % 7 - 3) / 8).reshape(shape).astype(dtype)


def base_tensors() -> dict[str, np.ndarray]:
    return {
        f"{EMBED}.weight": values((16, 8), 1),
        f"{Q_PROJ}.weight": values((8, 8), 2),
        f"{Q_PROJ}.bias": values((8,), 3),
        f"{V_PROJ}.weight": values((4, 8), 4),
        f"{HEAD}.weight": values((2, 8), 5),
    }


# --- the container -------------------------------------------------------------------------------------------------

DTYPE_NAMES = {np.dtype("float16"): "F16", np.dtype("float32"): "F32", np.dtype("float64"): "F64",
               np.dtype("int32"): "I32"}


def entry(array: np.ndarray, dtype: str | None = None) -> tuple[dict, bytes]:
    """A header entry (without offsets) and the little-endian bytes of ``array``. ``dtype="BF16"`` rounds a float32
    array to bfloat16 (its values here are exact in bfloat16, so rounding is truncation)."""
    if dtype == "BF16":
        data = (np.ascontiguousarray(array, dtype="<f4").view("<u4") >> 16).astype("<u2").tobytes()
    else:
        dtype = dtype or DTYPE_NAMES[array.dtype]
        data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
    return {"dtype": dtype, "shape": list(array.shape)}, data


def container(tensors: dict[str, np.ndarray | tuple[dict, bytes]], metadata: dict | None,
              offsets: dict[str, list[int]] | None = None, gap_before: str | None = None) -> bytes:
    """A safetensors file. For broken files, ``offsets`` overrides the data offsets of the named tensors and
    ``gap_before`` leaves 8 unused bytes in the data buffer before the named tensor."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    buffer = bytearray()
    for name, tensor in tensors.items():
        info, raw = tensor if isinstance(tensor, tuple) else entry(tensor)
        if name == gap_before:
            buffer += bytes(8)
        header[name] = {**info, "data_offsets": [len(buffer), len(buffer) + len(raw)]}
        buffer += raw
    for name, pair in (offsets or {}).items():
        header[name]["data_offsets"] = pair
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + bytes(buffer)


def adapter_file(components: list[dict], tensors: dict, version: str = VERSION, extra: dict | None = None,
                 composition: dict | None = None, **container_args) -> bytes:
    manifest = {
        "producer": PRODUCER,
        "base_model": {"id": BASE_ID, "revision": "main", "fingerprint": base_fingerprint()},
        "components": components,
    }
    if composition is not None:
        manifest["composition"] = composition
    manifest.update(extra or {})
    metadata = {"adapterkit.format_version": version,
                "adapterkit.manifest": json.dumps(manifest, sort_keys=True, separators=(",", ":"))}
    return container(tensors, metadata, **container_args)


# --- the fingerprint (spec §7), written out from the spec's text rather than imported ---------------------------

def base_fingerprint() -> str:
    records = []
    for array in base_tensors().values():
        if array.ndim < 2:
            continue
        sample = np.concatenate([array[0].reshape(-1), array[-1].reshape(-1)]).astype("<f4")
        bits = sample.view("<u4").astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")  # round to nearest even
        records.append("x".join(map(str, array.shape)) + ":" + hashlib.sha256(rounded.tobytes()).hexdigest())
    return "fp1:" + hashlib.sha256("\n".join(sorted(records)).encode()).hexdigest()


# --- the components --------------------------------------------------------------------------------------------------

def lora(name="default", rank=2, alpha=4.0, weight=1.0):
    component = {"name": name, "kind": "lora", "targets": [Q_PROJ, V_PROJ],
                 "params": {"rank": rank, "alpha": alpha, "scaling": "standard", "fan_in_fan_out": False},
                 "weight": weight}
    tensors = {
        f"{name}.{Q_PROJ}.lora_A": values((rank, 8), 10),
        f"{name}.{Q_PROJ}.lora_B": values((8, rank), 11),
        f"{name}.{V_PROJ}.lora_A": values((rank, 8), 12),
        f"{name}.{V_PROJ}.lora_B": values((4, rank), 13),
    }
    return component, tensors


def bitfit(name="bias", weight=1.0):
    component = {"name": name, "kind": "bitfit", "targets": [Q_PROJ, V_PROJ], "params": {}, "weight": weight}
    return component, {f"{name}.{Q_PROJ}.bias": entry(values((8,), 20), "BF16"),
                       f"{name}.{V_PROJ}.bias": entry(values((4,), 21), "BF16")}


def prefix(name="prompt", weight=1.0):
    component = {"name": name, "kind": "prefix", "targets": [ATTENTION], "params": {"prefix_length": 3},
                 "weight": weight}
    return component, {f"{name}.{ATTENTION}.prefix_key": values((2, 3, 2), 30, np.float16),
                       f"{name}.{ATTENTION}.prefix_value": values((2, 3, 2), 31, np.float16)}


def dora(name="dora"):
    component = {"name": name, "kind": "dora", "targets": [Q_PROJ, V_PROJ],
                 "params": {"rank": 2, "alpha": 4.0, "scaling": "standard", "fan_in_fan_out": False}, "weight": 1.0}
    return component, {
        f"{name}.{Q_PROJ}.lora_A": values((2, 8), 60), f"{name}.{Q_PROJ}.lora_B": values((8, 2), 61),
        f"{name}.{Q_PROJ}.magnitude": values((8,), 62) + np.float32(1),
        f"{name}.{V_PROJ}.lora_A": values((2, 8), 63), f"{name}.{V_PROJ}.lora_B": values((4, 2), 64),
        f"{name}.{V_PROJ}.magnitude": values((4,), 65) + np.float32(1),
    }


def ia3(name="scales"):
    """q_proj's vector scales its input (a feed-forward target, [in] = 8), v_proj's its output ([out] = 4)."""
    component = {"name": name, "kind": "ia3", "targets": [Q_PROJ, V_PROJ],
                 "params": {"feedforward": False, "fan_in_fan_out": False},
                 "target_params": {Q_PROJ: {"feedforward": True}}, "weight": 1.0}
    return component, {f"{name}.{Q_PROJ}.ia3_l": values((8,), 66) + np.float32(1),
                       f"{name}.{V_PROJ}.ia3_l": values((4,), 67) + np.float32(1)}


def bottleneck(name="bottleneck"):
    """A bottleneck of 2 (ReLU) after q_proj and of 1 (GELU) after v_proj."""
    component = {"name": name, "kind": "adapter", "targets": [Q_PROJ, V_PROJ],
                 "params": {"bottleneck": 2, "non_linearity": "relu", "placement": "custom"},
                 "target_params": {V_PROJ: {"bottleneck": 1, "non_linearity": "gelu"}}, "weight": 0.5}
    return component, {
        f"{name}.{Q_PROJ}.down": values((2, 8), 70), f"{name}.{Q_PROJ}.down_bias": values((2,), 71),
        f"{name}.{Q_PROJ}.up": values((8, 2), 72), f"{name}.{Q_PROJ}.up_bias": values((8,), 73),
        f"{name}.{V_PROJ}.down": values((1, 4), 74), f"{name}.{V_PROJ}.down_bias": values((1,), 75),
        f"{name}.{V_PROJ}.up": values((4, 1), 76), f"{name}.{V_PROJ}.up_bias": values((4,), 77),
    }


def vectors() -> dict[str, tuple[bytes, dict]]:
    """file name -> (bytes, verdict)."""
    ok = {"valid": True}

    def bad(reason):
        return {"valid": False, "reason": reason}

    out: dict[str, tuple[bytes, dict]] = {}
    component, tensors = lora()
    out["valid_lora.safetensors"] = (adapter_file([component], tensors), ok)

    # rsLoRA, with PEFT-style per-target overrides: v_proj has rank 1, the embedding stores its weight [in, out].
    rs = {"name": "default", "kind": "lora", "targets": [EMBED, Q_PROJ, V_PROJ],
          "params": {"rank": 2, "alpha": 4.0, "scaling": "rslora", "fan_in_fan_out": False},
          "target_params": {V_PROJ: {"rank": 1, "alpha": 2.0}, EMBED: {"fan_in_fan_out": True}}, "weight": 1.0}
    out["valid_rslora_target_params.safetensors"] = (adapter_file([rs], {
        f"default.{EMBED}.lora_A": values((2, 16), 40), f"default.{EMBED}.lora_B": values((8, 2), 41),
        f"default.{Q_PROJ}.lora_A": values((2, 8), 42), f"default.{Q_PROJ}.lora_B": values((8, 2), 43),
        f"default.{V_PROJ}.lora_A": values((1, 8), 44), f"default.{V_PROJ}.lora_B": values((4, 1), 45),
    }), ok)

    (bc, bt), (pc, pt) = bitfit(), prefix()
    out["valid_bitfit_bf16.safetensors"] = (adapter_file([bc], bt), ok)
    out["valid_prefix_f16.safetensors"] = (adapter_file([pc], pt), ok)

    head = {"name": "head", "kind": "full", "targets": [HEAD], "params": {}, "weight": 1.0}
    out["valid_full_head.safetensors"] = (adapter_file([head], {
        f"head.{HEAD}.weight": values((2, 8), 50), f"head.{HEAD}.bias": values((2,), 51)}), ok)

    (lc, lt), (pc, pt), (bc, bt) = lora("support", weight=0.7), prefix("prompt"), bitfit("bias", weight=0.3)
    sources = [{"name": name, "sha256": hashlib.sha256(out[name][0]).hexdigest(), "weight": weight}
               for name, weight in (("valid_lora.safetensors", 0.7), ("valid_prefix_f16.safetensors", 1.0),
                                    ("valid_bitfit_bf16.safetensors", 0.3))]
    composition = {"method": "concat", "sources": sources, "rank": None, "tolerance": None,
                   "error": {"frobenius": 0.0, "relative": 0.0}}
    out["valid_composite.safetensors"] = (adapter_file([lc, pc, bc], {**lt, **pt, **bt}, composition=composition), ok)

    future = dict(component, future_component_field={"added_in": "1.1"})
    out["valid_v1_1_unknown_fields.safetensors"] = (adapter_file(
        [future], tensors, version="1.1", extra={"future_field": [1, 2, 3]}), ok)
    newer = dict(component, future_component_field={"added_in": "1.2"})
    out["valid_v1_2_unknown_fields.safetensors"] = (adapter_file(
        [newer], tensors, version="1.2", extra={"future_field": [1, 2, 3]}), ok)

    # --- the kinds of 1.1 ---
    (dc, dt), (ic, it), (ac, at) = dora(), ia3(), bottleneck()
    out["valid_dora.safetensors"] = (adapter_file([dc], dt, version="1.1"), ok)
    out["valid_ia3.safetensors"] = (adapter_file([ic], it, version="1.1"), ok)
    out["valid_adapter.safetensors"] = (adapter_file([ac], at, version="1.1"), ok)
    out["invalid_dora_magnitude_shape.safetensors"] = (adapter_file(
        [dc], {**dt, f"dora.{Q_PROJ}.magnitude": values((4,), 62) + np.float32(1)}, version="1.1"),
        bad("magnitude must be 1-D with one entry per output row"))
    out["invalid_dora_missing_magnitude.safetensors"] = (adapter_file(
        [dc], {k: v for k, v in dt.items() if k != f"dora.{V_PROJ}.magnitude"}, version="1.1"),
        bad("missing magnitude"))
    out["invalid_dora_weighted.safetensors"] = (adapter_file([dict(dc, weight=0.5)], dt, version="1.1"),
                                                bad("1 was expected"))
    out["invalid_ia3_not_1d.safetensors"] = (adapter_file(
        [ic], {**it, f"scales.{V_PROJ}.ia3_l": (values((4,), 67) + np.float32(1)).reshape(4, 1)}, version="1.1"),
        bad("ia3_l must be 1-D"))
    out["invalid_ia3_feedforward_not_boolean.safetensors"] = (adapter_file(
        [dict(ic, target_params={Q_PROJ: {"feedforward": "true"}})], it, version="1.1"),
        bad("is not of type 'boolean'"))
    single = dict(ac, targets=[Q_PROJ], target_params={})
    q_only = {k: v for k, v in at.items() if Q_PROJ in k}
    out["invalid_adapter_bottleneck_mismatch.safetensors"] = (adapter_file(
        [single], {**q_only, f"bottleneck.{Q_PROJ}.up": values((8, 3), 72)}, version="1.1"),
        bad("bottleneck mismatch"))
    out["invalid_adapter_bottleneck_disagrees.safetensors"] = (adapter_file(
        [dict(single, params=dict(single["params"], bottleneck=3))], q_only, version="1.1"),
        bad("manifest says bottleneck 3"))

    # --- invalid: the container ---
    good = out["valid_lora.safetensors"][0]
    out["invalid_truncated.safetensors"] = (good[: len(good) - 20], bad("truncated?"))
    out["invalid_header_past_end.safetensors"] = (struct.pack("<Q", 1_000_000) + good[8:], bad("runs past the end"))
    out["invalid_header_over_cap.safetensors"] = (struct.pack("<Q", 2**40) + good[8:], bad("exceeds the"))
    out["invalid_header_not_json.safetensors"] = (struct.pack("<Q", 16) + b'{"a": [1, 2, 3, ', bad("not valid UTF-8 JSON"))
    out["invalid_overlapping_offsets.safetensors"] = (adapter_file(
        [component], tensors, offsets={f"default.{Q_PROJ}.lora_B": [32, 96]}), bad("overlaps"))
    out["invalid_gapped_offsets.safetensors"] = (adapter_file(
        [component], tensors, gap_before=f"default.{Q_PROJ}.lora_B"), bad("leave a gap"))
    out["invalid_unknown_dtype.safetensors"] = (adapter_file([component], {
        **tensors, f"default.{Q_PROJ}.lora_A": ({"dtype": "F8_E4M3", "shape": [2, 8]}, bytes(16))}),
        bad("unknown dtype 'F8_E4M3'"))
    out["invalid_integer_dtype.safetensors"] = (adapter_file([component], {
        **tensors, f"default.{Q_PROJ}.lora_A": values((2, 8), 1, np.int32)}), bad("must be F16, BF16, F32 or F64"))
    out["invalid_duplicate_header_key.safetensors"] = (
        _duplicate_key(adapter_file([component], tensors)), bad("twice"))
    out["invalid_no_manifest_plain_base.safetensors"] = (container(base_tensors(), None), bad("no adapterkit manifest"))
    out["invalid_version_2_0.safetensors"] = (adapter_file([component], tensors, version="2.0"),
                                              bad("format version 2.0 is not supported"))

    # --- invalid: tensors against the manifest ---
    out["invalid_lora_rank_mismatch.safetensors"] = (adapter_file([component], {
        **tensors, f"default.{Q_PROJ}.lora_B": values((8, 3), 11)}), bad("rank mismatch"))
    out["invalid_rank_param_disagrees.safetensors"] = (adapter_file(
        [dict(component, params=dict(component["params"], rank=4))], tensors), bad("manifest says rank 4"))
    for label, poison in (("nan", np.nan), ("inf", np.inf)):
        broken = values((8, 2), 11)
        broken[3, 1] = poison
        out[f"invalid_{label}_in_tensor.safetensors"] = (adapter_file([component], {
            **tensors, f"default.{Q_PROJ}.lora_B": broken}), bad("contains NaN or Inf"))
    out["invalid_empty_tensor.safetensors"] = (adapter_file([head], {
        f"head.{HEAD}.weight": values((0, 8), 50)}), bad("has no elements"))
    out["invalid_duplicate_component.safetensors"] = (adapter_file([component, component], tensors),
                                                      bad("two components are named 'default'"))
    out["invalid_target_named_twice.safetensors"] = (adapter_file(
        [dict(component, targets=[Q_PROJ, V_PROJ, Q_PROJ])], tensors), bad(f"names target '{Q_PROJ}' twice"))
    out["invalid_undeclared_target.safetensors"] = (adapter_file([dict(component, targets=[Q_PROJ])], tensors),
                                                    bad("is not among component 'default'"))
    out["invalid_prefix_weighted.safetensors"] = (adapter_file([dict(pc, weight=0.5)], pt),
                                                  bad("components/0/weight: 1 was expected"))
    out["invalid_full_tensor_twice.safetensors"] = (adapter_file([head, dict(head, name="head2")], {
        f"head.{HEAD}.weight": values((2, 8), 50), f"head2.{HEAD}.weight": values((2, 8), 52)}),
        bad("both replace 'score.weight'"))
    out["invalid_missing_role.safetensors"] = (adapter_file([component], {
        k: v for k, v in tensors.items() if not k.endswith(f"{V_PROJ}.lora_B")}), bad("missing lora_B"))
    out["invalid_unknown_kind.safetensors"] = (adapter_file([dict(component, kind="vera")], tensors),
                                               bad("unknown adapter kind 'vera'"))
    return out


def _duplicate_key(file: bytes) -> bytes:
    """Repeat the header's first tensor entry under the same name (the library writer cannot produce this)."""
    (length,) = struct.unpack("<Q", file[:8])
    header = file[8 : 8 + length].rstrip(b" ")
    start = header.index(b',"default.') + 1
    end = header.index(b"]}", start) + 2
    text = header[:-1] + b"," + header[start:end] + b"}"
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + file[8 + length :]


def write(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (data, verdict) in vectors().items():
        (folder / name).write_bytes(data)
        expected[name] = verdict
    (folder / "expected.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "vectors")
