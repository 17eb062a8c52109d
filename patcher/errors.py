"""One exception type for every problem a user can fix: the CLI prints it as one line and exits 1."""


class PatcherError(Exception):
    """A clear, user-facing error. `where` names the file (or option) at fault."""

    def __init__(self, where: object, problem: str) -> None:
        self.where = str(where)
        self.problem = problem
        self.lines = False  # True: the problem is several lines, each already one finding
        super().__init__(f"{self.where}: {problem}")

    def __reduce__(self):  # survives pickling back from a worker process (`run --jobs N`)
        return type(self), (self.where, self.problem), self.__dict__


class CheckpointError(PatcherError):
    """A checkpoint file or folder is malformed, unsafe, or unsupported."""
