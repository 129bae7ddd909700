"""Errors a user can cause fail the run at once, with a message that says what to change."""

from temporalio.exceptions import ApplicationError

from schemas.errors import USER_ERROR


def user_error(message: str, **details) -> ApplicationError:
    """A non-retryable failure whose message is shown on the run as its reason."""
    return ApplicationError(message, details or None, type=USER_ERROR, non_retryable=True)
