"""Exceptions shared by all of qft."""

__all__ = ["UserError"]


class UserError(Exception):
    """A problem with the user's input (file, option, image, bitstream).

    The CLI prints its message as a single line and exits with status 2; the message says
    what is wrong and what to do.
    """
