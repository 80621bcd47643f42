"""Rules the clouds do not check until a machine is asked for (minutes and sometimes money
later), checked on the LaunchPlan before anything is sent. Pure: no network, no SkyPilot."""

from __future__ import annotations

import difflib
import re

from wftool.errors import WftError
from wftool.launch.plan import LaunchPlan

# SkyPilot 0.14's cloud registry (sky.utils.registry.CLOUD_REGISTRY), copied: SkyPilot lives
# in its own environment, not importable here; a test (in that environment) keeps them equal.
SKYPILOT_CLOUDS = (
    "aws", "azure", "cudo", "do", "fluidstack", "gcp", "hyperbolic", "ibm", "kubernetes",
    "lambda", "mithril", "nebius", "oci", "paperspace", "primeintellect", "runpod", "scp",
    "seeweb", "shadeform", "slurm", "ssh", "vast", "verda", "vsphere", "yotta",
)
_ALIASES = {"k8s": "kubernetes"}
# network_tier best: Nebius InfiniBand exists only on 8-GPU nodes of these types.
NEBIUS_INFINIBAND_GPUS = ("H100", "H200", "B200", "B300")
NEBIUS_INFINIBAND_COUNT = 8
# Clouds where SkyPilot can give `network_tier: best` at all.
_BEST_NETWORK_CLOUDS = ("aws", "gcp", "kubernetes", "nebius")
_BUCKET = re.compile(r"^(s3|gs|r2|cos|oci|https|nebius|cw|minio|vastdata)://[^/\s]+(/\S*)?$")


def check_plan(plan: LaunchPlan) -> list[str]:
    """Raise WftError for a plan no cloud can run; return the checks that passed, one line
    each (what `--dry-run` prints)."""
    passed = []
    cloud = _check_cloud(plan)
    if plan.backend == "skypilot":
        passed.append(f"cloud: {cloud}" if cloud else "cloud: any enabled (SkyPilot chooses)")
    _check_stage_shape(plan)
    _check_batch_split(plan)
    passed.append(f"machines: {plan.nodes} x {plan.gpu_type}:{plan.gpus_per_node} "
                  f"({plan.world_size} process{'es' if plan.world_size > 1 else ''})")
    if cloud == "runpod":
        _check_runpod(plan)
        passed.append("runpod: one node, no bucket mount, no network tier")
    if plan.network_tier == "best":
        _check_best_network(plan, cloud)
        passed.append(f"network_tier best: {plan.gpu_type}:{plan.gpus_per_node} on "
                      f"{cloud or 'any cloud'}")
    if plan.bucket:
        _check_bucket(plan.bucket)
        _check_one_node_per_bucket(plan)
        passed.append(f"checkpoints: {plan.bucket} mounted at {plan.output_dir}")
    for name in plan.secrets if plan.backend == "skypilot" else ():  # Modal: Secret names
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise WftError(f"launch.secrets: {name!r} is not an environment variable name",
                           "list names such as HF_TOKEN, never values")
    return passed


def _check_cloud(plan: LaunchPlan) -> str | None:
    if not plan.infra:
        return None
    cloud = plan.cloud
    if cloud == "*":  # SkyPilot's wildcard: any cloud, in a given region
        return None
    cloud = _ALIASES.get(cloud, cloud)
    if cloud not in SKYPILOT_CLOUDS:
        close = difflib.get_close_matches(cloud, SKYPILOT_CLOUDS, n=1)
        hint = (f"did you mean '{close[0]}'? " if close else "") + \
            f"clouds: {', '.join(SKYPILOT_CLOUDS)}"
        raise WftError(f"--cloud {plan.infra!r}: unknown cloud '{cloud}'", hint)
    if plan.backend == "modal":
        raise WftError(f"--cloud {plan.infra} is a SkyPilot cloud; Modal picks its own machines",
                       "drop --cloud, or use --backend skypilot")
    return cloud


def _check_stage_shape(plan: LaunchPlan) -> None:
    if plan.stage == "pipeline" and plan.world_size > 1:
        raise WftError(
            f"--stage pipeline runs in one process; {plan.nodes} node(s) x "
            f"{plan.gpus_per_node} GPU(s) would leave all but one GPU idle",
            "use --gpus TYPE:1 --nodes 1 for the pipeline, or launch the stages one by one "
            "(--stage layerwise, then pretrain, then distill) on several GPUs")


