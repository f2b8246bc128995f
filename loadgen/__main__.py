"""python -m loadgen [compare|sweep|simulate|replay] ...: with no command, a benchmark run against a server.

Every command lives in its own module as `main(argv) -> exit code`, imported only when asked for.
`loadgen/simulate.py` is to follow that shape: build its parser with args.add_workload_args and
args.add_output_arg, and write its run with report.write_results, report.plot_run, report.print_summary.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"compare": "loadgen.compare", "sweep": "loadgen.sweep", "simulate": "loadgen.simulate",
            "replay": "loadgen.replay"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command, module_name = "run", "loadgen.bench"
    if argv and argv[0] in COMMANDS:
        command, module_name, argv = argv[0], COMMANDS[argv[0]], argv[1:]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        path = module_name.replace(".", "/") + ".py"
        print(f"error: the '{command}' command needs {path}, which this checkout does not have yet",
              file=sys.stderr)
        return 2
    return module.main(argv)


if __name__ == "__main__":
    sys.exit(main())
