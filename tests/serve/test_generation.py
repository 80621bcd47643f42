"""Text generation shared by both backends, on a real tiny student (torch engine)."""

import warnings

import pytest
import torch

from tests.serve.conftest import DECISIVE
from wftool.quant.ternary_linear import pack_ternary_layers
from wftool.serve.engine_torch import TorchEngine, sample_token
from wftool.serve.generation import Generation, Sampling, generate


@pytest.fixture(scope="module")
def engine(llama_student, tokenizer):
    import copy

    model = copy.deepcopy(llama_student)
    pack_ternary_layers(model)
    return TorchEngine(model, tokenizer)


def _run(engine, prompt, **kwargs):
    request = Generation(engine.encode(prompt, chat=False), **kwargs)
    pieces = list(generate(engine, request))
    return "".join(p.text for p in pieces), pieces[-1].finish_reason, request


def test_greedy_generation_is_the_argmax_of_a_full_forward(engine):
    prompt_ids = engine.encode("kiza pa povo vo", chat=False)
    expected = []
    with torch.no_grad():
        for _ in range(10):  # greedy by full forwards, up to the first near tie
            logits = engine.model(torch.tensor([prompt_ids + expected])).logits[0, -1]
            top2 = logits.topk(2).values
            if top2[0] - top2[1] < DECISIVE:
                break
            expected.append(int(logits.argmax()))
    assert len(expected) >= 6, "too few decisive greedy steps to compare"
    cached = []
    with warnings.catch_warnings():
        # The KV cache goes through transformers' current keyword, not a deprecated one.
        warnings.filterwarnings("error", message=".*past_key_values.*")
        for token in engine.sample(prompt_ids, Sampling(temperature=0.0)):
            cached.append(token)
            if len(cached) == len(expected):
                break
    assert cached == expected  # the KV-cache path computes what a full forward does


def test_stop_string_cuts_the_text_where_it_starts(engine):
    full, finish, request = _run(engine, "kiza pa", max_tokens=24, sampling=Sampling(0.0))
    assert finish == "length" and request.completion_tokens == 24
    stop = full[len(full) // 2: len(full) // 2 + 3]
    text, finish, _ = _run(engine, "kiza pa", max_tokens=24, sampling=Sampling(0.0),
                           stop=["never there", stop])
    assert finish == "stop"
    assert text == full[: full.find(stop)]


def test_zero_max_tokens_yields_only_the_finish(engine):
    text, finish, request = _run(engine, "kiza", max_tokens=0, sampling=Sampling(0.0))
    assert (text, finish, request.completion_tokens) == ("", "length", 0)


def test_seeded_sampling_repeats_and_tiny_top_p_is_greedy(engine):
    first, *_ = _run(engine, "kiza pa", max_tokens=12, sampling=Sampling(1.0, 1.0, seed=7))
    again, *_ = _run(engine, "kiza pa", max_tokens=12, sampling=Sampling(1.0, 1.0, seed=7))
    greedy, *_ = _run(engine, "kiza pa", max_tokens=12, sampling=Sampling(0.0))
    nucleus, *_ = _run(engine, "kiza pa", max_tokens=12, sampling=Sampling(1.0, 1e-6, seed=3))
    assert first == again
    assert nucleus == greedy


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = torch.Generator().manual_seed(0)
    draws = {sample_token(logits, Sampling(1.0, 0.7), generator) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 <= 0.8: tokens 0 and 1 only


@pytest.mark.parametrize("sampling", [
    Sampling(1e-310), Sampling(5e-324), Sampling(1e-40), Sampling(2.0, 1e-300, seed=1),
    Sampling(1.0, 5e-324), Sampling(1e-300, 1e-300),
])
def test_tiny_temperature_or_top_p_picks_the_top_token(sampling):
    """1 / 1e-310 overflows and 1e-300 rounds to 0 in float32: neither may reach softmax."""
    logits = torch.tensor([0.1, 2.0, 1.9999, -3.0])
    generator = torch.Generator().manual_seed(0)
    assert {sample_token(logits, sampling, generator) for _ in range(50)} == {1}


def test_text_held_back_for_a_stop_string_is_sent_when_the_model_ends(engine):
    ids = []
    for token in engine.sample(engine.encode("kiza pa", chat=False), Sampling(0.0)):
        ids.append(token)
        if len(ids) == 12:
            break
    # The last greedy token not seen before ends the sequence, as EOS would.
    end = max(k for k in range(2, 12) if ids[k] not in ids[:k])
    text = engine.decode(ids[:end])
    ending = TorchEngine(engine.model, engine.tokenizer)
    ending._eos = {ids[end]}
    # A stop string that starts with the text's tail but never completes.
    held, finish, _ = _run(ending, "kiza pa", max_tokens=24, sampling=Sampling(0.0),
                           stop=[text[-2:] + "\x00never"])
    assert finish == "stop" and held == text


@pytest.fixture(scope="module")
def llamacpp(tmp_path_factory, llama_student, tokenizer):
    from tests.conftest import require_llamacpp

    require_llamacpp()
    from wftool.export.gguf_target import GgufTarget
    from wftool.export.gguf_writer import write_gguf
    from wftool.model.families import FAMILIES
    from wftool.serve.engine_llamacpp import LlamaCppEngine

    path = tmp_path_factory.mktemp("gguf") / "s.gguf"
    write_gguf(llama_student, tokenizer, FAMILIES["llama"], GgufTarget("bitnet", "f16"), path)
    engine = LlamaCppEngine(path, threads=1, context_length=128)
    yield engine
    engine.close()


def test_llamacpp_seed_does_not_leak_into_later_requests(llamacpp):
    def draw(seed):
        return _run(llamacpp, "kiza pa", max_tokens=12, sampling=Sampling(1.0, 1.0, seed))[0]

    seeded = draw(7)
    assert draw(7) == seeded
    assert draw(None) != draw(None)  # unseeded requests are random again


def test_llamacpp_tiny_temperature_or_top_p_is_greedy(llamacpp):
    greedy, *_ = _run(llamacpp, "kiza pa", max_tokens=12, sampling=Sampling(0.0))
    for sampling in (Sampling(1e-310), Sampling(1e-40), Sampling(2.0, 1e-300, seed=1),
                     Sampling(1.0, 5e-324, seed=2)):
        assert _run(llamacpp, "kiza pa", max_tokens=12, sampling=sampling)[0] == greedy
