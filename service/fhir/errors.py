"""Errors raised by the FHIR layer and the domain packages.

Each carries the OperationOutcome issues and the status the FHIR REST specification gives
for the situation. The API layer turns them into responses in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Issue:
    severity: str  # fatal | error | warning | information
    code: str  # IssueType: invalid, required, value, code-invalid, not-found, conflict, ...
    diagnostics: str
    expression: tuple[str, ...] = ()

    def to_fhir(self) -> dict[str, Any]:
        issue: dict[str, Any] = {"severity": self.severity, "code": self.code, "diagnostics": self.diagnostics}
        if self.expression:
            issue["expression"] = list(self.expression)
        return issue


def operation_outcome(issues: list[Issue]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [i.to_fhir() for i in issues]}


class FhirError(Exception):
    status: int = 400
    code: str = "processing"

    def __init__(self, diagnostics: str | None = None, *, issues: list[Issue] | None = None,
                 expression: str | None = None, headers: dict[str, str] | None = None) -> None:
        if issues is None:
            issues = [Issue("error", self.code, diagnostics or self.__class__.__name__,
                            (expression,) if expression else ())]
        self.issues = issues
        self.headers = headers or {}
        super().__init__(diagnostics or "; ".join(i.diagnostics for i in issues))

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.issues)


class BadRequest(FhirError):
    status, code = 400, "invalid"


class Unauthorized(FhirError):
    status, code = 401, "login"


class Forbidden(FhirError):
    status, code = 403, "forbidden"


class NotFound(FhirError):
    status, code = 404, "not-found"


class MethodNotAllowed(FhirError):
    status, code = 405, "not-supported"


class NotAcceptable(FhirError):
    status, code = 406, "not-supported"


class Conflict(FhirError):
    status, code = 409, "conflict"


class Gone(FhirError):
    status, code = 410, "deleted"


class PreconditionFailed(FhirError):
    status, code = 412, "conflict"


class PayloadTooLarge(FhirError):
    status, code = 413, "too-costly"


class UnsupportedMediaType(FhirError):
    status, code = 415, "not-supported"


class Unprocessable(FhirError):
    status, code = 422, "invalid"


class TooManyRequests(FhirError):
    status, code = 429, "throttled"
