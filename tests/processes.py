"""How the tests judge the exit of their multi-process scripts."""

from __future__ import annotations

import signal

GLOO_EXIT_ABORT = "terminate called without an active exception"


def ended_well(returncode: int, stderr: str, results_written: bool) -> bool:
    """Whether a multi-process script ended well.

    Exit status 0; or, once every result the test reads has been written, torch's known abort at
    interpreter exit: gloo's threads now and then abort a process's teardown with SIGABRT even after
    ``destroy_process_group`` (pytorch/pytorch#190489, #179291). By then nothing the script computed
    is lost, and the test goes on to check all of it.
    """
    if returncode == 0:
        return True
    aborted = returncode in (-signal.SIGABRT, 128 + signal.SIGABRT) and GLOO_EXIT_ABORT in stderr[-2000:]
    return results_written and aborted