def _check_batch_split(plan: LaunchPlan) -> None:
    """What the stage would refuse once the machines are up: a global batch or a data split
    the processes cannot share evenly."""
    if plan.stage == "pipeline":
        return
    world, key = plan.world_size, f"{plan.stage}.training"
    rows = getattr(plan.recipe, plan.stage).training.global_batch_size
    if rows and rows % world:
        raise WftError(f"{key}.global_batch_size={rows} cannot be split evenly over {world} "
                       "processes", f"use a multiple of {world}")
    shards = plan.recipe.distributed.data_shards
    if shards and shards % world:
        raise WftError(f"distributed.data_shards={shards} cannot be shared evenly by {world} "
                       "processes", f"set it to a multiple of {world}, or leave it unset")


def _check_runpod(plan: LaunchPlan) -> None:
    if plan.nodes > 1:
        raise WftError(f"RunPod has no multi-node clusters (--nodes {plan.nodes})",
                       "use --nodes 1 on RunPod, or a cloud with multi-node (nebius, aws, gcp)")
    if plan.bucket:
        raise WftError("RunPod cannot mount a bucket (launch.bucket / --bucket)",
                       "drop the bucket and set the recipe's sync_to (e.g. "
                       "sync_to=s3://bucket/wft) to copy each stage's final/ out")
    if plan.network_tier == "best":
        raise WftError("RunPod has no network tiers (launch.network_tier best)",
                       "remove launch.network_tier")


def _check_best_network(plan: LaunchPlan, cloud: str | None) -> None:
    if cloud is None:
        return  # SkyPilot only offers clouds that can give it
    if cloud not in _BEST_NETWORK_CLOUDS:
        raise WftError(f"launch.network_tier best is not available on {cloud}",
                       f"clouds with it: {', '.join(_BEST_NETWORK_CLOUDS)}; or remove "
                       "launch.network_tier")
    if cloud == "nebius" and (plan.gpu_type.upper() not in NEBIUS_INFINIBAND_GPUS
                              or plan.gpus_per_node != NEBIUS_INFINIBAND_COUNT):
        raise WftError(
            f"Nebius InfiniBand (network_tier best) needs 8-GPU "
            f"{'/'.join(NEBIUS_INFINIBAND_GPUS)} nodes, not {plan.accelerators}",
            "use --gpus H100:8 (or H200:8, B200:8, B300:8), or remove launch.network_tier")


def _check_one_node_per_bucket(plan: LaunchPlan) -> None:
    """Each rank writes its own checkpoint shard and rank 0 marks the step complete, so the
    checkpoint directory must be one directory for all machines; a bucket mounted with a
    local cache on each node is not (another node's shards appear only once uploaded)."""
    if plan.nodes > 1:
        raise WftError(
            f"--bucket with --nodes {plan.nodes}: a bucket mounted on each node is not one "
            "directory for all of them (a node sees another's checkpoint shards only after "
            "they are uploaded)",
            "for several nodes set output_dir to a file system every node mounts at the same "
            "path (the cloud's shared file system) and drop the bucket; or use one node with "
            "more GPUs (--gpus H100:8 --nodes 1)")


def _check_bucket(bucket: str) -> None:
    if not _BUCKET.match(bucket):
        raise WftError(f"--bucket {bucket!r} is not a bucket URL",
                       "e.g. s3://my-bucket/wft, gs://my-bucket, r2://my-bucket, "
                       "nebius://my-bucket")


def plan_warnings(plan: LaunchPlan) -> list[str]:
    """What will run but may not do what the user expects."""
    warnings = list(plan.warnings)
    if plan.stage != "pipeline" and getattr(plan.recipe, plan.stage).resume.mode == "never":
        warnings.append(f"{plan.stage}.resume.mode=never: every restart after a preemption or "
                        "failure starts the stage over")
    if plan.nodes > 1 and not plan.bucket:
        warnings.append(f"{plan.nodes} nodes: output_dir ({plan.output_dir}) must be a file "
                        "system every node mounts at the same path; the run checks this "
                        "when it starts")
    if plan.backend == "skypilot" and not plan.bucket and plan.nodes == 1:
        where = ("copied to sync_to" if plan.recipe.sync_to else
                 "lost: SkyPilot tears the machines down when the job ends")
        fix = "" if plan.cloud == "runpod" else " (set --bucket s3://... or launch.bucket)"
        warnings.append(f"no bucket: checkpoints stay on the node's disk, so a preempted or "
                        f"restarted job starts over, and outputs are {where}{fix}")
    return warnings
