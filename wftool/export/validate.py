"""Re-read an exported GGUF and check it against the model it came from, exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wftool.export.gguf_layout import read_gguf_layout
from wftool.export.gguf_target import GgufTarget
from wftool.export.gguf_tokenizer import CHKTXT
from wftool.export.gguf_writer import ExportedTensor, llama_rope_permute
from wftool.export.ternary_packing import I2_S_TYPE_ID
from wftool.quant.ternary import ternarize

I2_S_UNPACK_CHUNK = 1 << 20  # values per step of the I2_S read-back (bounds its memory)
F32_TYPE_ID = 0  # GGML_TYPE_F32: norms and `.scale` tensors


def check_gguf_tensors(path: Path, model, target: GgufTarget,
                       written: list[ExportedTensor]) -> list[str]:
    """Problems found re-reading `path`: wrong architecture, missing or extra tensors, wrong
    shapes or GGML types, ternary tensors whose values (times their `.scale` tensor, if any)
    differ in any element from the model's codes x the delta the file is meant to hold."""
    if target.export_type == "i2_s":
        return _check_i2_s(path, model, target, written)
    from gguf import GGUFReader, quants

    reader = GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    problems = _arch_problems(arch, target)
    tensors = {t.name: t for t in reader.tensors}

    def found(name):
        tensor = tensors.get(name)
        return None if tensor is None else (
            tuple(int(n) for n in reversed(tensor.shape.tolist())), int(tensor.tensor_type))

    for item in _well_formed_ternary(written, found, target, problems):
        tensor = tensors[item.name]
        codes, delta = _expected_codes(model, item)
        values = quants.dequantize(tensor.data, tensor.tensor_type).reshape(item.shape)
        if target.scale_tensors:
            base = item.name.removesuffix(".weight")
            scale = tensors.get(f"{base}.scale")
            wrong_scale = scale and _type_problem(scale.name, int(scale.tensor_type),
                                                  F32_TYPE_ID)
            if scale is None:
                problems.append(f"{base}.scale: missing")
            elif wrong_scale:
                problems.append(wrong_scale)
            elif np.float32(scale.data[0]) != np.float32(delta):
                problems.append(f"{base}.scale: {scale.data[0]} != delta {delta}")
        expected = codes.astype(np.float32) * np.float32(
            1.0 if target.scale_tensors else target.stored_delta(delta))
        if not np.array_equal(values, expected):
            problems.append(f"{item.name}: dequantized values differ from the model's "
                            "ternary codes x delta")
    problems += _unexpected(tensors, target, written)
    return problems


def expected_ggml_type(item: ExportedTensor, target: GgufTarget) -> int:
    """The GGML type id a tensor of `target` must have: F32 norms, F16 (BF16 for a bf16
    export) embeddings, projections of the export type."""
    from gguf import GGMLQuantizationType as T

    if item.kind == "norm":
        return int(T.F32)
    if item.kind == "float":
        return int(T.BF16 if target.export_type == "bf16" else T.F16)
    return {"tq1_0": int(T.TQ1_0), "tq2_0": int(T.TQ2_0), "f16": int(T.F16),
            "bf16": int(T.BF16), "i2_s": I2_S_TYPE_ID}[target.export_type]


def _arch_problems(arch, target: GgufTarget) -> list[str]:
    return [] if arch == target.arch else [f"architecture {arch!r}, expected {target.arch!r}"]


def _well_formed_ternary(written: list[ExportedTensor], found, target: GgufTarget,
                         problems: list[str]):
    """The ternary tensors present with the right shape and type, for the value checks;
    `found(name)` gives the file's (shape, GGML type id) or None. Other findings go to
    `problems`."""
    for item in written:
        wrong = _structure_problem(item, found(item.name), target)
        if wrong:
            problems.append(wrong)
        elif item.kind == "ternary":
            yield item


