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
        pools[f"align:{source.name}"] = source.align_actors or source.max_actors or source.actors
    return pools


Demand = dict[str, float]  # Ray resource name → amount (CPU, GPU, custom, accelerator_type:X)

ACCELERATOR = "accelerator_type:"  # Ray's per-node resource for accelerator_type placement
ACCELERATOR_SHARE = 0.001  # what Ray asks of it per actor or task


def placement(num_cpus: float, num_gpus: float, resources: dict, accelerator: str | None):
    """What one actor or worker takes of a node, as Ray resources."""
    demand = {"CPU": num_cpus, "GPU": num_gpus, **resources}
    if accelerator is not None:
        demand[f"{ACCELERATOR}{accelerator}"] = ACCELERATOR_SHARE
    return demand


def model_demands(config: FusionConfig) -> list[tuple[str, int, Demand]]:
    """Each model's pool: who it is, its (smallest) number of actors, one actor's demand."""
    models = [("target", config.target)] if config.target.as_teacher else []
    models += [(f"source {s.name!r}", s) for s in config.sources]
    return [
        (
            who,
            model.actors,
            placement(model.num_cpus, model.num_gpus, model.resources, model.accelerator_type),
        )
        for who, model in models
    ]


def training_demand(config: FusionConfig) -> tuple[str, int, Demand] | None:
    """The training workers: who they are, how many, one worker's demand."""
    train = config.train
    if train is None:
        return None
    one = placement(
        train.cpus_per_worker, float(train.use_gpu), train.resources, train.accelerator_type
    )
    return "training workers", train.num_workers, one


def total(demands: list[tuple[str, int, Demand]]) -> Demand:
    """The sum of ``demands`` by resource (an accelerator type counts once: it is a label)."""
    summed: Demand = {}
    for _who, count, one in demands:
        for resource, amount in one.items():
            summed[resource] = summed.get(resource, 0.0) + amount * count
    return {r: a for r, a in summed.items() if a > 0 or r in ("CPU", "GPU")}


def cluster_demand(config: FusionConfig, *, shards: int | None = None) -> Demand:
    """Ray resources the prepare pipeline reserves: its model actors, CPU pools, a
    block-cutting task and a fusion task (Ray Data runs writing in the same task)."""
    stages = 2 * SMALL_CPU + SMALL_CPU * sum(stage_actors(config, shards).values())
    return total([("CPU stages", 1, {"CPU": stages}), *model_demands(config)])


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
    need: Demand,
    available: dict[str, float],
    maximum: dict[str, float] | None,
    hint: str,
    askers: dict[str, list[str]] | None = None,
) -> str | None:
    """Refuse a demand the cluster can never meet; return a note when it can only after the
    autoscaler adds nodes (Ray waits for them), else None. ``askers`` names, per custom
    resource, who asks for it (the refusal names them)."""
    short = [r for r, amount in need.items() if amount > available.get(r, 0.0) + 1e-9]
    short.sort(key=lambda r: (r not in ("GPU", "CPU"), r != "GPU", r))
    if not short:
        return None
    never = short if maximum is None else [r for r in short if need[r] > maximum.get(r, 0) + 1e-9]
    if not never:
        wants = ", ".join(
            f"{_amount(r, need[r])} (it has {available.get(r, 0):g} now)" for r in short
        )
        return f"waiting for the autoscaler: {what} need {wants}"
    resource = never[0]
    if resource not in ("CPU", "GPU"):
        raise ClusterError(_missing_resource(resource, need, available, maximum, askers or {}))
    if maximum is not None:
        raise ClusterError(
            f"{what} need {need[resource]:g} {resource}s but the cluster can grow to at most "
            f"{maximum.get(resource, 0):g} (its node groups' max counts); {hint}"
        )
    raise ClusterError(
        f"{what} need {need[resource]:g} {resource}s but the cluster has "
        f"{available.get(resource, 0):g} and does not autoscale; {hint}"
    )


def _amount(resource: str, amount: float) -> str:
    if resource.startswith(ACCELERATOR):
        return f"a node with accelerator {resource.removeprefix(ACCELERATOR)}"
    if resource in ("CPU", "GPU"):
        return f"{amount:g} {resource}s"
    return f"{amount:g} of resource {resource!r}"


