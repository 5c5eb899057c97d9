"""The Ray session a run joins or starts, what the run asks of the cluster, and whether the
cluster can ever give it.

The prepare pipeline's actors (models and the CPU pools beside them) and the training
workers are counted up front: a demand a fixed cluster lacks, or one beyond what an
autoscaling cluster's node groups can ever reach, is refused at once (Ray would wait forever);
one that fits only after the autoscaler adds nodes goes on with a note saying what it waits for.
"""

from __future__ import annotations

from fusion.config import FusionConfig
from fusion.errors import FusionError

SMALL_CPU = 0.1  # reservation of the light CPU stages (chunking, alignment, fusion, writing)


class ClusterError(FusionError):
    """A config that asks the cluster for more than it has (it would hang, not fail)."""


def stage_actors(config: FusionConfig, shards: int | None = None) -> dict[str, int]:
    """Actors of each CPU pool: ``read`` (chunking) and ``align:<source>`` per source (none
    with ``align.method: bytes``, where the source's actors align as they read).

    Defaults follow the model pools: one reader per four model actors (at most one per
    shard), one aligner per source actor; the config's ``readers`` / ``align_actors`` win.
    """
    model_actors = sum(s.actors for s in config.sources)
    if config.target.as_teacher:
        model_actors += config.target.actors
    readers = config.data.readers or max(1, -(-model_actors // 4))
    if shards is not None:
        readers = max(1, min(readers, shards))
    pools = {"read": readers}
    for source in config.sources if config.align.method != "bytes" else []:
        pools[f"align:{source.name}"] = source.align_actors or source.actors
    return pools


def cluster_demand(config: FusionConfig, *, shards: int | None = None) -> tuple[float, float]:
    """CPUs and GPUs the prepare pipeline reserves: its actors, a block-cutting task and a
    fusion task (Ray Data runs writing in the same task)."""
    cpus = 2 * SMALL_CPU + SMALL_CPU * sum(stage_actors(config, shards).values())
    cpus += sum(s.num_cpus * s.actors for s in config.sources)
    gpus = sum(s.num_gpus * s.actors for s in config.sources)
    if config.target.as_teacher:
        cpus += config.target.num_cpus * config.target.actors
        gpus += config.target.num_gpus * config.target.actors
    return cpus, gpus


def cluster_maximum(config: FusionConfig) -> dict[str, float] | None:
    """What an autoscaling cluster can grow to: ``ray.max_resources`` when configured, else
    its node groups' max counts × resources as the autoscaler publishes them (Ray Train reads
    the same); None for a fixed cluster."""
    if config.ray.max_resources is not None:
        return config.ray.max_resources
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:  # an older or newer Ray without it: treat the cluster as fixed
        return None


def fits(
    what: str,
    cpus: float,
    gpus: float,
    available: dict[str, float],
    maximum: dict[str, float] | None,
    hint: str,
) -> str | None:
    """Refuse a demand the cluster can never meet; return a note when it can only after the
    autoscaler adds nodes (Ray waits for them), else None."""
    have = {"CPU": available.get("CPU", 0.0), "GPU": available.get("GPU", 0.0)}
    need = {"CPU": cpus, "GPU": gpus}
    short = [r for r in ("GPU", "CPU") if need[r] > have[r] + 1e-9]
    if not short:
        return None
    if maximum is not None:
        never = [r for r in short if need[r] > maximum.get(r, 0) + 1e-9]
        if not never:
            wants = ", ".join(f"{need[r]:g} {r}s (it has {have[r]:g} now)" for r in short)
            return f"waiting for the autoscaler: {what} need {wants}"
        resource = never[0]
        raise ClusterError(
            f"{what} need {need[resource]:g} {resource}s but the cluster can grow to at most "
            f"{maximum.get(resource, 0):g} (its node groups' max counts); {hint}"
        )
    resource = short[0]
    raise ClusterError(
        f"{what} need {need[resource]:g} {resource}s but the cluster has {have[resource]:g} "
        f"and does not autoscale; {hint}"
    )


def check_cluster(
    config: FusionConfig,
    available: dict[str, float],
    *,
    also: tuple[float, float] = (0.0, 0.0),
    shards: int | None = None,
    maximum: dict[str, float] | None = None,
) -> str | None:
    """Refuse a config whose actors (plus ``also``: CPUs, GPUs of training workers) can
    never all be placed (Ray would wait forever instead of failing); a note when they fit
    only once an autoscaling cluster (``maximum``: what it can grow to) has grown."""
    cpus, gpus = cluster_demand(config, shards=shards)
    return fits(
        "the config's model actors, CPU stages and training workers",
        cpus + also[0],
        gpus + also[1],
        available,
        maximum,
        "lower num_gpus / num_cpus (fractions are allowed), actors per source, data.readers, "
        "align_actors or train.cpus_per_worker, or add nodes",
    )


def unused_gpus(config: FusionConfig, available: dict[str, float]) -> str | None:
    """A note when the cluster has GPUs but the config gives none to any model or worker
    (the defaults run on CPUs: an unedited config would silently ignore the GPUs)."""
    gpus = available.get("GPU", 0.0)
    asked = config.target.num_gpus * config.target.actors
    asked += sum(s.num_gpus * s.actors for s in config.sources)
    if config.train is not None and config.train.use_gpu:
        asked += config.train.num_workers
    if gpus <= 0 or asked > 0:
        return None
    return (
        f"note: the cluster has {gpus:g} GPUs but this config asks for none, so everything "
        "runs on CPUs; set num_gpus on the target and sources (and train.use_gpu: true) to "
        "use them"
    )


OFFLINE = {"HF_HUB_OFFLINE": "1"}  # models are local folders: no worker ever calls the hub


def runtime_env(config: FusionConfig) -> dict:
    """The job's runtime environment: the configured one, with the hub switched off unless
    its env_vars say otherwise."""
    env = dict(config.ray.runtime_env or {})
    env["env_vars"] = OFFLINE | dict(env.get("env_vars") or {})
    return env


def ensure_ray(config: FusionConfig):
    """Join the configured cluster (or RAY_ADDRESS inside a job), or start a local Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address=config.ray.address,
            runtime_env=runtime_env(config),
            include_dashboard=False,
            log_to_driver=False,
        )
    return ray
