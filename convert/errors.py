class ConvertError(Exception):
    """A problem with the input model or the arguments; the message says what to do."""
