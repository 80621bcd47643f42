"""Decode speed of one student in every serving form, side by side.

The same Llama-shaped ternary student (or, with --moe N, a Mixtral-shaped one with N experts,
top-2, without sub-norms) is exported to TQ2_0, TQ1_0, Q2_0 and F16 and decoded
by llama.cpp (llama-cpp-python; on x86 CPUs Q2_0 has only a scalar kernel, it is the type for
GPUs), and decoded by wft's torch backend with packed int8 codes (what `wft serve --backend
torch` runs) and with latent weights (the training forward).
Tokens/s are greedy decode after the same prompt, EOS ignored, best of --rounds.

    python bench/serve.py [--hidden 1024] [--layers 8] [--tokens 64] [--threads 2]
    python bench/serve.py --moe 4 --hidden 512 --layers 4       # a tiny MoE student
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from wftool.commands.export import run_export
from wftool.model.checkpoint import TernaryMetadata, load_model_dir, save_model_dir
from wftool.model.families import FAMILIES
from wftool.model.surgery import convert_to_bitnet
from wftool.model.tokenizer import train_synthetic_tokenizer
from wftool.serve.engine_torch import TorchEngine
from wftool.serve.generation import Sampling

PROMPT = "kiza pa povo vo zafi zi lu domilu sabula zavize nibo zuze"


def build_student(hidden: int, layers: int, vocab: int, directory: Path,
                  experts: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    shape = dict(vocab_size=vocab, hidden_size=hidden,
                 intermediate_size=hidden * 11 // 4 // 256 * 256, num_hidden_layers=layers,
                 num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                 max_position_embeddings=1024, tie_word_embeddings=True)
    torch.manual_seed(0)
    if experts:  # Mixtral-shaped, no sub-norms: what llama.cpp's llama graph holds
        model = MixtralForCausalLM(MixtralConfig(num_local_experts=experts,
                                                 num_experts_per_tok=2, **shape)).eval()
        family, sub_norm = "mixtral", "none"
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape)).eval()
        family, sub_norm = "llama", "paper"
    convert_to_bitnet(model, FAMILIES[family], sub_norm)
    path = directory / "student"
    save_model_dir(model, train_synthetic_tokenizer(vocab), path,
                   TernaryMetadata(family, sub_norm, None))
    return path


def best_rate(decode, rounds: int, tokens: int) -> float:
    decode(4)  # warm-up: caches, threads, first-call allocations
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        decode(tokens)
        best = min(best, time.perf_counter() - start)
    return tokens / best


def llamacpp_decoder(path: Path, prompt_ids: list[int], threads: int):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)

    def decode(n: int) -> None:
        for produced, _ in enumerate(llm.generate(prompt_ids, temp=0.0), start=1):
            if produced >= n:
                break

    return decode, llm


def torch_decoder(engine: TorchEngine, prompt_ids: list[int]):
    def decode(n: int) -> None:
        for produced, _ in enumerate(engine.sample(prompt_ids, Sampling(temperature=0.0)),
                                     start=1):
            if produced >= n:
                break

    return decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024, help="a multiple of 256")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--moe", type=int, default=0, metavar="EXPERTS",
                        help="a Mixtral-shaped student with this many experts (top-2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="wft-bench-serve-"))
    student = build_student(args.hidden, args.layers, args.vocab, workdir, args.moe)
    packed = TorchEngine.load(student)
    prompt_ids = packed.encode(PROMPT, chat=False)
    rows = []
    try:
        import llama_cpp  # noqa: F401

        for export_type in ("f16", "tq2_0", "tq1_0", "q2_0"):
            result = run_export(student, export_type, workdir / f"s-{export_type}.gguf",
                                validate=False, name="bench")
            decode, llm = llamacpp_decoder(result.path, prompt_ids, args.threads)
            rows.append((f"llama.cpp {export_type.upper()}", result.size_mb,
                         best_rate(decode, args.rounds, args.tokens)))
            llm.close()
    except ImportError:
        print("llama-cpp-python is not installed: torch backend only")
    codes_mb = sum(b.numel() * b.element_size() for b in packed.model.buffers()) / 1e6
    floats_mb = sum(p.numel() * p.element_size() for p in packed.model.parameters()) / 1e6
    rows.append(("torch, packed int8 codes", codes_mb + floats_mb,
                 best_rate(torch_decoder(packed, prompt_ids), args.rounds, args.tokens)))
    latent_model, tokenizer, _ = load_model_dir(student)
    latent = TorchEngine(latent_model, tokenizer)
    latent_mb = sum(p.numel() * p.element_size() for p in latent_model.parameters()) / 1e6
    rows.append(("torch, latent fp32 (training forward)", latent_mb,
                 best_rate(torch_decoder(latent, prompt_ids), args.rounds, args.tokens)))
    reference = rows[0][2]
    params = sum(p.numel() for p in latent_model.parameters()) / 1e6
    kind = f"MoE, {args.moe} experts top-2, " if args.moe else ""
    print(f"student: {kind}hidden {args.hidden}, {args.layers} layers, {params:.0f}M parameters; "
          f"{args.tokens} tokens, {args.threads} threads, best of {args.rounds}")
    print(f"{'runtime':40} {'MB':>8} {'tok/s':>8} {'vs first':>9}")
    for name, size, rate in rows:
        print(f"{name:40} {size:8.1f} {rate:8.1f} {rate / reference:8.2f}x")


if __name__ == "__main__":
    main()
