"""Re-read an exported GGUF and check it against the model it came from, exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wftool.export.gguf_bitnet import ExportedTensor
from wftool.quant.bitlinear import BitLinear
from wftool.quant.ternary import ternarize


def check_gguf_tensors(path: Path, model, family, written: list[ExportedTensor]) -> list[str]:
    """Problems found re-reading `path`: missing or extra tensors, wrong shapes, ternary
    tensors whose dequantized codes x scale differ from delta x codes in any value."""
    from gguf import GGUFReader, quants

    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    problems = []
    modules = _bitlinear_by_gguf_name(model, family)
    for item in written:
        tensor = tensors.get(item.name)
        if tensor is None:
            problems.append(f"{item.name}: missing")
            continue
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        if shape != item.shape:
            problems.append(f"{item.name}: shape {shape}, expected {item.shape}")
            continue
        if item.kind != "ternary":
            continue
        base = item.name.removesuffix(".weight")
        scale = tensors.get(f"{base}.scale")
        if scale is None:
            problems.append(f"{base}.scale: missing")
            continue
        codes, delta = ternarize(modules[item.name].weight)
        values = quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        if not np.array_equal(values, codes.numpy().astype(np.float32)):
            problems.append(f"{item.name}: dequantized codes differ from the model's")
        if np.float32(scale.data[0]) != np.float32(delta.item()):
            problems.append(f"{base}.scale: {scale.data[0]} != delta {delta.item()}")
    expected = {i.name for i in written} | {
        i.name.removesuffix(".weight") + ".scale" for i in written if i.kind == "ternary"}
    for extra in sorted(set(tensors) - expected):
        problems.append(f"{extra}: unexpected tensor")
    return problems


def _bitlinear_by_gguf_name(model, family) -> dict[str, BitLinear]:
    found = {}
    for index, layer in enumerate(model.get_submodule(family.layers)):
        for module_path, short in family.bitnet_layer_tensors:
            module = layer.get_submodule(module_path)
            if isinstance(module, BitLinear):
                found[f"blk.{index}.{short}.weight"] = module
    return found
