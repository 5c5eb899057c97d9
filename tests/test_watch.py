"""The watch over a running pass: a model no live node can hold any more is an error naming
it and the node it lost; rows flow through untouched, and a stall is when it looks."""

from __future__ import annotations

import time

import pytest

from fusion.config import parse_config
from fusion.teacher.watch import NodeLostError, NodeWatch, can_hold, watched


def _config(tmp_path, **source) -> object:
    return parse_config(
        {
            "target": {"path": str(tmp_path), "as_teacher": False},
            "sources": [{"name": "big", "path": str(tmp_path), "num_cpus": 0.5} | source],
            "data": {"paths": [str(tmp_path / "c.jsonl")]},
            "output": {"dir": str(tmp_path / "out")},
        }
    )


def _node(node_id: str, alive: bool = True, **resources) -> dict:
    return {"NodeID": node_id, "Alive": alive, "Resources": {"CPU": 1.0} | resources}


def test_a_node_holds_an_actor_only_with_every_resource_it_asks_for():
    assert can_hold({"CPU": 1.0, "a100": 1.0}, {"CPU": 0.5, "GPU": 0.0, "a100": 1.0})
    assert not can_hold({"CPU": 1.0}, {"CPU": 0.5, "a100": 0.5})  # the custom one missing
    assert not can_hold({"CPU": 0.4, "a100": 1.0}, {"CPU": 0.5, "a100": 0.5})  # too few CPUs
    assert can_hold({"accelerator_type:A100": 1.0}, {"accelerator_type:A100": 0.001})


def test_losing_the_only_node_with_a_sources_resource_names_the_source_and_the_node(tmp_path):
    cluster = [_node("head"), _node("gpu-node", a100=1.0)]
    watch = NodeWatch(_config(tmp_path, resources={"a100": 1}), lambda: cluster)
    watch.check()  # both alive: nothing to say
    cluster[1] = _node("gpu-node", alive=False, a100=1.0)
    with pytest.raises(
        NodeLostError,
        match=r"^source 'big': the node its actors ran on \(gpu-node\) is gone and no live "
        r"node of the cluster can hold its actors \(0\.5 CPU, 1 a100\)",
    ):
        watch.check()


def test_a_lost_node_is_no_error_while_another_live_node_can_take_its_actors(tmp_path):
    cluster = [_node("a", a100=1.0), _node("b", a100=2.0)]
    watch = NodeWatch(_config(tmp_path, resources={"a100": 1}), lambda: cluster)
    cluster[0] = _node("a", alive=False, a100=1.0)
    watch.check()
    cluster.append(_node("c", alive=False, a100=2.0))
    cluster[1] = _node("b", alive=False, a100=2.0)
    with pytest.raises(NodeLostError, match=r"the node its actors ran on \(a, b\) is gone"):
        watch.check()


def test_a_model_no_node_ever_fitted_is_named_without_a_lost_node(tmp_path):
    cluster = [_node("head"), _node("small", a100=1.0)]  # the a100 node has 1 CPU, not 2
    watch = NodeWatch(_config(tmp_path, resources={"a100": 1}, num_cpus=2), lambda: cluster)
    with pytest.raises(NodeLostError, match=r"^source 'big': no live node .* \(2 CPU, 1 a100\)"):
        watch.check()


def test_rows_pass_through_in_order_and_the_check_runs_only_while_none_comes():
    checks = []
    assert list(watched(iter(range(50)), lambda: checks.append(1), every=60)) == list(range(50))
    assert checks == []  # rows flowing: no look at the nodes

    def stalled():
        yield 1
        time.sleep(0.35)
        yield 2

    assert list(watched(stalled(), lambda: checks.append(1), every=0.1)) == [1, 2]
    assert checks  # a stall longer than `every`: looked at least once


def test_an_error_while_reading_rows_and_one_from_the_check_reach_the_caller():
    def broken():
        yield 1
        raise ValueError("row 2 is broken")

    with pytest.raises(ValueError, match="row 2 is broken"):
        list(watched(broken(), lambda: None, every=0.1))

    def stalled():
        yield 1
        time.sleep(5)

    def lost():
        raise NodeLostError("gone")

    with pytest.raises(NodeLostError, match="gone"):
        list(watched(stalled(), lost, every=0.05))
