"""The two kinds of failure the command line distinguishes (exit codes are a contract)."""

import signal
import sys


class UserError(Exception):
    """Bad usage or bad input: one clear line for the user, exit code 2."""

    exit_code = 2


class VerificationError(UserError):
    """The exported model failed a check (parity, checker, gate): exit code 1."""

    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or torchrun stopping us), handled like Ctrl-C: clean up and exit 143."""


_terminated = False


def terminate(signum=None, frame=None):
    """The SIGTERM handler: remember the request, then raise. The raise can be lost (an exception
    raised while Python runs a finalizer or a library's callback is printed and dropped), so the
    runner also checks the flag between steps and before the output is committed."""
    global _terminated
    _terminated = True
    raise Terminated()


def quiet_lost_terminations(unraisable) -> None:
    """sys.unraisablehook: a Terminated raised inside a finalizer or an import lock's weakref
    callback cannot propagate and Python would print its traceback. The flag is already set, so the
    runner stops at its next check; say nothing here. Anything else goes to the default hook."""
    if isinstance(unraisable.exc_value, Terminated):
        return
    sys.__unraisablehook__(unraisable)


def install_sigterm() -> None:
    signal.signal(signal.SIGTERM, terminate)
    sys.unraisablehook = quiet_lost_terminations


def raise_if_terminated() -> None:
    if _terminated:
        raise Terminated()
