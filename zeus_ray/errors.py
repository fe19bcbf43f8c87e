"""Errors that reach users. Every message is one line that names the slide, file or key and says
how to fix it; the CLI prints `str(err)` without a traceback unless --debug is given."""


class ZeusError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ConfigError(ZeusError):
    """A bad configuration key or value (names the key)."""


class SlideError(ZeusError):
    """A problem with one slide; the cohort goes on without it.

    `slide_id` names the slide, `reason` is a short machine-friendly category used in the errors
    table (missing, unsupported, unreadable, no_mpp, no_tissue, remote, annotation, ...).
    """

    def __init__(self, slide_id: str, message: str, reason: str = "error"):
        self.slide_id = slide_id
        self.reason = reason
        super().__init__(f"slide {slide_id!r}: {message}")


class PromptError(ZeusError):
    """A bad prompt file (names the file and the field)."""


class WeightsError(ZeusError):
    """Model weights missing or not matching the architecture (says where it looked)."""


class AnnotationError(ZeusError):
    """A malformed annotation file (names the file and what is wrong)."""
