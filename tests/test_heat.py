"""The heat example (topologies/heat.toml, nodes/heat.py): tiles trading numpy
halos give the field a single-array numpy computation gives, bit for bit, at
every placement: 1, 2 and 4 processes, and one process per tile."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REPO
from hiocluster.supervision import supervisor
from hiocluster.topology import load
from nodes.heat import assemble, reference


@pytest.mark.parametrize("processes", [1, 2, 4, 16])
def test_tiles_give_the_single_array_field_exactly(processes: int) -> None:
    topology = load(REPO / "topologies" / "heat.toml").replace(ticks=30)
    result = supervisor.run(topology, processes=processes, app_dir=str(REPO),
                            handle_signals=False)
    field = assemble(result.nodes)
    alpha = topology.nodes[0].params["alpha"]
    expected = reference(64, 64, topology.ticks - 1, alpha)
    assert field.shape == (64, 64) and field.dtype == np.float64
    assert np.array_equal(field, expected)  # not close: equal
    assert result.node_metrics["t05"]["updates"] == topology.ticks - 1
    assert result.metric_kinds == {"mean": "gauge"}
    assert not np.array_equal(field, reference(64, 64, 0, alpha))  # it did diffuse


def test_readme_simulation_example_runs() -> None:
    import os

    readme = (REPO / "README.md").read_text().split("## Writing a simulation", 1)[1]
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    block = block.replace("processes=4)", "processes=2, handle_signals=False)")
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        exec(compile(block, "README", "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert np.array_equal(namespace["field"], reference(64, 64, 49, 0.2))