def _structure_problem(item: ExportedTensor, found: tuple[tuple, int] | None,
                       target: GgufTarget) -> str | None:
    """Missing, misshapen or mistyped; `found` is the file's (shape, GGML type id)."""
    if found is None:
        return f"{item.name}: missing"
    shape, type_id = found
    if shape != item.shape:
        return f"{item.name}: shape {shape}, expected {item.shape}"
    return _type_problem(item.name, type_id, expected_ggml_type(item, target))


def _type_problem(name: str, found: int, expected: int) -> str | None:
    if found == expected:
        return None
    return f"{name}: GGML type {_type_name(found)}, expected {_type_name(expected)}"


def _type_name(type_id: int) -> str:
    from gguf import GGMLQuantizationType

    if type_id == I2_S_TYPE_ID:
        return f"I2_S ({type_id})"
    try:
        return f"{GGMLQuantizationType(type_id).name} ({type_id})"
    except ValueError:
        return str(type_id)


def _expected_codes(model, item: ExportedTensor) -> tuple[np.ndarray, float]:
    """The int8 codes (in the file's row order) and the float32 delta of a projection."""
    codes, delta = ternarize(model.get_submodule(item.module).weight)
    codes = codes.cpu().numpy()
    if item.permute_heads:
        codes = llama_rope_permute(codes, item.permute_heads)
    return codes, float(delta.item())


def _unexpected(names, target: GgufTarget, written: list[ExportedTensor]) -> list[str]:
    expected = {i.name for i in written}
    if target.scale_tensors:
        expected |= {i.name.removesuffix(".weight") + ".scale"
                     for i in written if i.kind == "ternary"}
    return [f"{extra}: unexpected tensor" for extra in sorted(set(names) - expected)]


