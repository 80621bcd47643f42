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


# Fixed prompts for the logits comparison: plain text and a chat-formatted turn.
VALIDATION_PROMPTS = (
    "The quick brown fox jumps over the lazy dog. It was a bright cold day in April,",
    "<|im_start|>user\nWhat is a ternary weight?<|im_end|>\n<|im_start|>assistant\n",
)
# From FORMATS.md: F16 matches to rounding; TQ types differ by llama.cpp's Q8_K activations.
LOGIT_LIMITS = {"f16": (2e-3, 0.98), "bf16": (1e-2, 0.98), "tq1_0": (5e-2, 0.98),
                "tq2_0": (5e-2, 0.98)}


def llamacpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def compare_with_llamacpp(path: Path, model, tokenizer, export_type: str, threads: int = 1,
                          prompts=VALIDATION_PROMPTS, decode_tokens: int = 32) -> dict:
    """Tokenization and all-position logits of llama.cpp vs the PyTorch forward, plus
    llama.cpp's decode speed. Returns the numbers and a list of `problems`."""
    import time

    import torch
    from llama_cpp import Llama

    from wftool.model.surgery import float_activations

    llm = Llama(model_path=str(path), n_ctx=256, n_threads=threads, logits_all=True,
                verbose=False)
    try:
        problems, squared_error, squared_ref, agree, positions = [], 0.0, 0.0, 0, 0
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            theirs = llm.tokenize(prompt.encode(), add_bos=False, special=True)
            if list(theirs) != list(ids):
                problems.append(f"llama.cpp tokenizes {prompt[:30]!r}... differently")
                continue
            llm.reset()
            llm.eval(ids)
            got = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
            # llama.cpp keeps F16 activations in float and quantizes TQ ones per 256-block
            # (Q8_K), not per token: the common reference is ternary weights, float inputs.
            with torch.no_grad(), float_activations(model):
                ref = model(torch.tensor([ids]), use_cache=False).logits[0].double().numpy()
            squared_error += float(((got - ref) ** 2).sum())
            squared_ref += float((ref**2).sum())
            # Top-1 is judged where the reference is decisive: its top-2 margin exceeds 4x
            # the position's logit error, so near-ties (an untrained model) do not count.
            top2 = np.sort(ref, axis=-1)[:, -2:]
            noise = np.sqrt(((got - ref) ** 2).mean(-1))
            decisive = (top2[:, 1] - top2[:, 0]) > 4 * noise
            agree += int((got.argmax(-1) == ref.argmax(-1))[decisive].sum())
            positions += int(decisive.sum())
        rel_rms = (squared_error / squared_ref) ** 0.5 if squared_ref else float("nan")
        top1 = agree / positions if positions else 1.0
        limit, min_top1 = LOGIT_LIMITS[export_type]
        if squared_ref and not rel_rms < limit:
            problems.append(f"logits rel RMS {rel_rms:.2e} >= {limit:.0e}")
        if positions and top1 < min_top1:
            problems.append(f"top-1 agreement {top1:.3f} < {min_top1}")
        llm.reset()
        start = time.perf_counter()
        produced = 0
        for _ in llm.generate(tokenizer(prompts[0], add_special_tokens=False)["input_ids"],
                              temp=0.0):
            produced += 1
            if produced >= decode_tokens:
                break
        decode = produced / (time.perf_counter() - start)
    finally:
        llm.close()
    return {"rel_rms": rel_rms, "top1": top1, "decode_tok_s": decode, "problems": problems}
