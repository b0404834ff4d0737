"""One error type for bad user input: the CLI prints its message as a single line, no traceback."""


class UserError(Exception):
    """Bad input the user can fix. The message is one line and says what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class Terminated(KeyboardInterrupt):
    """SIGTERM (what clusters and schedulers send), raised like Ctrl-C's KeyboardInterrupt so every
    cleanup that runs on Ctrl-C (temp files, stage status, the run lock) runs on it too."""
