"""Node classes defined in __main__ (a script, a notebook cell) travel to the
workers by value (cloudpickle); classes from modules are imported there."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from hiocluster.node import Node
from hiocluster.topology.build import Builder
from hiocluster.worker.nodes import by_value_class

MODEL = '''
import json
from hiocluster import Builder, Node, run


class Counter(Node):
    inboxes = ("in",)
    outboxes = ("out",)

    def setup(self):
        self.total = 0

    def step(self):
        self.outbox["out"].put(self.index + self.clock.tick)
        while self.inbox["in"]:
            self.total += self.inbox["in"].get()

    def state(self):
        return self.total

    def result(self):
        return self.total
'''

RUN = '''
b = Builder("script", ticks=20, seed=1)
b.nodes("c", Counter, count=4)
b.ring("c")
one = run(b.build(), processes=1, handle_signals=False)
two = run(b.build(), processes=2, handle_signals=False)
said = {"digests": [one.digest, two.digest], "results": two.nodes}
'''


def expected() -> dict[str, int]:
    """c_i adds what c_(i-1) sent at ticks 0..18: (i-1) mod 4 + that tick."""
    return {f"c{i}": 19 * ((i - 1) % 4) + sum(range(19)) for i in range(4)}


def test_a_scripts_own_node_class_runs_on_every_placement(tmp_path: Path,
                                                          cli_env: dict[str, str]) -> None:
    script = tmp_path / "model.py"
    script.write_text(MODEL + "\n\nif __name__ == '__main__':\n"
                      + "".join(f"    {line}\n" for line in RUN.strip().splitlines())
                      + "    print(json.dumps(said))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=cli_env, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout.splitlines()[-1])
    assert said["digests"][0] == said["digests"][1]
    assert said["results"] == expected()


def test_a_notebooks_node_class_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the kernel's connection file and IPython's profile in the test's own directory
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    import nbformat  # nbclient, nbformat and ipykernel: test extras
    from nbclient import NotebookClient

    readme = (REPO / "README.md").read_text().split("**Scripts and notebooks.**", 1)[1]
    cell = readme.split("```python\n", 1)[1].split("```", 1)[0]
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(MODEL), nbformat.v4.new_code_cell(RUN),
                      nbformat.v4.new_code_cell("import json; print(json.dumps(said))"),
                      nbformat.v4.new_code_cell(cell),
                      nbformat.v4.new_code_cell("print(json.dumps(result.nodes))")]
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    output = notebook.cells[2].outputs[0]["text"]
    said = json.loads(output)
    assert said["digests"][0] == said["digests"][1]
    assert said["results"] == expected()
    # each run showed a bar in the cell, updated to its end
    bars = [out["data"]["text/plain"] for out in notebook.cells[1].outputs
            if out["output_type"] == "display_data"]
    assert len(bars) == 2 and all(bar.startswith("ticking ") and " 20/20 (100%)" in bar
                                  for bar in bars), bars
    # the README's cell, as it is
    assert json.loads(notebook.cells[4].outputs[0]["text"]) == expected()


def test_a_modules_class_goes_by_name_and_a_mains_by_value() -> None:
    from nodes.ring import RingNode

    b = Builder("x", ticks=2)
    b.nodes("a", RingNode)
    assert b.document["nodes"]["a"]["class"] == "nodes.ring:RingNode" and not b.classes

    def local() -> type:
        class RingNode(Node):  # a class of a function: by value, its name kept apart
            pass
        return RingNode
    inner = local()
    b.nodes("b", inner)
    assert b.document["nodes"]["b"]["class"] == "__main__:RingNode"
    b.nodes("c", local())  # another class of the same name
    assert b.document["nodes"]["c"]["class"] == "__main__:RingNode_2"
    assert b.build().classes["__main__:RingNode"] is inner


def test_the_notebook_bar_says_ticks_rate_and_time_left() -> None:
    from hiocluster.runtime.notebook import NotebookBar, in_notebook

    bar = NotebookBar()
    assert bar.text(0, 200, 10.0) == "ticking " + "░" * 30 + " 0/200 (0%)"
    assert bar.text(100, 200, 11.0) == ("ticking " + "█" * 15 + "░" * 15 + " 100/200 (50%), "
                                        "100 ticks/s, about 1 s left")
    assert not in_notebook()  # pytest is no Jupyter kernel: no bar here


def test_a_class_sent_by_value_that_cannot_be_unpickled_is_named() -> None:
    with pytest.raises(ImportError, match="node class __main__:X, sent by value, cannot be "
                                          "unpickled here"):
        by_value_class("__main__:X", b"not a pickle")
    with pytest.raises(ImportError, match="is not a Node subclass"):
        by_value_class("__main__:X", pickle.dumps(int))
