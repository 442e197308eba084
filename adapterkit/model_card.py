"""The model card (README.md) that ``adapterkit push`` writes next to an adapter on the Hugging Face Hub.

YAML front matter the Hub indexes (``library_name: adapterkit``, ``base_model`` when the manifest names a Hub model,
``tags``: adapterkit and each kind), then what ``adapterkit inspect`` shows, the file's sha256, and how to use it.
"""

from __future__ import annotations

import re

from huggingface_hub import ModelCard, ModelCardData

from adapterkit.adapter import Adapter
from adapterkit.summary import describe, render

#: what the Hub accepts as a model id in ``base_model`` (a local path such as ``base/`` or ``/models/x`` is not one)
HUB_MODEL_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def hub_base_model(adapter: Adapter) -> str | None:
    """The base model's id when it names a Hub model; the Hub rejects cards whose base_model is anything else."""
    base_id = adapter.manifest.base_model.id
    return base_id if base_id and HUB_MODEL_ID.fullmatch(base_id) else None


def model_card(adapter: Adapter, *, repo_id: str, filename: str, sha256: str, size: int) -> str:
    """The README.md text for ``adapter`` pushed to ``repo_id`` as ``filename`` (``size`` bytes, ``sha256``)."""
    kinds = adapter.manifest.kinds
    base = hub_base_model(adapter)
    data = ModelCardData(library_name="adapterkit", base_model=base, tags=["adapterkit", *kinds])
    base_text = (f"[`{base}`](https://huggingface.co/{base})" if base
                 else f"`{adapter.manifest.base_model.id or '(unnamed)'}`")
    body = f"""
# {repo_id.split('/')[-1]}

An [adapterkit](https://pypi.org/project/adapterkit/) adapter ({', '.join(kinds)}) for the base model {base_text}.

## What it holds

```text
{render(describe(adapter))}
```

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
