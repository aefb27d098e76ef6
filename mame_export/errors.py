"""Errors a user can cause or fix. The CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """An error the user caused or can fix (bad name, bad option, bad file, no space)."""

    exit_code = 2


class ExportError(UserError):
    """The model could not be exported to ONNX."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not fit the model."""
