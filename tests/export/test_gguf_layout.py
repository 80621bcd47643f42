"""wft's own GGUF header parser agrees with gguf-py on a file gguf-py can read."""

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from wftool.export.gguf_layout import read_gguf_layout


def test_layout_matches_gguf_py(tmp_path):
    path = tmp_path / "x.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(3)
    writer.add_rope_freq_base(5e5)
    writer.add_token_list(["a", "b", "c"])
    writer.add_tensor("a.weight", np.ones((3, 5), dtype=np.float32))
    writer.add_tensor("b.weight", np.zeros((7,), dtype=np.float16))
    writer.add_tensor("c.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    layout = read_gguf_layout(path)
    reader = GGUFReader(str(path))
    assert layout.metadata["general.architecture"] == "llama"
    assert layout.metadata["llama.block_count"] == 3
    assert layout.metadata["llama.rope.freq_base"] == pytest.approx(5e5)
    assert layout.metadata["tokenizer.ggml.tokens"] == ["a", "b", "c"]
    assert [t.name for t in layout.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(layout.tensors, reader.tensors):
        assert ours.shape == tuple(int(n) for n in reversed(theirs.shape.tolist()))
        assert ours.type_id == int(theirs.tensor_type)
        assert ours.offset == int(theirs.data_offset)


def test_not_a_gguf_file_is_refused(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGML" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_layout(path)
