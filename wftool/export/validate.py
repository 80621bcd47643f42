"""Re-read an exported GGUF and check it against the model it came from, exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wftool.export.gguf_layout import read_gguf_layout
from wftool.export.gguf_target import GgufTarget
from wftool.export.gguf_tokenizer import CHKTXT
from wftool.export.gguf_writer import ExportedTensor, expert_codes, llama_rope_permute
from wftool.export.ternary_packing import (
    I2_S_TAIL_BYTES,
    I2_S_TYPE_ID,
    Q2_0_BLOCK_BYTES,
    Q2_0_TYPE_ID,
    QK2_0,
)
from wftool.quant.ternary import ternarize

I2_S_UNPACK_CHUNK = 1 << 20  # values per step of the I2_S read-back (bounds its memory)
F32_TYPE_ID = 0  # GGML_TYPE_F32: norms and `.scale` tensors
# Types gguf-py's GGUFReader refuses (it raises on ids it has no enum member for): their
# files are read back with wft's own parser (gguf_layout.py).
OWN_READER_TYPES = ("i2_s", "q2_0")
_OWN_TYPE_NAMES = {I2_S_TYPE_ID: "I2_S", Q2_0_TYPE_ID: "Q2_0"}


def check_gguf_tensors(path: Path, model, target: GgufTarget,
                       written: list[ExportedTensor]) -> list[str]:
    """Problems found re-reading `path`: wrong architecture, missing or extra tensors, wrong
    shapes or GGML types, ternary tensors whose values (times their `.scale` tensor, if any)
    differ in any element from the model's codes x the delta the file is meant to hold."""
    if target.export_type in OWN_READER_TYPES:
        return _check_with_own_reader(path, model, target, written)
    from gguf import GGUFReader, quants

    reader = GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    problems = _arch_problems(arch, target)
    tensors = {t.name: t for t in reader.tensors}

    def found(name):
        tensor = tensors.get(name)
        return None if tensor is None else (
            tuple(int(n) for n in reversed(tensor.shape.tolist())), int(tensor.tensor_type))

    def scale(name):
        tensor = tensors.get(name)
        return None if tensor is None else (int(tensor.tensor_type), float(tensor.data[0]))

    for item in _well_formed_ternary(written, found, target, problems):
        tensor = tensors[item.name]
        values = quants.dequantize(tensor.data, tensor.tensor_type)
        problems += _value_problems(model, item, values, target, scale)
    problems += _unexpected(tensors, target, written)
    return problems


def _value_problems(model, item: ExportedTensor, values: np.ndarray, target: GgufTarget,
                    scale) -> list[str]:
    """A projection's dequantized `values` (times its `.scale` tensor where the target has
    them) against the model's codes x delta, exactly (routed experts: each expert's codes x
    its own delta); `scale(name)` gives the file's (GGML type id, first value) of a tensor,
    or None."""
    codes, delta = _expected_codes(model, item)
    problems = []
    if target.scale_tensors:
        base = item.name.removesuffix(".weight")
        found = scale(f"{base}.scale")
        wrong = found and _type_problem(f"{base}.scale", found[0], F32_TYPE_ID)
        if found is None:
            problems.append(f"{base}.scale: missing")
        elif wrong:
            problems.append(wrong)
        elif np.float32(found[1]) != np.float32(delta):
            problems.append(f"{base}.scale: {found[1]} != delta {delta}")
    stored = np.array([1.0 if target.scale_tensors else target.stored_delta(d)
                       for d in np.atleast_1d(delta)], dtype=np.float32)
    # One delta per matrix: a projection's [rows, cols], or each expert's of [E, rows, cols].
    expected = (codes.reshape(stored.size, -1).astype(np.float32) * stored[:, None])
    if not np.array_equal(values.reshape(expected.shape), expected):
        problems.append(f"{item.name}: dequantized values differ from the model's "
                        "ternary codes x delta")
    return problems


def expected_ggml_type(item: ExportedTensor, target: GgufTarget) -> int:
    """The GGML type id a tensor of `target` must have: F32 norms, F16 (BF16 for a bf16
    export) embeddings, projections of the export type."""
    from gguf import GGMLQuantizationType as T

    if item.kind == "norm":
        return int(T.F32)
    if item.kind == "float":
        return int(T.BF16 if target.export_type == "bf16" else T.F16)
    return {"tq1_0": int(T.TQ1_0), "tq2_0": int(T.TQ2_0), "q2_0": Q2_0_TYPE_ID,
            "f16": int(T.F16), "bf16": int(T.BF16), "i2_s": I2_S_TYPE_ID}[target.export_type]


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

    if type_id in _OWN_TYPE_NAMES:
        return f"{_OWN_TYPE_NAMES[type_id]} ({type_id})"
    try:
        return f"{GGMLQuantizationType(type_id).name} ({type_id})"
    except ValueError:
        return str(type_id)


