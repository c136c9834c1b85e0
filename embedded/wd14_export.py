"""Writing a torch module as a WD14 tagger folder's files (SmilingWolf's contract, as tagging/wd14.py loads
it): `model.onnx` with their input/output names, and `selected_tags.csv`. Shared by the hand-set tiny tagger
and the demo tagger trained on the demo world."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import onnx
import torch
from torch import nn

INPUT_NAME = "input_1:0"  # the name SmilingWolf's v2 models use
OUTPUT_NAME = "predictions_sigmoid"
OPSET = 18


def tags_csv(rows: list[tuple[str, int, int]]) -> str:
    """selected_tags.csv text (tag_id,name,category,count) for (name, category, count) rows, in model order."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["tag_id", "name", "category", "count"])
    for row, (name, category, count) in enumerate(rows):
        writer.writerow([row, name, category, count])
    return buffer.getvalue()


def export_wd14_onnx(module: nn.Module, target: Path, *, side: int, fixed_batch: bool = False) -> None:
    """Export a module taking (N, side, side, 3) BGR 0-255 and returning sigmoid scores as a WD14 `model.onnx`
    (SmilingWolf's input and output names, one file, a dynamic batch unless `fixed_batch`)."""
    # A dynamic batch is traced from a batch of 2: torch.export specialises dimensions of size 1.
    example = torch.full((1 if fixed_batch else 2, side, side, 3), 255.0)
    dynamic = None if fixed_batch else ({0: torch.export.Dim("batch")},)  # by position: any forward() arg name
    program = torch.onnx.export(
        module,
        (example,),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=OPSET,
        dynamo=True,
        dynamic_shapes=dynamic,
        external_data=False,
        optimize=True,
        verbose=False,
    )
    program.save(str(target), external_data=False)
    _strip_node_metadata(target)


def _strip_node_metadata(target: Path) -> None:
    """Drop the exporter's per-node metadata (Python stack traces with absolute paths, the module's import
    name): without it the file depends only on the module, not on the checkout's path or how it was run."""
    model = onnx.load(str(target))
    graphs = [model.graph, *(function for function in model.functions)]
    for graph in graphs:
        for node in graph.node:
            del node.metadata_props[:]
    onnx.save(model, str(target))
