"""The one exception type softgrad raises for bad input."""


class SoftgradError(ValueError, TypeError):
    """Bad input to a softgrad function.

    It derives from both ``ValueError`` and ``TypeError`` so that callers can
    catch it as whichever they expect. The message names the offending value
    and what was expected.
    """
