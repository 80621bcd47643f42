import pytest
import yaml

SMALL_MODEL = {
    "model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 128, "tie_word_embeddings": True,
}


def small_recipe(tmp_path, **sections) -> str:
    """A recipe file for a 2-layer model on synthetic data, writing under tmp_path."""
    training = {"max_steps": 6, "micro_batch_size": 4, "lr": 1e-3, "warmup_steps": 2,
                "save_every": 2, "eval_every": 3, "log_every": 1}
    recipe = {
        "name": "small",
        "output_dir": str(tmp_path / "runs"),
        "model": {"config": SMALL_MODEL, "tokenizer": "synthetic", "dtype": "float32"},
        "data": {"seq_len": 32, "eval_fraction": 0.1, "eval_batches": 2},
        "pretrain": {"training": dict(training)},
        "layerwise": {"training": dict(training)},
        "distill": {
            "training": dict(training),
            "data": {"format": "task", "seq_len": 32, "eval_fraction": 0.1, "eval_batches": 2},
            "attention_weight": 10.0, "attention_layer": -1,
        },
    }
    for key, value in sections.items():
        recipe[key] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.fixture
def recipe_file(tmp_path):
    return small_recipe(tmp_path)


def save_small_model(path, dtype="float32", seed=0):
    """A full-precision model directory (weights + tokenizer) of the small recipe's shape,
    saved in `dtype`, as a hub checkpoint would be; returns its path as a string."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from wftool.model.tokenizer import train_synthetic_tokenizer

    values = dict(SMALL_MODEL)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.save_pretrained(path)
    train_synthetic_tokenizer(values["vocab_size"]).save_pretrained(path)
    return str(path)


def run_worker_pair(worker_name: str, out) -> dict:
    """Run tests/train/<worker_name> as 2 gloo processes under torchrun; the JSON rank 0
    wrote to `out`."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name(worker_name)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", str(worker), str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(Path(out).read_text())
