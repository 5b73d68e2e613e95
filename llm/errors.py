"""What can go wrong with a call, split by what the caller should do about it."""
from __future__ import annotations


class CallError(Exception):
    """One attempt failed; `retryable` says whether another attempt may succeed."""

    retryable = True

    def __init__(self, reason: str, message: str = "", status: int | None = None, retry_after: float | None = None, raw: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        self.raw = raw


class RateLimited(CallError):
    pass


class BadRequest(CallError):
    """The endpoint refused this request (400, 422): another attempt would be refused too."""

    retryable = False


class ReplyTooLarge(CallError):
    """A reply body past `max_reply_bytes`, left unread: another attempt would pay for the same runaway reply."""

    retryable = False


class RunAborted(Exception):
    """The whole run must stop: continuing would fail every call or spend beyond what was allowed."""


class FatalEndpointError(RunAborted):
    """401/403/404: a bad key, no access, or an unknown model. Stops at the first call."""


class EndpointUnreachable(RunAborted):
    pass


class BudgetExceeded(RunAborted):
    pass


class TooManyFailures(RunAborted):
    pass


class MissingCredentials(RunAborted):
    pass
