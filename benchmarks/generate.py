"""Generate a large Khutulun service template, for the load and deploy benchmarks.

``python -m benchmarks.generate NODES OUT.yaml``: a tenth of the nodes are Directories, the rest Processes
that attach one directory, connect to up to two earlier processes' endpoints and depend on one more, so that
the requirement graph is as dense as real templates get (about three edges a node).
"""

from __future__ import annotations

import sys
from pathlib import Path


def generate(nodes: int, *, command: list[str] | None = None) -> str:
    command = command or ["sleep", "3600"]
    lines = [
        "tosca_definitions_version: tosca_simple_yaml_1_3",
        "imports: [khutulun/profile.yaml]",
        "topology_template:",
        "  inputs:",
        "    greeting: {type: string, default: hello}",
        "  node_templates:",
    ]
    directories = max(1, nodes // 10)
    for i in range(directories):
        lines += [f"    dir{i}:", "      type: khutulun.nodes.Directory", "      properties: {temporary: true}"]
    processes = nodes - directories
    for i in range(processes):
        lines += [
            f"    proc{i}:",
            "      type: khutulun.nodes.Process",
            "      properties:",
            f"        command: {command!r}".replace("'", '"'),
            "        environment: {GREETING: {get_input: greeting}}",
            "      capabilities:",
            "        endpoint: {properties: {port: 0}}",
            "      requirements:",
            f"        - storage: dir{i % directories}",
        ]
        for back in (1, 7):
            if i - back >= 0:
                lines.append(f"        - connection: proc{i - back}")
        if i >= 13:
            lines.append(f"        - dependency: proc{i - 13}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    Path(sys.argv[2]).write_text(generate(int(sys.argv[1])))
