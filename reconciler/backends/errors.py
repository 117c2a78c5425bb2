"""What a backend call can fail with, in terms the engine acts on (any backend raises these).

::

    RequesterError
    ├── PermanentError            retrying cannot help
    │   ├── InvalidRequest        bad envelope, signature or spec
    │   ├── NotAuthorized         job owned by another client, or not the node's approver
    │   ├── NotFound              the backend does not know the job
    │   ├── AlreadyTerminal       cancel of a job that has ended
    │   └── NoExecutions          approve: the node holds no execution of the job
    ├── TransientError            retried with backoff by the backend, bounded
    │   ├── RateLimited
    │   ├── ServerError
    │   └── Unreachable           the request never reached the server
    └── OutcomeUnknown            a submit may have created a job; ``job_id`` carries the id
                                  when the server sent one. Resolved by finding the uid.

How the legacy API's HTTP statuses map onto it: :mod:`reconciler.backends.legacy`.
"""

from __future__ import annotations


class RequesterError(Exception):
    """Base of every error raised by this module."""

    def __init__(
        self, message: str, *, status: int | None = None, job_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        #: X-Bacalhau-Job-ID of the reply, when the server sent one.
        self.job_id = job_id


class PermanentError(RequesterError):
    pass


class InvalidRequest(PermanentError):
    pass


class NotAuthorized(PermanentError):
    pass


class NotFound(PermanentError):
    pass


class AlreadyTerminal(PermanentError):
    pass


class NoExecutions(PermanentError):
    pass


class TransientError(RequesterError):
    pass


class RateLimited(TransientError):
    pass


class ServerError(TransientError):
    pass


class Unreachable(TransientError):
    pass


class OutcomeUnknown(RequesterError):
    """A submit may or may not have created a job."""
