"""The two kinds of failure the command line distinguishes (exit codes are a contract)."""


class UserError(Exception):
    """Bad usage or bad input: one clear line for the user, exit code 2."""

    exit_code = 2


class VerificationError(UserError):
    """The exported model failed a check (parity, checker, gate): exit code 1."""

    exit_code = 1