def _expected_codes(model, item: ExportedTensor) -> tuple[np.ndarray, float | np.ndarray]:
    """The int8 codes (in the file's row order) and the float32 delta of a projection; of
    routed experts, codes [experts, rows, cols] and one delta per expert."""
    module = model.get_submodule(item.module)
    if item.expert_matrix:
        return expert_codes(module, item.expert_matrix)
    codes, delta = ternarize(module.weight)
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


def dequantize_q2_0(data: np.ndarray) -> np.ndarray:
    """llama.cpp's Q2_0 bytes -> float32 values, read from the layout's description rather
    than by undoing wft's packer: each 18-byte block is an fp16 d and 16 bytes; value j of
    the block is bits 2 * (j % 4) of byte j / 4, and equals (code - 1) * d. Code 3 (+2 d)
    comes back as written, so a stray one fails any comparison with ternary values."""
    blocks = np.asarray(data, dtype=np.uint8).reshape(-1, Q2_0_BLOCK_BYTES)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)
    codes = (blocks[:, 2:, None] >> shifts) & 3  # [block, byte, value in byte]
    return ((codes.reshape(-1, QK2_0).astype(np.float32) - 1) * d).reshape(-1)


def _check_with_own_reader(path: Path, model, target: GgufTarget,
                           written: list[ExportedTensor]) -> list[str]:
    """The read-back of I2_S and Q2_0 files, on wft's own GGUF parser (see OWN_READER_TYPES)."""
    layout = read_gguf_layout(path)
    problems = _arch_problems(layout.metadata.get("general.architecture"), target)
    data = np.memmap(path, dtype=np.uint8, mode="r")

    def found(name):
        entry = layout.tensor(name)
        return None if entry is None else (entry.shape, entry.type_id)

    def scale(name):  # a `.scale` tensor: F32 {1}, so its value is its first 4 bytes
        entry = layout.tensor(name)
        if entry is None:
            return None
        raw = np.asarray(data[entry.offset:entry.offset + 4])
        return entry.type_id, float(raw.view("<f4")[0]) if raw.size == 4 else float("nan")

    kind = target.export_type
    for item in _well_formed_ternary(written, found, target, problems):
        entry = layout.tensor(item.name)
        n = int(np.prod(item.shape))
        size = _nbytes(kind, n)
        if layout.data_end(entry) - entry.offset < size:
            problems.append(f"{item.name}: {layout.data_end(entry) - entry.offset} data "
                            f"bytes, {kind.upper()} needs {size}")
            continue
        stored = np.asarray(data[entry.offset:entry.offset + size])
        if kind == "i2_s":
            problems += _i2_s_problems(model, item, stored, n)
        else:
            problems += _value_problems(model, item, dequantize_q2_0(stored), target, scale)
    problems += _unexpected([t.name for t in layout.tensors], target, written)
    return problems


def _nbytes(export_type: str, n: int) -> int:
    """ggml_nbytes of n values: I2_S as BitNet.cpp counts it (codes plus a 32-byte tail),
    Q2_0 18 bytes per block of 64."""
    if export_type == "i2_s":
        return n // 4 + I2_S_TAIL_BYTES
    return n // QK2_0 * Q2_0_BLOCK_BYTES


def _i2_s_problems(model, item: ExportedTensor, stored: np.ndarray, n: int) -> list[str]:
    """An I2_S tensor's codes and tail delta against the model's, exactly."""
    values, stored_delta = unpack_i2_s(stored, n)
    codes, delta = _expected_codes(model, item)
    problems = []
    if not np.array_equal(values, codes.reshape(-1)):
        problems.append(f"{item.name}: I2_S codes differ from the model's")
    if np.float32(stored_delta) != np.float32(delta):
        problems.append(f"{item.name}: tail delta {stored_delta} != delta {delta}")
    if stored[n // 4 + 4:].any():
        problems.append(f"{item.name}: bytes 4-31 of the I2_S tail are not zero")
    return problems


# Fixed prompts for the logits comparison: plain text and a chat-formatted turn.
VALIDATION_PROMPTS = (
    "The quick brown fox jumps over the lazy dog. It was a bright cold day in April,",
    "<|im_start|>user\nWhat is a ternary weight?<|im_end|>\n<|im_start|>assistant\n",
)
# F16 matches to rounding; TQ types and Q2_0 differ by llama.cpp's 8-bit activations (Q8_K,
# Q8_0; README, export).
LOGIT_LIMITS = {"f16": (2e-3, 0.98), "bf16": (1e-2, 0.98), "tq1_0": (5e-2, 0.98),
                "tq2_0": (5e-2, 0.98), "q2_0": (5e-2, 0.98)}


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
            # (Q8_K), Q2_0 ones per 32 (Q8_0), not per token: the common reference is
            # ternary weights, float inputs.
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
