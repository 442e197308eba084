"""The model card (README.md) that ``adapterkit push`` writes next to an adapter on the Hugging Face Hub.

YAML front matter the Hub indexes (``library_name: adapterkit``, ``base_model`` when the manifest names a Hub model,
``tags``: adapterkit and each kind), then what ``adapterkit inspect`` shows, the file's sha256, and how to use it.

Every string in the card that comes from the adapter file (base model id and revision, producer, component names,
kinds and targets, composition sources, training record) is shown on one line with nothing invisible
(:func:`adapterkit.text.printable`) and only inside code: a code span or the fenced block, each fenced longer than any run of backticks
it holds. The front matter is written by a YAML dumper (``ModelCardData``) and holds no free text from the file.
"""

from __future__ import annotations

import re

from huggingface_hub import ModelCard, ModelCardData

from adapterkit.adapter import Adapter
from adapterkit.errors import AdapterError
from adapterkit.summary import describe, render
from adapterkit.text import printable

#: what the Hub accepts as a model id in ``base_model`` (a local path such as ``base/`` or ``/models/x`` is not one)
HUB_MODEL_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$", re.ASCII)
#: a repository id the card can show as is (the Hub's own rule, ASCII only)
REPO_ID = re.compile(r"(?:[\w.-]+/)?[\w.-]+", re.ASCII)
#: the file name the card tells people to pull: a plain relative name
CARD_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*")

def _printable_all(value):
    """``value`` (JSON-like) with every string, keys included, passed through :func:`~adapterkit.text.printable`."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(k) if isinstance(k, str) else k: _printable_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_printable_all(v) for v in value]
    return value


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def code_span(text: object) -> str:
    """``text`` as a Markdown code span that nothing in it can close (CommonMark: a longer backtick string)."""
    text = printable(text)
    fence = "`" * (_longest_backtick_run(text) + 1)
    pad = " " if text[:1] in ("`", " ") or text[-1:] in ("`", " ") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def code_block(text: str, info: str = "") -> str:
    """``text`` (lines already made safe) as a fenced code block that no line in it can close."""
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return f"{fence}{info}\n{text}\n{fence}"


def hub_base_model(adapter: Adapter) -> str | None:
    """The base model's id when it names a Hub model; the Hub rejects cards whose base_model is anything else."""
    base_id = adapter.manifest.base_model.id
    return base_id if isinstance(base_id, str) and HUB_MODEL_ID.fullmatch(base_id) else None


def model_card(adapter: Adapter, *, repo_id: str, filename: str, sha256: str, size: int) -> str:
    """The README.md text for ``adapter`` pushed to ``repo_id`` as ``filename`` (``size`` bytes, ``sha256``)."""
    if not REPO_ID.fullmatch(repo_id):
        raise AdapterError("not a Hub repository id of the form NAMESPACE/NAME", printable(repo_id))
    if not CARD_FILE_NAME.fullmatch(filename) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise AdapterError(f"no model card for file {printable(filename)!r} with sha256 {printable(sha256)!r}", repo_id)
    kinds = adapter.manifest.kinds
    base = hub_base_model(adapter)
    data = ModelCardData(library_name="adapterkit", base_model=base, tags=["adapterkit", *kinds])
    base_text = (f"[`{base}`](https://huggingface.co/{base})" if base
                 else code_span(adapter.manifest.base_model.id or "(unnamed)"))
    kinds_text = ", ".join(map(printable, kinds))
    summary = render(_printable_all(describe(adapter)))  # every string from the file on one line, escaped
    body = f"""
# {repo_id.split('/')[-1]}

An [adapterkit](https://pypi.org/project/adapterkit/) adapter ({kinds_text}) for the base model {base_text}.

## What it holds

{code_block(summary, "text")}

`{filename}`: {size:,} bytes, sha256 `{sha256}` (also in `adapterkit.json`; `adapterkit pull` checks it).

## How to use it

```bash
pip install adapterkit
adapterkit pull {repo_id} -o {filename}    # downloads and verifies the sha256 above
adapterkit inspect hf://{repo_id}    # an hf:// reference works wherever a file path does
adapterkit merge BASE_MODEL_DIR/ hf://{repo_id} -o merged/
```

```python
from adapterkit.sources import load_adapter

adapter = load_adapter("hf://{repo_id}")  # hf://{repo_id}@REVISION for a branch, tag or commit
```
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))
