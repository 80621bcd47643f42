"""Several processes (torchrun, gloo on CPU) train what one process trains: FSDP2 and DDP
against one process reading the same global batch, sharded Muon against Muon, and sharded
checkpoints that resume on 2 processes, on 1, and after a rank is killed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.train.conftest import run_worker_pair, save_small_model, small_recipe
from wftool.model.checkpoint import load_model_dir

pytestmark = pytest.mark.slow
LOSS_TOLERANCE = 2e-3  # summation order differs between 1 and 2 processes


def wft(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "wftool", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(stage_dir: Path, key: str = "loss") -> dict[int, float]:
    lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def assert_close(a: dict, b: dict, tolerance: float = LOSS_TOLERANCE) -> None:
    assert a.keys() == b.keys()
    for step in a:
        assert abs(a[step] - b[step]) < tolerance, (step, a[step], b[step])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    recipe = small_recipe(root, convert={"output": str(root / "student")})
    ok(wft("convert", recipe))
    return root, recipe


def run_pretrain(recipe: str, out: Path, *extra: str) -> Path:
    ok(wft("pretrain", recipe, f"output_dir={out}", *extra))
    return out / "small" / "pretrain"


@pytest.fixture(scope="module")
def pretrain_runs(converted):
    """The same 6 steps of 8 rows each: FSDP2 and DDP on 2 processes (4 rows each), and one
    process reading both data shards (2 micro-batches of 4)."""
    root, recipe = converted
    return {
        "fsdp2": run_pretrain(recipe, root / "fsdp2", "--nproc-per-node", "2"),
        "ddp": run_pretrain(recipe, root / "ddp", "--nproc-per-node", "2",
                            "distributed.strategy=ddp"),
        "one": run_pretrain(recipe, root / "one", "distributed.data_shards=2",
                            "training.grad_accum=2"),
    }


def test_fsdp2_and_ddp_train_what_one_process_trains(pretrain_runs):
    one = pretrain_runs["one"]
    for strategy in ("fsdp2", "ddp"):
        run = pretrain_runs[strategy]
        assert_close(losses(run), losses(one))
        assert_close(losses(run, "eval_loss"), losses(one, "eval_loss"))
    # The consolidated final/ (gathered from FSDP2 shards) is an ordinary model directory.
    sharded, _, meta = load_model_dir(pretrain_runs["fsdp2"] / "final")
    single, _, _ = load_model_dir(one / "final")
    assert meta is not None and meta.stage == "pretrain"
    for (name, a), (_, b) in zip(sharded.state_dict().items(), single.state_dict().items()):
        # Adam turns rounding-level gradient differences on rarely seen embedding rows into
        # steps of up to lr, so single entries may differ by a few lr; the bulk may not.
        difference = (a - b).abs()
        assert difference.mean() < 1e-5 and difference.max() < 6e-3, (name, difference.max())
    # Tied embeddings come back as one tensor: both final/ hold the same weights files.
    from safetensors import safe_open

    def keys(run):
        with safe_open(str(run / "final" / "model.safetensors"), "pt") as f:
            return sorted(f.keys())

    assert keys(pretrain_runs["fsdp2"]) == keys(one)
    shards = sorted(p.name for p in (pretrain_runs["fsdp2"] / "step-6" / "state").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shard


def _stopped_after_step_4(run: Path, copy_to: Path) -> Path:
    """The run as a stop right after step 4's checkpoint leaves it."""
    shutil.copytree(run, copy_to)
    shutil.rmtree(copy_to / "step-6")
    shutil.rmtree(copy_to / "final")
    return copy_to


def test_sharded_checkpoint_resumes_on_two_processes_and_on_one(pretrain_runs, converted):
    root, recipe = converted
    uninterrupted = losses(pretrain_runs["fsdp2"])
    stopped = _stopped_after_step_4(pretrain_runs["fsdp2"], root / "again" / "small" / "pretrain")
    ok(wft("pretrain", recipe, f"output_dir={root / 'again'}", "--nproc-per-node", "2"))
    assert_close(losses(stopped), uninterrupted, 1e-5)  # the same world size: the same sums

    # A damaged shard in the newest checkpoint (hashed by rank 1: the ranks verify a share
    # each) sends both ranks back to the previous one.
    damaged = root / "damaged" / "small" / "pretrain"
    shutil.copytree(pretrain_runs["fsdp2"], damaged)
    shutil.rmtree(damaged / "final")
    shard = damaged / "step-6" / "state" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = ok(wft("pretrain", recipe, f"output_dir={root / 'damaged'}", "--nproc-per-node", "2"))
    assert "__1_0.distcp is damaged" in " ".join(result.stdout.split())
    assert "resumed pretrain" in result.stdout and "(step 4)" in result.stdout
    assert_close(losses(damaged), uninterrupted, 1e-5)

    alone = _stopped_after_step_4(pretrain_runs["fsdp2"], root / "alone" / "small" / "pretrain")
    refused = wft("pretrain", recipe, f"output_dir={root / 'alone'}")  # grad_accum 1
    assert refused.returncode == 2
    assert "grad_accum=2 keeps the run's global batch of 8 rows" in " ".join(refused.stderr.split())
    assert not (alone / "final").exists()
    result = ok(wft("pretrain", recipe, f"output_dir={root / 'alone'}", "training.grad_accum=2"))
    assert "resumed pretrain" in result.stdout
    assert_close(losses(alone), uninterrupted)


