"""What wft knows about each supported model family, one table entry per family.

Module names, where SubLN goes, the GGUF tensor names, and what keeps a family from
llama.cpp's `bitnet` (paper SubLN) or `llama` (no sub-norms) graph all live here, so the rest
of the code never branches on a family name. Checks that hold for every family (tied
embeddings, SiLU, row lengths) are in wftool/export/gguf_target.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from wftool.errors import WftError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class SubNormSlot:
    """An RMSNorm at ``parent.name`` that normalises the input of ``parent.projection``."""

    parent: str
    name: str
    projection: str


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # Hugging Face `config.model_type` values
    examples: str
    layers: str = "model.layers"
    attention: str = "self_attn"
    mlp: str = "mlp"
    attention_projections: tuple[str, ...] = ATTENTION_PROJECTIONS
    mlp_projections: tuple[str, ...] = MLP_PROJECTIONS
    # The paper's placement: before the attention output and the FFN down projection,
    # at the names llama.cpp's `bitnet` architecture reads.
    sub_norms: tuple[SubNormSlot, ...] = (
        SubNormSlot("self_attn", "attn_sub_norm", "o_proj"),
        SubNormSlot("mlp", "ffn_sub_norm", "down_proj"),
    )
    # Why no upstream llama.cpp architecture with sub-norms can hold this family, if so.
    bitnet_gguf_blocker: str | None = None
    # Why llama.cpp's `llama` architecture (students without sub-norms) cannot, if so.
    llama_gguf_blocker: str | None = None
    # What to do instead when one of the two above applies.
    gguf_fix: str = "serve the student with `wft serve --backend torch`"
    # Per-layer module path -> llama.cpp `bitnet` tensor name (blk.N.<name>).
    bitnet_layer_tensors: tuple[tuple[str, str], ...] = (
        ("input_layernorm", "attn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.attn_sub_norm", "attn_sub_norm"),
        ("self_attn.o_proj", "attn_output"),
        ("post_attention_layernorm", "ffn_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.ffn_sub_norm", "ffn_sub_norm"),
        ("mlp.down_proj", "ffn_down"),
    )
    embeddings: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    # Mixture-of-experts families, per layer: the module holding the routed experts (3-D
    # gate_up_proj / down_proj; it becomes BitExperts), the modules that pick experts or
    # weigh the shared expert (they stay full precision: few parameters, and ternary routing
    # would change which experts run), and always-on shared expert MLPs (converted like a
    # dense MLP, SubLN included). A layer without `experts` is a dense one (Qwen MoE
    # models may mix both).
    experts: str | None = None
    routers: tuple[str, ...] = ()
    shared_experts: tuple[str, ...] = ()
    # How llama.cpp's `llama` graph holds the routed experts (Mixtral's layout): the router
    # as (module path, tensor name), and per expert matrix of BitExperts.expert_weights
    # ("gate", "up", "down") the 3-D tensor holding it for every expert. Empty where the
    # family's MoE layers fit no graph wft writes (see llama_gguf_blocker).
    llama_router_tensor: tuple[str, str] | None = None
    llama_expert_tensors: tuple[tuple[str, str], ...] = ()

    def gguf_layer_tensors(self, arch: str, sparse: bool = False) -> tuple[tuple[str, str], ...]:
        """Per-layer (module path, tensor name) of a GGUF architecture: `bitnet` has the
        sub-norms, `llama` is the same list without them. A sparse `llama` layer has the
        router in place of the dense MLP (its experts: gguf_expert_tensors)."""
        if arch == "bitnet":
            return self.bitnet_layer_tensors
        if arch != "llama":
            raise ValueError(f"no GGUF tensor table for architecture {arch!r}")
        sub_norms = {f"{slot.parent}.{slot.name}" for slot in self.sub_norms}
        tensors = tuple(t for t in self.bitnet_layer_tensors if t[0] not in sub_norms)
        if not sparse:
            return tensors
        dense_mlp = tuple(t for t in tensors if t[0].startswith(f"{self.mlp}."))
        return tuple(t for t in tensors if t not in dense_mlp) + (
            (self.llama_router_tensor,) if self.llama_router_tensor else ())

    def gguf_expert_tensors(self, arch: str) -> tuple[tuple[str, str], ...]:
        """(expert matrix, tensor name) of the 3-D expert tensors of a GGUF architecture;
        empty where it has none for this family."""
        return self.llama_expert_tensors if arch == "llama" else ()

    def projections(self) -> tuple[tuple[str, str], ...]:
        """(block attribute, projection name) for every projection BitLinear replaces in a
        dense layer."""
        return self.layer_projections(sparse=False)

    def is_sparse_layer(self, layer) -> bool:
        """Whether a decoder layer holds routed experts."""
        if self.experts is None:
            return False
        try:
            layer.get_submodule(self.experts)
        except AttributeError:
            return False
        return True

    def layer_projections(self, sparse: bool) -> tuple[tuple[str, str], ...]:
        """(block path, projection name) BitLinear replaces in a dense or a sparse layer;
        a sparse layer's dense MLPs are its shared experts (routed ones are BitExperts)."""
        mlps = self.shared_experts if sparse else (self.mlp,)
        return tuple((self.attention, p) for p in self.attention_projections) + tuple(
            (mlp, p) for mlp in mlps for p in self.mlp_projections
        )

    def layer_sub_norms(self, sparse: bool) -> tuple[SubNormSlot, ...]:
        """The paper's SubLN slots of a dense or a sparse layer: in a sparse layer the MLP
        slot moves to each shared expert (routed experts carry their own, in BitExperts)."""
        if not sparse:
            return self.sub_norms
        slots = []
        for slot in self.sub_norms:
            if slot.parent != self.mlp:
                slots.append(slot)
                continue
            slots += [SubNormSlot(shared, slot.name, slot.projection)
                      for shared in self.shared_experts]
        return tuple(slots)


