"""ReportingNode: a Node that writes its final state as JSON when it exits.

With ``params.report_dir`` set, the node's hio exit context writes
``<report_dir>/<node name>.json`` (atomically: a reader never sees half a
file). Tests read these reports to check end-of-run invariants.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hiocluster.node import Node

__all__ = ["ReportingNode"]


class ReportingNode(Node):
    """A Node whose exit context reports :meth:`state` to ``params.report_dir``."""

    def exit(self, deeds: Any = None) -> None:  # type: ignore[override]
        super().exit(deeds)
        report_dir = self.params.get("report_dir")
        if deeds is None and report_dir:
            path = os.path.join(report_dir, f"{self.name}.json")
            with open(f"{path}.tmp", "w", encoding="utf-8") as file:
                json.dump(self.state(), file)
            os.replace(f"{path}.tmp", path)