def test_distill_with_fsdp2_and_a_sharded_teacher_or_ddp_matches_one_process(converted):
    root, recipe = converted
    teacher = save_small_model(root / "teacher")
    common = (f"teacher.name_or_path={teacher}", "distill.training.max_steps=4")
    ok(wft("distill", recipe, f"output_dir={root / 'distill1'}", *common,
           "distributed.data_shards=2", "training.grad_accum=2"))
    one = root / "distill1" / "small" / "distill"
    for name, setting in (("fsdp2", "distributed.teacher=shard"),
                          ("ddp", "distributed.strategy=ddp")):
        out = root / f"distill-{name}"  # fresh: a run directory with a pretrain/final
        ok(wft("distill", recipe, f"output_dir={out}", *common, setting,  # would start there
               "--nproc-per-node", "2"))
        two = out / "small" / "distill"
        for key in ("loss", "loss_kl", "loss_relation", "eval_loss", "eval_accuracy"):
            assert losses(one, key), key
            assert_close(losses(two, key), losses(one, key))


def test_layerwise_under_ddp_with_an_untied_head_and_fewer_eval_batches_than_ranks(tmp_path):
    """With ce_weight 0 an untied lm_head gets no gradient (DDP must not wait for one), and
    one eval batch for two processes leaves a rank without a batch of its own."""
    untied = small_recipe(tmp_path, convert={"output": str(tmp_path / "student")})
    overrides = ("model.config.tie_word_embeddings=false", "layerwise.training.max_steps=2",
                 "data.eval_batches=1")
    ok(wft("convert", untied, *overrides))
    ok(wft("layerwise", untied, *overrides, "distributed.strategy=ddp", "--nproc-per-node", "2"))
    stage = tmp_path / "runs" / "small" / "layerwise"
    evals = losses(stage, "eval_hidden")
    assert list(evals) == [2] and evals[2] > 0


def test_sharded_muon_is_muon_on_the_whole_matrix(tmp_path):
    errors = run_worker_pair("sharded_muon_worker.py", tmp_path / "muon.json")
    assert errors["moved"] > 1e-3  # the steps changed the weights
    assert errors["update_error"] < 1e-6 and errors["scale_error"] < 1e-6


def _workers(parent: int) -> list[int]:
    """PIDs of the torchrun workers under `parent` (processes with RANK set)."""
    found, queue = [], [parent]
    while queue:
        pid = queue.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        queue += [int(c) for c in children]
        if pid != parent and any(v.startswith(b"RANK=") for v in environ):
            found.append(pid)
    return found


def test_a_killed_rank_resumes_cleanly(converted):
    root, recipe = converted
    out = root / "killed"
    args = [sys.executable, "-m", "wftool", "pretrain", recipe, f"output_dir={out}",
            "--nproc-per-node", "2", "training.max_steps=40", "training.save_every=4",
            "training.eval_every=40", "data.seq_len=64"]
    stage = out / "small" / "pretrain"
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    deadline = time.time() + 240
    while not (stage / "step-8").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victims = [pid for pid in _workers(process.pid)
               if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")]
    assert victims, "no rank 1 worker found while the run was training"
    os.kill(victims[0], signal.SIGKILL)
    assert process.wait(timeout=120) != 0
    assert not (stage / "final").exists()
    steps = losses(stage)
    assert 8 <= max(steps) < 40
    ok(wft(*args[3:]))
    resumed = losses(stage)
    assert sorted(resumed) == list(range(1, 41))  # every step once, none lost or repeated
    assert (stage / "final" / "config.json").exists()
    # The same run uninterrupted reads the same data and reaches the same losses.
    uninterrupted = root / "uninterrupted"
    ok(wft("pretrain", *args[4:5], f"output_dir={uninterrupted}", *args[6:]))
    assert_close(resumed, losses(uninterrupted / "small" / "pretrain"))


def test_a_user_error_on_every_rank_exits_2_as_one_process_would(converted):
    root, recipe = converted
    result = wft("pretrain", recipe, f"output_dir={root / 'odd'}", "distributed.data_shards=3",
                 "--nproc-per-node", "2")
    assert result.returncode == 2
    assert "set distributed.data_shards to a multiple of 2" in " ".join(result.stderr.split())


def test_fsdp2_under_bf16_autocast_keeps_fp32_masters_and_matches_one_process(converted):
    """The GPU path (bf16 compute, fp32 master weights and optimizer state) on 2 CPU
    processes against one process in bf16 reading the same global batch."""
    root, recipe = converted
    common = ("training.precision=bf16", "training.max_steps=2", "training.save_every=2",
              "training.eval_every=2")
    two = run_pretrain(recipe, root / "bf16-two", *common, "--nproc-per-node", "2",
                       "training.optimizer=muon")
    one = run_pretrain(recipe, root / "bf16-one", *common, "distributed.data_shards=2",
                       "training.grad_accum=2", "training.optimizer=muon")
    assert_close(losses(two), losses(one), 0.05)  # bf16 matmuls: a coarser tolerance
    from safetensors import safe_open

    with safe_open(str(two / "final" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(two / "step-2" / "state")).read_metadata()
    saved = {k: v.properties.dtype for k, v in metadata.state_dict_metadata.items()
             if hasattr(v, "properties") and k.startswith("model.")}
    assert saved and set(saved.values()) == {torch.float32}  # masters and state: fp32
