"""What a backend call can fail with, in terms the engine acts on (any backend raises these).

::

    RequesterError
    ├── PermanentError            retrying cannot help
    │   ├── InvalidRequest        bad envelope, signature or spec
    │   ├── NotAuthorized         job owned by another client, or not the node's approver
    │   ├── CredentialsRejected   401/403 from the orchestrator API: the configured credential
    │   │                         (api_key, api_username + api_password) is wrong or lacks the
    │   │                         capability. A configuration error, not a refusal of one job:
    │   │                         the executor stops its pass, the daemon exits 78 (EX_CONFIG)
    │   ├── NotFound              the backend does not know the job
    │   ├── AlreadyTerminal       cancel of a job that has ended
    │   └── NoExecutions          approve: the node holds no execution of the job
    ├── MalformedReply            a reply not of the contract's shape; not retried
    ├── TransientError            retried with backoff by the backend, bounded
    │   ├── RateLimited
    │   ├── ServerError
    │   └── Unreachable           the request never reached the server
    └── OutcomeUnknown            a submit may have created a job; ``job_id`` carries the id
                                  when the server sent one. Resolved by finding the uid.

How the legacy API's HTTP statuses map onto it: :mod:`reconciler.backends.legacy`.
"""

from __future__ import annotations

from reconciler.events import clean


class RequesterError(Exception):
    """Base of every error raised by this module."""

    def __init__(
        self, message: str, *, status: int | None = None, job_id: str | None = None
    ) -> None:
        # Bounded and scrubbed here, once: messages carry requester and node text, and they
        # reach events, the store (last_error) and `status` (docs/reliability.md, "Hostile input").
        super().__init__(clean(message))
        self.status = status
        #: X-Bacalhau-Job-ID of the reply, when the server sent one.
        self.job_id = job_id


class PermanentError(RequesterError):
    pass


class InvalidRequest(PermanentError):
    pass


class NotAuthorized(PermanentError):
    pass


class CredentialsRejected(PermanentError):
    """The server refused our credential (orchestrator API: 401 or 403 on any route). Unlike
    the legacy API's :class:`NotAuthorized` (one job is not ours), every request would meet
    it, so it ends the pass and the daemon (docs/design.md, "The orchestrator backend",
    Credentials rejected). The message names the settings to fix and never the secret."""

    def __init__(self, message: str, *, status: int | None = None, credential: str = "none",
                 endpoint: str = "", hint: str = "") -> None:
        super().__init__(message, status=status)
        #: Which kind of credential was sent: ``api-key``, ``basic`` or ``none``.
        self.credential = credential
        #: The server, credentials in the URL masked.
        self.endpoint = endpoint
        #: What to change, in words (no secret).
        self.hint = clean(hint)


class NotFound(PermanentError):
    pass


class AlreadyTerminal(PermanentError):
    pass


class NoExecutions(PermanentError):
    pass


class MalformedReply(RequesterError):
    """A reply that is not what the contract says (``{"jobs": [1, 2]}``, non-JSON, a number
    where an object goes, a job without an id). Not retried: the same server would send the
    same; the caller treats it like any other requester failure (observe backs off, a pass
    fails and is retried)."""


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
