"""Who is asking. Every store entry point takes an :class:`AccessContext`.

Authorization and audit are decided in one place (the store) from this object, so the
API layer only has to build it once per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AccessContext:
    client_id: str | None = None
    organization: str | None = None  # "Organization/<id>" the caller acts for
    practitioner: str | None = None  # "Practitioner/<id>" or "PractitionerRole/<id>"
    patient: str | None = None  # "Patient/<id>" for patient-context apps
    user: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)
    # True for internal callers (demo loader, migrations, tests of the store itself).
    system: bool = False

    @classmethod
    def anonymous(cls) -> "AccessContext":
        return cls()

    @classmethod
    def internal(cls, name: str = "yilian") -> "AccessContext":
        return cls(client_id=name, system=True)
