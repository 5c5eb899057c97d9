"""Whether the cluster's live nodes can still hold every model actor of a running pass.

Ray restarts an actor whose node died on any node with room for it, and Ray Data retries
its batch, so a lost node costs nothing while another node has the actor's resources. Where
none has them (a fixed cluster that lost its only node with ``a100_80g``), Ray would wait for
one forever: the watch turns that wait into an error naming the model and the lost node.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator

from fusion.cluster import ACCELERATOR, model_demands
from fusion.config import FusionConfig
from fusion.errors import FusionError

POLL_S = 5.0  # how often the live nodes are looked at while no row arrives


class NodeLostError(FusionError):
    """No live node can hold a model's actors any more, and the cluster does not autoscale."""


def can_hold(node_resources: dict[str, float], demand: dict[str, float]) -> bool:
    """Whether a node with ``node_resources`` (its totals) can run one actor of ``demand``."""
    return all(node_resources.get(name, 0.0) + 1e-9 >= amount for name, amount in demand.items())


class NodeWatch:
    """The models of a pass and the nodes that could hold each when the pass began."""

    def __init__(self, config: FusionConfig, nodes: Callable[[], list[dict]]):
        self.demands = [(who, one) for who, _count, one in model_demands(config)]
        self.nodes = nodes
        alive = self._alive()
        self.hosts = {
            who: {n["NodeID"] for n in alive if can_hold(n["Resources"], one)}
            for who, one in self.demands
        }

    def _alive(self) -> list[dict]:
        return [node for node in self.nodes() if node.get("Alive")]

    def check(self) -> None:
        """Raise where no live node can hold a model's actors any more."""
        alive = self._alive()
        for who, one in self.demands:
            if any(can_hold(node["Resources"], one) for node in alive):
                continue
            lost = sorted(self.hosts[who] - {node["NodeID"] for node in alive})
            wants = ", ".join(_described(name, amount) for name, amount in one.items() if amount)
            where = f"the node its actors ran on ({', '.join(lost)}) is gone and " if lost else ""
            raise NodeLostError(
                f"{who}: {where}no live node of the cluster can hold its actors ({wants}); "
                "the parts committed so far are kept: run `fusion prepare` again once a node "
                "with those resources has joined"
            )


def _described(name: str, amount: float) -> str:
    if name.startswith(ACCELERATOR):
        return f"accelerator {name.removeprefix(ACCELERATOR)}"
    return f"{amount:g} {name}"


def watched(rows: Iterable[dict], check: Callable[[], None], every: float = POLL_S) -> Iterator:
    """``rows`` as they come, with ``check()`` run whenever none has come for ``every``
    seconds (a pass stalled on a lost node yields nothing, so the check cannot wait for a
    row). The rows are read in a thread; an error there is raised here."""
    handoff: queue.Queue = queue.Queue(maxsize=1)
    end = object()

    def read() -> None:
        try:
            for row in rows:
                handoff.put(row)
            handoff.put(end)
        except BaseException as error:  # handed to the caller, which raises it
            handoff.put(error)

    threading.Thread(target=read, daemon=True, name="fusion-rows").start()
    while True:
        try:
            item = handoff.get(timeout=every)
        except queue.Empty:
            check()
            continue
        if item is end:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
