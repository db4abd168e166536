"""What goes wrong in ways a user can fix: the CLI reports any :class:`PipelineError` as one line
(``error: <message>``, exit 2). Kept free of heavy imports so the CLI starts fast."""


class PipelineError(Exception):
    """A problem the user can fix; the message names it."""


class ConfigError(PipelineError, ValueError):
    """A config file or override that cannot be used; the message names the setting."""


class DataError(PipelineError, ValueError):
    """The data cannot be used; the message names the file and the problem."""


class ExportError(PipelineError, RuntimeError):
    """The exported SavedModel cannot be trusted or placed; the message says why."""


class StoreMissing(PipelineError, RuntimeError):
    """A SQLite tracking store that does not exist, where only an existing one makes sense."""


class GateBusy(PipelineError, TimeoutError):
    """Another training has held the gate for longer than this one would wait."""
