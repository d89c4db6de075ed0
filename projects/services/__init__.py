"""Writes, one module per use case. Functions are keyword-only, typed, named <entity>_<action>,
and raise the named exceptions below, which views and the CLI turn into messages."""


class ServiceError(Exception):
    """Base of every error a service raises on bad input or state; the message names the
    row, field or setting at fault and is safe to show to the user."""


class NotAllowed(ServiceError):
    """The user's role does not permit this write (e.g. a viewer)."""


class InvalidInput(ServiceError):
    """A value given by the user is wrong; the message names the field."""


class InvalidState(ServiceError):
    """The objects are not in a state where this action makes sense."""
