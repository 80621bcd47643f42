"""`decode`: the mode chosen by name, with the settings a unified student carries."""

import pytest

from tests.decoding.conftest import MASK, PROMPTS, settings, tiny_unified_llama
from wftool.decoding import (DecodeStats, Decoding, decode, diffusion_generate,
                             speculative_generate)
from wftool.errors import WftError


@pytest.fixture
def unified(model):
    """The model as `wft unified` saves it: its DiffusionSettings in config.json's `wft`."""
    model.config.wft = {"diffusion": settings(block_size=3).to_dict()}
    yield model
    del model.config.wft


def test_each_mode_reads_the_students_settings(unified):
    prompt = PROMPTS[0]
    assert list(decode(unified, prompt, 9, Decoding("diffusion", threshold=0.5))) == \
        list(diffusion_generate(unified, prompt, settings(block_size=3), 9, threshold=0.5))
    stats = DecodeStats()
    assert list(decode(unified, prompt, 9, Decoding("speculative"), stats=stats)) == \
        list(speculative_generate(unified, prompt, settings(), 9, block_size=3))
    assert stats.tokens == 9 and stats.drafted > 0
    assert MASK not in list(decode(unified, prompt, 9))  # ar


def test_diffusion_modes_need_a_unified_student():
    plain = tiny_unified_llama()
    assert len(list(decode(plain, PROMPTS[0], 4))) == 4
    for mode in ("diffusion", "speculative"):
        with pytest.raises(WftError, match="wft unified"):
            decode(plain, PROMPTS[0], 4, Decoding(mode))
    with pytest.raises(ValueError, match="beam"):
        Decoding("beam")
