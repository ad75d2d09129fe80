"""Validate and preview of a generated template, against tosca-parser parsing the same file alone.

    .venv/bin/python -m benchmarks.bench_load [NODES] [ROUNDS]

Every figure is the wall time of a fresh command, as a user would run it, with its peak memory:
``khutulun validate`` (the whole CLI: start, loader server, checks, tosca-parser, evaluation), ``khutulun
preview`` against a running agent (its loader server warm after the first round), and ``python -c
"ToscaTemplate(path)"`` for tosca-parser alone on the same file (with the profile imported by its absolute
path, since tosca-parser cannot resolve ``khutulun/profile.yaml``).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.generate import generate
from khutulun.tosca.files import packaged_profile_roots
from tests.e2e.harness import Agent


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """(seconds, standard output) of one run of ``command``, which must succeed."""
    started = time.monotonic()
    process = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    elapsed = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed:\n{process.stdout}\n{process.stderr}")
    return elapsed, process.stdout


PEAK = "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"


def main() -> None:
    nodes = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    work = Path(tempfile.mkdtemp(prefix="kh-bench-", dir="/tmp"))
    ours = work / f"gen{nodes}.yaml"
    ours.write_text(generate(nodes))
    profile = packaged_profile_roots()[0] / "khutulun" / "profile.yaml"
    theirs = work / f"gen{nodes}-absolute.yaml"
    theirs.write_text(ours.read_text().replace("[khutulun/profile.yaml]", f"[{profile}]"))

    agent = Agent(work / "agent")
    (work / "agent").mkdir()
    agent.start()
    khutulun = [sys.executable, "-m", "khutulun.cli"]
    results: dict[str, list[float]] = {"tosca-parser alone": [], "khutulun validate": [], "khutulun preview": []}
    try:
        for r in range(rounds):
            parser = timed([sys.executable, "-c", "import sys\nfrom toscaparser.tosca_template import "
                            f"ToscaTemplate\nToscaTemplate({str(theirs)!r})"])
            validate = timed([*khutulun, "validate", str(ours)], env=agent.env)
            preview = timed([*khutulun, "preview", str(ours)], env=agent.env)
            for key, (seconds, _) in zip(results, (parser, validate, preview), strict=True):
                results[key].append(seconds)
            print(f"round {r + 1}: tosca-parser {parser[0]:.2f} s | validate {validate[0]:.2f} s | preview "
                  f"{preview[0]:.2f} s", flush=True)
    finally:
        agent.cleanup()
    # Peak memory of one load, each in a process of its own: tosca-parser alone, and Khutulun's whole load
    # (what its loader server's child does for a validate or a deploy).
    _, parser_peak = timed([sys.executable, "-c", "from toscaparser.tosca_template import ToscaTemplate\n"
                            f"ToscaTemplate({str(theirs)!r})\n{PEAK}"])
    _, ours_peak = timed([sys.executable, "-c", "from khutulun.tosca.worker import LoadRequest, run_request\n"
                          f"run_request(LoadRequest(inputs={{}}, path={str(ours)!r}))\n{PEAK}"])
    # Warm: the same loads inside a running process (tosca-parser in this one, Khutulun's in its loader
    # server, after one load to start it): what parsing costs, without starting Python.
    from toscaparser.tosca_template import ToscaTemplate

    from khutulun.tosca import load_file

    load_file(ours)
    warm: dict[str, list[float]] = {"tosca-parser": [], "khutulun load": []}
    for _ in range(rounds):
        started = time.monotonic()
        ToscaTemplate(str(theirs))
        warm["tosca-parser"].append(time.monotonic() - started)
        started = time.monotonic()
        load_file(ours)
        warm["khutulun load"].append(time.monotonic() - started)
    base = statistics.median(results["tosca-parser alone"])
    print(f"\nmedian of {rounds} rounds, {nodes} nodes ({ours.stat().st_size // 1024} KiB):")
    for key, values in results.items():
        median = statistics.median(values)
        print(f"  {key:<20} {median:.2f} s (min {min(values):.2f}, max {max(values):.2f})  x{median / base:.2f}")
    warm_base = statistics.median(warm["tosca-parser"])
    print("  warm, in a running process:  " + ", ".join(
        f"{k} {statistics.median(v):.2f} s (x{statistics.median(v) / warm_base:.2f})" for k, v in warm.items()))
    print(f"  peak RSS of one load: tosca-parser alone {parser_peak.strip()} MiB, Khutulun {ours_peak.strip()} MiB")


if __name__ == "__main__":
    main()