def _missing_resource(resource, need, available, maximum, askers, nowhere=None) -> str:
    """The refusal of a custom resource or accelerator type the cluster lacks."""
    asking = askers.get(resource, [])
    who = " and ".join(asking) or "the config"
    ask, need_ = ("ask", "need") if len(asking) > 1 else ("asks", "needs")
    have = available.get(resource, 0.0)
    if resource.startswith(ACCELERATOR):
        kind = resource.removeprefix(ACCELERATOR)
        where = "no node of the cluster has it"
        if maximum is not None:
            where += " and none of its autoscaler's node types does"
        return (
            f"{who} {ask} for accelerator_type {kind}, but {where}; drop accelerator_type or "
            "add nodes with that accelerator"
        )
    if have > 0 or (maximum is not None and maximum.get(resource, 0) > 0):
        most = have if maximum is None else maximum.get(resource, 0)
        grows = "has" if maximum is None else "can grow to at most"
        return (
            f"{who} {need_} {need[resource]:g} of resource {resource!r} in all but the cluster "
            f"{grows} {most:g}; lower their actors or `resources`, or add nodes with it"
        )
    where = nowhere or "no node of the cluster declares it"
    if maximum is not None:
        where += " and none of its autoscaler's node types does"
    return (
        f"{who} {ask} for resource {resource!r}, but {where}; start nodes with "
        f"`ray start --resources '{{\"{resource}\": N}}'` (a node type's `resources` in a "
        "cluster file) or change their `resources`"
    )


def check_cluster(
    config: FusionConfig,
    available: dict[str, float],
    *,
    also: Demand | None = None,
    shards: int | None = None,
    maximum: dict[str, float] | None = None,
) -> str | None:
    """Refuse a config whose actors (plus ``also``: the training workers' resources) can
    never all be placed (Ray would wait forever instead of failing); a note when they fit
    only once an autoscaling cluster (``maximum``: what it can grow to) has grown."""
    need = cluster_demand(config, shards=shards)
    for resource, amount in (also or {}).items():
        need[resource] = need.get(resource, 0.0) + amount
    demands = model_demands(config)
    if also and (workers := training_demand(config)):
        demands.append(workers)
    return fits(
        "the config's model actors, CPU stages and training workers",
        need,
        available,
        maximum,
        "lower num_gpus / num_cpus (fractions are allowed), actors per source, data.readers, "
        "align_actors or train.cpus_per_worker, or add nodes",
        askers=_askers(demands),
    )


def _askers(demands: list[tuple[str, int, Demand]]) -> dict[str, list[str]]:
    """Per custom resource (or accelerator type), who asks for it."""
    askers: dict[str, list[str]] = {}
    for who, _count, one in demands:
        for resource in one:
            if resource not in ("CPU", "GPU"):
                askers.setdefault(resource, []).append(who)
    return askers


def check_placement(config: FusionConfig) -> str | None:
    """`fusion validate`'s look at the cluster: with ``ray.address`` (or RAY_ADDRESS) set, the
    whole demand against the cluster it names; without, a local Ray would be started, which
    declares no custom resources, so a model or worker asking for one is refused."""
    import os

    if config.ray.address or os.environ.get("RAY_ADDRESS"):
        ray = ensure_ray(config)
        workers = training_demand(config)
        return check_cluster(
            config,
            ray.cluster_resources(),
            also=total([workers]) if workers else None,
            maximum=cluster_maximum(config),
        )
    demands = model_demands(config)
    if workers := training_demand(config):
        demands.append(workers)
    custom = {
        resource: amount
        for resource, amount in total(demands).items()
        if resource not in ("CPU", "GPU") and not resource.startswith(ACCELERATOR)
    }
    if custom:
        resource = sorted(custom)[0]
        local = (
            "no ray.address is set and the local Ray a run starts declares no custom "
            "resources; set ray.address to the cluster whose nodes declare it"
        )
        raise ClusterError(
            _missing_resource(resource, custom, {}, None, _askers(demands), nowhere=local)
        )
    return None


def training_check(
    config: FusionConfig, available: dict[str, float], maximum: dict[str, float] | None = None
) -> str | None:
    """Refuse training workers that can never all be placed (Ray would wait for them
    forever); a note when they fit only once an autoscaling cluster (``maximum``) has grown."""
    workers = training_demand(config)
    return fits(
        f"{config.train.num_workers} training workers",
        total([workers]),
        available,
        maximum,
        "lower train.cpus_per_worker (fractions are allowed) or train.num_workers",
        askers=_askers([workers]),
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
