"""The pipeline's own exceptions. The launcher turns them into a one-line message and an exit
code; anything else is a bug and keeps its traceback."""


class PipelineError(Exception):
    """A problem the user can fix; the message says what and how."""

    exit_code = 1


class ConfigError(PipelineError):
    """The composed config is invalid: nothing has been done yet."""

    exit_code = 2


class FetchError(PipelineError):
    """The weights could not be fetched (source unreachable, gated, missing, bad digest)."""
