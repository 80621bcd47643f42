"""Device names from the command line or a recipe: what PyTorch cannot use here is refused
with the flag (or field) and the devices there are, never a traceback at the first copy."""

import pytest
import torch

from wftool.errors import WftError
from wftool.model.loading import available_devices, resolve_device


@pytest.fixture
def no_gpu(monkeypatch):
    """A machine without CUDA or MPS, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def _refused(name, option="--device"):
    with pytest.raises(WftError) as caught:
        resolve_device(name, option)
    return caught.value


def test_cpu_and_auto_resolve_without_a_gpu(no_gpu):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert available_devices() == ["cpu"]


def test_cuda_without_a_gpu_names_the_option_the_build_and_the_fix(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    err = _refused("cuda")
    assert err.message.startswith("--device cuda: no CUDA GPU is visible to PyTorch")
    assert f"torch {torch.__version__} is a CPU build" in err.message
    assert err.message.endswith("available here: cpu")
    assert err.hint == "use --device cpu, or install a CUDA build of torch"
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # a CUDA build that finds no GPU
    err = _refused("cuda:0")
    assert "built for CUDA 12.8, finds no GPU" in err.message
    assert "CUDA_VISIBLE_DEVICES" in err.hint


def test_a_gpu_index_past_the_last_is_refused(one_gpu):
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    err = _refused("cuda:3")
    assert err.message == ("--device cuda:3: PyTorch sees only 1 cuda device; available here: "
                           "cpu, cuda:0")
    assert "index below 1" in err.hint


def test_mps_off_apple_silicon_and_unknown_backends(no_gpu):
    assert "MPS backend is not available" in _refused("mps").message
    assert "not a torch device" in _refused("gpu0").message
    assert "wft does not run models on meta" in _refused("meta").message


def test_a_recipe_field_is_named_instead_of_the_flag(no_gpu):
    err = _refused("cuda", option="serve.device")
    assert err.message.startswith("serve.device cuda: no CUDA GPU")
    assert err.hint.startswith("set serve.device=cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_is_refused_on_this_cpu_machine():
    assert "no CUDA GPU is visible to PyTorch" in _refused("cuda").message


def test_a_config_transformers_cannot_build_is_a_message():
    """Recipes are checked when read; a spec made in code still gets a message at convert."""
    from tests.train.conftest import SMALL_MODEL
    from wftool.model.loading import load_source_model
    from wftool.recipe.schema import ModelSpec

    spec = ModelSpec.model_construct(
        name_or_path=None, config={**SMALL_MODEL, "hidden_act": "nope"}, tokenizer="synthetic",
        revision=None, dtype="float32", seed=0)
    with pytest.raises(WftError, match="model.config: transformers cannot build this model"):
        load_source_model(spec)
