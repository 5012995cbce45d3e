"""Every table module, imported in one place so Alembic and the tests see the whole schema.

A domain package with tables adds one import line here.
"""

from service.fhir import tables as fhir_tables  # noqa: F401
from service.capacity import tables as capacity_tables  # noqa: F401
from service.security import tables as security_tables  # noqa: F401
from service.security import audit_tables  # noqa: F401
