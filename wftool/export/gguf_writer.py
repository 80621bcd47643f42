"""A wft student as a GGUF file for llama.cpp's `bitnet` or `llama` architecture.

Projections are written from `ternarize(W)` (never the latent weights) as TQ1_0, TQ2_0,
Q2_0, I2_S or F16/BF16 codes. Where the per-tensor delta goes depends on the target (see
GgufTarget.delta_storage): an F32 `blk.N.<proj>.scale` tensor for `bitnet` (block d = 1),
the fp16 block scale or the float values for `llama`, the fp32 tail for I2_S. For `llama`
the Q and K rows are permuted as llama.cpp's convert_hf_to_gguf.py does, because its RoPE
rotates adjacent pairs where Hugging Face rotates halves. Routed experts (Mixtral, `llama`
only) go to 3-D tensors [experts, rows, cols], each expert's blocks scaled by that expert
matrix's own delta; the router stays F32. Embeddings and norms stay in floating point;
gguf_tokenizer.py writes the tokenizer and chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wftool.export.gguf_target import GgufTarget
from wftool.export.gguf_tokenizer import add_tokenizer
from wftool.export.ternary_packing import (
    I2_S_FILE_TYPE,
    I2_S_TYPE_ID,
    Q2_0_FILE_TYPE,
    Q2_0_TYPE_ID,
    pack_i2_s,
    pack_q2_0,
    pack_tq1_0,
    pack_tq2_0,
)
from wftool.model.families import Family, head_dim
from wftool.quant.bit_experts import BitExperts
from wftool.quant.bitlinear import BitLinear
from wftool.quant.ternary import ternarize

I2_S_DESCRIPTION = ("wft ternary student. Its I2_S tensors (GGML type 36) load only in "
                    "BitNet.cpp (github.com/microsoft/BitNet, x86 layout), not in upstream "
                    "llama.cpp, which uses type 36 for something else.")


@dataclass
class ExportedTensor:
    name: str
    shape: tuple[int, ...]
    kind: str  # "ternary" (a projection), "float" (embeddings), "norm" (F32: norms, routers)
    module: str | None = None  # the BitLinear or BitExperts it came from (ternary tensors)
    permute_heads: int | None = None  # heads of the llama RoPE row permutation, if applied
    expert_matrix: str | None = None  # "gate", "up" or "down" of a BitExperts module


EXPERT_MATRICES = ("gate", "up", "down")  # the order of BitExperts.expert_weights


def expert_codes(experts: BitExperts, matrix: str) -> tuple[np.ndarray, np.ndarray]:
    """One expert matrix of every expert: int8 codes [experts, rows, cols] and the float32
    delta of each expert, ternarized one expert at a time as BitExperts' forward does."""
    index = EXPERT_MATRICES.index(matrix)
    pairs = [ternarize(experts.expert_weights(e)[index]) for e in range(experts.num_experts)]
    codes = np.stack([c.cpu().numpy() for c, _ in pairs])
    return codes, np.array([d.item() for _, d in pairs], dtype=np.float32)


def llama_rope_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a Q or K projection from Hugging Face's rotate-half RoPE to
    llama.cpp's adjacent-pair RoPE: within each head, row i of the first half and row i of
    the second half become rows 2i and 2i+1 (convert_hf_to_gguf.py, LlamaModel.permute)."""
    head_rows = rows.shape[0] // n_head
    return (rows.reshape(n_head, 2, head_rows // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def _float_array(tensor: torch.Tensor, export_type: str) -> tuple[np.ndarray, object]:
    from gguf import GGMLQuantizationType

    data = tensor.detach().float().cpu()
    if export_type == "bf16":
        raw = data.bfloat16().view(torch.int16).numpy().view(np.uint8)
        return raw.reshape(*data.shape[:-1], -1), GGMLQuantizationType.BF16
    return data.numpy().astype(np.float16), None


def _add_ternary(writer, gguf_name: str, codes: np.ndarray, delta,
                 target: GgufTarget) -> None:
    """One projection's codes [rows, cols] as `target.export_type`, with the delta where the
    target keeps it inside the tensor; or routed experts' codes [experts, rows, cols] with
    one delta per expert (`delta` a sequence), each expert's blocks scaled by its own."""
    from gguf import GGMLQuantizationType

    kind = target.export_type
    if kind == "i2_s":  # one delta per tensor: the plan refuses routed experts
        _add_unknown_type(writer, gguf_name, pack_i2_s(codes, delta), codes.shape,
                          I2_S_TYPE_ID)
        return
    matrices = codes.reshape(-1, *codes.shape[-2:])
    deltas = [1.0 if target.scale_tensors else float(d) for d in np.atleast_1d(delta)]
    if kind in ("q2_0", "tq1_0", "tq2_0"):
        pack = {"q2_0": pack_q2_0, "tq1_0": pack_tq1_0, "tq2_0": pack_tq2_0}[kind]
        packed = np.stack([pack(m, d) for m, d in zip(matrices, deltas)])
        packed = packed.reshape(*codes.shape[:-1], -1)
        if kind == "q2_0":
            _add_unknown_type(writer, gguf_name, packed, codes.shape, Q2_0_TYPE_ID)
        else:
            writer.add_tensor(gguf_name, packed, raw_dtype=GGMLQuantizationType[kind.upper()])
        return
    scales = torch.tensor([target.stored_delta(d) for d in deltas], dtype=torch.float32)
    values = torch.from_numpy(matrices).float() * scales[:, None, None]
    array, raw_dtype = _float_array(values.reshape(codes.shape), kind)
    writer.add_tensor(gguf_name, array, raw_dtype=raw_dtype)