# llama.cpp's `bitnet` graph has a dense FFN only.
BITNET_MOE_BLOCKER = ("mixture-of-experts layers: llama.cpp's bitnet graph (the one with "
                      "sub-norms) has no MoE FFN")
# Mixtral's experts as llama.cpp's converter writes them for the `llama` graph.
MIXTRAL_EXPERT_TENSORS = (("gate", "ffn_gate_exps"), ("up", "ffn_up_exps"),
                          ("down", "ffn_down_exps"))

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", ("llama",), "SmolLM2, Llama 3"),
        Family("mistral", ("mistral",), "Mistral 7B"),
        Family(
            "qwen2",
            ("qwen2",),
            "Qwen2, Qwen2.5",
            bitnet_gguf_blocker="Q/K/V projections have biases, which the bitnet graph lacks",
            llama_gguf_blocker=("Q/K/V projections have biases; llama.cpp runs Qwen2 as its "
                                "own `qwen2` architecture, which wft does not write"),
        ),
        Family(
            "qwen3",
            ("qwen3",),
            "Qwen3",
            bitnet_gguf_blocker="QK-norm (q_norm/k_norm) has no slot in the bitnet graph",
            llama_gguf_blocker="QK-norm (q_norm/k_norm) has no slot in the llama graph",
            gguf_fix=("serve Qwen3 students with `wft serve --backend torch` (ternary Qwen3 "
                      "GGUFs run only in Microsoft's patched BitNet fork)"),
        ),
        Family(
            "mixtral",
            ("mixtral",),
            "Mixtral 8x7B",
            bitnet_gguf_blocker=BITNET_MOE_BLOCKER,
            gguf_fix=("convert with convert.sub_norm=none (llama.cpp's `llama` graph runs "
                      "Mixtral's experts) and train again, or serve the student with "
                      "`wft serve --backend torch`"),
            experts="mlp.experts",
            routers=("mlp.gate",),
            llama_router_tensor=("mlp.gate", "ffn_gate_inp"),
            llama_expert_tensors=MIXTRAL_EXPERT_TENSORS,
        ),
        Family(
            "qwen2_moe",
            ("qwen2_moe",),
            "Qwen1.5-MoE, Qwen2-57B-A14B",
            bitnet_gguf_blocker=BITNET_MOE_BLOCKER,
            llama_gguf_blocker=("Q/K/V biases and a gated shared expert: llama.cpp runs "
                                "Qwen2-MoE as its own `qwen2moe` architecture, which wft does "
                                "not write"),
            experts="mlp.experts",
            routers=("mlp.gate", "mlp.shared_expert_gate"),
            shared_experts=("mlp.shared_expert",),
        ),
        Family(
            "qwen3_moe",
            ("qwen3_moe",),
            "Qwen3-30B-A3B",
            bitnet_gguf_blocker=BITNET_MOE_BLOCKER,
            llama_gguf_blocker=("QK-norm (q_norm/k_norm) has no slot in the llama graph: "
                                "llama.cpp runs Qwen3-MoE as its own `qwen3moe` "
                                "architecture, which wft does not write"),
            experts="mlp.experts",
            routers=("mlp.gate",),
        ),
    )
}


def supported_families_text() -> str:
    return ", ".join(f"{f.name} ({f.examples})" for f in FAMILIES.values())


def family_for_model_type(model_type: str) -> Family:
    """The family whose table covers a Hugging Face `model_type`, or a clear error."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise WftError(
        f"model family '{model_type}' is not supported; supported: {supported_families_text()}"
    )


def family_by_name(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise WftError(
            f"unknown family '{name}'; supported: {supported_families_text()}"
        ) from None


def head_dim(config) -> int:
    """Width of one attention head: `config.head_dim` where the family sets it (Qwen3),
    hidden_size / num_attention_heads otherwise."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
