"""adapterkit export --onnx: a base model with adapters to ONNX, merged or with swappable adapters."""

from __future__ import annotations

import click
from onnx.defs import onnx_opset_version

from adapterkit.cli.options import FORCE, OVERWRITE, WEIGHTS, Number, check_weight_count
from adapterkit.errors import RequestError
from adapterkit.sources import local_path


@click.command()
@click.option("--onnx", "base", required=True, type=click.Path(exists=True, file_okay=False),
              help="Base model: a Hugging Face folder (Llama-family or GPT-2 causal LM, BERT-family encoder or "
                   "classifier).")
@click.argument("adapters", nargs=-1)
@click.option("--merged", "mode", flag_value="merged", help="Fold the adapters into the weights: one plain graph.")
@click.option("--unmerged", "mode", flag_value="unmerged",
              help="One graph with optional adapter inputs, plus one .onnx_adapter file per adapter to switch.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output folder.")
@WEIGHTS
@click.option("--opset", type=click.IntRange(min=7, max=onnx_opset_version()), default=None,
              help="ONNX opset [default: the exporter's].")
@click.option("--cache", is_flag=True,
              help="Causal LMs: one generation step with the key/value cache in and out (past_key_values.<i>.key/value "
                   "in, present.<i>.key/value out).")
@click.option("--bank", is_flag=True,
              help="With --unmerged: the graph takes all the adapters at once (an adapter bank) and each row's adapter "
                   "(adapter_index), so one run serves rows with different adapters; adapters can be added at run "
                   "time.")
@click.option("--verify", is_flag=True, help="Compare ONNX Runtime with torch on sample inputs; exit 1 above --atol.")
@click.option("--atol", type=Number(0, low_open=True), default=1e-4, help="Largest absolute difference --verify accepts.")
@FORCE
@OVERWRITE
def export(base, adapters, mode, output, weights, opset, cache, bank, verify, atol, force, overwrite) -> None:
    """Export BASE with ADAPTERS (files or hf:// refs) to ONNX in OUTPUT: model.onnx, adapterkit.json and, with
    --unmerged, adapters/<name>.onnx_adapter for ONNX Runtime's adapter API."""
    if mode is None:
        raise click.UsageError("choose --merged or --unmerged")
    if bank and mode == "merged":
        raise click.UsageError("--bank keeps the adapters as graph inputs: use it with --unmerged")
    check_weight_count(weights, len(adapters))
    if mode == "merged" and not adapters:
        raise RequestError("--merged needs at least one adapter (to export the base alone, use --unmerged)")
    from adapterkit.onnx import require_onnxruntime

    require_onnxruntime()
    from adapterkit.io.adapter_file import load
    from adapterkit.onnx.export import adapter_names, export_onnx

    paths = [local_path(ref) for ref in adapters]
    exported = export_onnx(base, [load(path) for path in paths], output, merged=mode == "merged",
                           names=adapter_names(adapters), weights=weights, opset=opset, force=force,
                           overwrite=overwrite, inputs=paths, cache=cache, bank=bank)
    extras = (", an adapter bank" if bank else "") + (", with a key/value cache" if cache else "")
    click.echo(f"wrote {exported.folder} ({mode}{extras}, {len(adapters)} "
               f"adapter{'' if len(adapters) == 1 else 's'})")
    if verify:
        from adapterkit.onnx.verify import verify as run_checks

        checks = run_checks(exported, atol)
        for check in checks:
            click.echo(f"  {check.case:<32} {check.output}: max |onnx - torch| = {check.max_abs_diff:.2e} "
                       f"{'ok' if check.passed else 'FAILED'}")
        failed = [c for c in checks if not c.passed]
        if failed:
            raise RequestError(f"verification failed: {len(failed)} of {len(checks)} checks above atol {atol:g}")
        click.echo(f"verified: {'1 check' if len(checks) == 1 else f'all {len(checks)} checks'} within atol {atol:g}")