def _add_unknown_type(writer, gguf_name: str, packed: np.ndarray, shape: tuple[int, ...],
                      type_id: int) -> None:
    """Packed bytes of a GGML type gguf-py 0.19 has no enum member for (36 I2_S, 42 Q2_0).
    Given uint8 data, its writer turns the byte shape into an element shape through its own
    block-size table (a KeyError for these ids); given any other dtype plus `raw_shape`, it
    writes that shape, the id and the bytes as they are. So an int8 view of the same bytes
    goes in, with the element shape: public arguments only, no patched gguf-py tables."""
    writer.add_tensor(gguf_name, packed.view(np.int8), raw_shape=shape, raw_dtype=type_id)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _file_type(export_type: str) -> int:
    import gguf

    return {"tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0, "tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0,
            "f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q2_0": Q2_0_FILE_TYPE, "i2_s": I2_S_FILE_TYPE}[export_type]


def _add_experts(writer, family: Family, target: GgufTarget, layer,
                 index: int) -> list[ExportedTensor]:
    """A sparse layer's routed experts as the family's 3-D expert tensors."""
    experts = layer.get_submodule(family.experts)
    written = []
    for matrix, short in family.gguf_expert_tensors(target.arch):
        codes, deltas = expert_codes(experts, matrix)
        gguf_name = f"blk.{index}.{short}.weight"
        _add_ternary(writer, gguf_name, codes, deltas, target)
        written.append(ExportedTensor(gguf_name, codes.shape, "ternary",
                                      f"{family.layers}.{index}.{family.experts}",
                                      expert_matrix=matrix))
    return written


def _add_expert_counts(writer, model, config) -> None:
    """llama.cpp reads MoE layers from `<arch>.expert_count` and `.expert_used_count`."""
    experts = next((m for m in model.modules() if isinstance(m, BitExperts)), None)
    if experts is not None:
        writer.add_expert_count(experts.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)


def _add_hparams(writer, config, head_dim: int) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)


def write_gguf(model, tokenizer, family: Family, target: GgufTarget, path: Path,
               name: str = "wft-student") -> list[ExportedTensor]:
    """Write `model` to `path` (removed again if writing fails); returns what was written.
    Call plan_gguf_export first: this function assumes the model fits `target`. The caller
    picks the path: `wft export-gguf` writes a temporary file and moves it into place only
    once it has been checked."""
    import gguf

    config = model.config
    path = Path(path)
    # llama.cpp's `llama` RoPE pairs adjacent rows: Q and K are permuted per head.
    permuted = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    float_type = "bf16" if target.export_type == "bf16" else "f16"
    writer = gguf.GGUFWriter(path, target.arch)
    written: list[ExportedTensor] = []
    try:
        writer.add_name(name)
        writer.add_file_type(_file_type(target.export_type))
        if target.export_type == "i2_s":
            writer.add_description(I2_S_DESCRIPTION)
        _add_hparams(writer, config, head_dim(config))
        _add_expert_counts(writer, model, config)
        add_tokenizer(writer, tokenizer, config.vocab_size)

        def add_float(gguf_name: str, tensor: torch.Tensor, norm: bool = False):
            if norm:  # norms and routers stay F32, as llama.cpp's converter writes them
                writer.add_tensor(gguf_name, tensor.detach().float().cpu().numpy())
            else:
                array, raw_dtype = _float_array(tensor, float_type)
                writer.add_tensor(gguf_name, array, raw_dtype=raw_dtype)
            written.append(ExportedTensor(gguf_name, tuple(tensor.shape),
                                          "norm" if norm else "float"))

        add_float("token_embd.weight", model.get_submodule(family.embeddings).weight)
        if not getattr(config, "tie_word_embeddings", False):  # `llama` only: see the plan
            add_float("output.weight", model.get_output_embeddings().weight)
        for index, layer in enumerate(model.get_submodule(family.layers)):
            sparse = family.is_sparse_layer(layer)
            for module_path, short in family.gguf_layer_tensors(target.arch, sparse):
                module = layer.get_submodule(module_path)
                gguf_name = f"blk.{index}.{short}"
                if not isinstance(module, BitLinear):
                    add_float(f"{gguf_name}.weight", module.weight, norm=True)
                    continue
                codes, delta = ternarize(module.weight)
                codes = codes.cpu().numpy()
                heads = permuted.get(short) if target.arch == "llama" else None
                if heads:
                    codes = llama_rope_permute(codes, heads)
                _add_ternary(writer, f"{gguf_name}.weight", codes, delta.item(), target)
                if target.scale_tensors:
                    writer.add_tensor(f"{gguf_name}.scale",
                                      np.array([delta.item()], dtype=np.float32))
                written.append(ExportedTensor(
                    f"{gguf_name}.weight", tuple(module.weight.shape), "ternary",
                    f"{family.layers}.{index}.{module_path}", heads))
            if sparse:
                written += _add_experts(writer, family, target, layer, index)
        add_float("output_norm.weight", model.get_submodule(family.final_norm).weight,
                  norm=True)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:
        writer.close()
        if path.is_file():
            path.unlink()
        raise
    return written