def unpack_i2_s(data: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """BitNet.cpp's x86 I2_S bytes -> (n int8 codes, fp32 delta), read from the layout's
    description rather than by undoing wft's packer: value i sits in 32-byte group i // 128,
    at byte i % 32 of it, in bits 7-6, 5-4, 3-2 or 1-0 for (i % 128) // 32 = 0, 1, 2, 3, as
    code + 1; the fp32 delta is the first 4 bytes after the n / 4 code bytes. An invalid
    2-bit value (3) comes back as code 2, which no comparison with real codes accepts."""
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    codes = np.empty(n, dtype=np.int8)
    for start in range(0, n, I2_S_UNPACK_CHUNK):
        index = np.arange(start, min(n, start + I2_S_UNPACK_CHUNK), dtype=np.int64)
        byte = data[(index // 128) * 32 + index % 32]
        shift = (6 - 2 * ((index % 128) // 32)).astype(np.uint8)
        codes[start:start + index.size] = ((byte >> shift) & 3).astype(np.int8) - 1
    delta = float(data[n // 4:n // 4 + 4].view("<f4")[0])
    return codes, delta


def _check_i2_s(path: Path, model, target: GgufTarget,
                written: list[ExportedTensor]) -> list[str]:
    """The I2_S read-back, on wft's own GGUF parser (gguf-py does not know type 36)."""
    layout = read_gguf_layout(path)
    problems = _arch_problems(layout.metadata.get("general.architecture"), target)
    data = np.memmap(path, dtype=np.uint8, mode="r")

    def found(name):
        entry = layout.tensor(name)
        return None if entry is None else (entry.shape, entry.type_id)

    for item in _well_formed_ternary(written, found, target, problems):
        entry = layout.tensor(item.name)
        n = int(np.prod(item.shape))
        size = n // 4 + 32  # BitNet.cpp's ggml_nbytes for I2_S: codes plus a 32-byte tail
        if layout.data_end(entry) - entry.offset < size:
            problems.append(f"{item.name}: {layout.data_end(entry) - entry.offset} data "
                            f"bytes, I2_S needs {size}")
            continue
        stored = np.asarray(data[entry.offset:entry.offset + size])
        values, stored_delta = unpack_i2_s(stored, n)
        codes, delta = _expected_codes(model, item)
        if not np.array_equal(values, codes.reshape(-1)):
            problems.append(f"{item.name}: I2_S codes differ from the model's")
        if np.float32(stored_delta) != np.float32(delta):
            problems.append(f"{item.name}: tail delta {stored_delta} != delta {delta}")
        if stored[n // 4 + 4:].any():
            problems.append(f"{item.name}: bytes 4-31 of the I2_S tail are not zero")
    problems += _unexpected([t.name for t in layout.tensors], target, written)
    return problems


# Fixed prompts for the logits comparison: plain text and a chat-formatted turn.
VALIDATION_PROMPTS = (
    "The quick brown fox jumps over the lazy dog. It was a bright cold day in April,",
    "<|im_start|>user\nWhat is a ternary weight?<|im_end|>\n<|im_start|>assistant\n",
)
# F16 matches to rounding; TQ types differ by llama.cpp's Q8_K activations (README, export).
LOGIT_LIMITS = {"f16": (2e-3, 0.98), "bf16": (1e-2, 0.98), "tq1_0": (5e-2, 0.98),
                "tq2_0": (5e-2, 0.98)}


def compare_with_llamacpp(path: Path, model, tokenizer, export_type: str, threads: int = 1,
                          prompts=VALIDATION_PROMPTS, decode_tokens: int = 32) -> dict:
    """Tokenization and all-position logits of llama.cpp vs the PyTorch forward, plus
    llama.cpp's decode speed. Returns the numbers and a list of `problems`. A file llama.cpp
    cannot load raises WftError (wftool.runtime.llamacpp.open_llama)."""
    import torch

    from wftool.model.surgery import float_activations
    from wftool.runtime.llamacpp import open_llama

    llm = open_llama(path, 256, threads, logits_all=True)
    try:
        problems = _tokenization_problems(llm, tokenizer, [CHKTXT, *prompts])
        squared_error, squared_ref, agree, positions = 0.0, 0.0, 0, 0
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if list(llm.tokenize(prompt.encode(), add_bos=False, special=True)) != list(ids):
                continue  # reported above
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
        top1 = agree / positions if positions else float("nan")  # nothing decisive to judge
        limit, min_top1 = LOGIT_LIMITS[export_type]
        if squared_ref and not rel_rms < limit:
            problems.append(f"logits rel RMS {rel_rms:.2e} >= {limit:.0e}")
        if positions and top1 < min_top1:
            problems.append(f"top-1 agreement {top1:.3f} < {min_top1}")
        llm.reset()
        ids = tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
        decode = decode_rate(llm.generate(ids, temp=0.0), decode_tokens)
    finally:
        llm.close()
    return {"rel_rms": rel_rms, "top1": top1, "decode_tok_s": decode, "problems": problems}


def _tokenization_problems(llm, tokenizer, texts) -> list[str]:
    """Texts llama.cpp tokenizes otherwise than the Hugging Face tokenizer, each as the
    tokenizer would for a user: special tokens added (BOS/EOS as the GGUF says) and
    parsed. CHKTXT, llama.cpp's own pre-tokenizer test text, checks tokenizer.ggml.pre."""
    problems = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        if list(llm.tokenize(text.encode(), add_bos=True, special=True)) != list(ids):
            what = "its pre-tokenizer test text" if text == CHKTXT else f"{text[:30]!r}..."
            problems.append(f"llama.cpp tokenizes {what} differently from the tokenizer")
    return problems


def decode_rate(tokens, limit: int, clock=None) -> float:
    """Tokens per second of a token generator, up to `limit` tokens, timed from its first
    token: that one comes after the prompt is processed, which is not decoding."""
    import time

    clock = clock or time.perf_counter
    start, produced = None, 0
    for _ in tokens:
        produced += 1
        if start is None:
            start = clock()
        if produced >= limit:
            break
    if produced < 2:
        return float("nan")
    return (produced - 1) / (clock() - start)
