"""Console entry point ``train-xception`` (``train_xception.py``): parse, call the package, report in one line.

Training: ``plan_run`` decides everything (parsing once, before MXNet loads), the engine variable is exported,
then the trainer is imported and run. Failures become one stderr line through ``console.run_cli``, under the name
the user typed (``console.program_name``). ``score_main`` (``xception-score``) lives in ``score_cli.py``, beside
the scoring code; it is imported here for the entry point ``xception_mx.cli:score_main``.
"""
from __future__ import annotations

import os
import sys

from .console import run_cli, setup_logging
from .score_cli import main as score_main

__all__ = ["train_main", "score_main"]

#: The repository script; ``train-xception`` when run as the installed script (``console.program_name``).
TRAIN_PROG = "train_xception.py"


#: What MXNet 1.9.1 prints to stderr when it creates its engine (the first operation) whenever MXNET_ENGINE_TYPE is
#: set (``src/engine/engine.cc``: an unconditional ``LOG(INFO)``; no variable silences it, MXNET_ENGINE_INFO
#: included).
ENGINE_BANNER = "MXNet start using engine:"


def import_mxnet_quietly() -> None:
    """Import MXNet and create its engine with the banner (:data:`ENGINE_BANNER`) taken out of what it writes to
    stderr (file descriptor 2, from C++) meanwhile; any other line passes through. The trainer logs the engine."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import mxnet

            mxnet.nd.waitall()  # creates the engine, which prints the banner
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if ENGINE_BANNER not in line))
            sys.stderr.flush()


def train_main(argv: list[str] | None = None) -> int:
    """``train_xception.py`` / ``train-xception``: plan, set MXNet's engine, import the trainer, train."""
    setup_logging()
    plans = []

    def plan() -> None:
        from .plan import plan_run

        plans.append(plan_run(argv))

    code = run_cli(TRAIN_PROG, plan)
    if code:
        return code
    run_plan = plans[0]
    if "mxnet" not in sys.modules:  # MXNet (and its oneDNN) read these once, when they load
        os.environ.setdefault("MXNET_ENGINE_TYPE", run_plan.engine)
        if run_plan.config.amp == "bfloat16":
            from .cpuinfo import enable_amx

            run_plan.notes.append(f"bfloat16: {enable_amx(os.environ)}")
        run_plan.notes.append(f"MXNet engine: {os.environ['MXNET_ENGINE_TYPE']} (MXNET_ENGINE_TYPE)")

    def train() -> None:
        if "mxnet" not in sys.modules:
            import_mxnet_quietly()
        from .train import Trainer

        Trainer(run_plan).fit()

    return run_cli(TRAIN_PROG, train)
