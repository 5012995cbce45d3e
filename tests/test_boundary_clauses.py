"""The boundary's SQL, compiled for every caller kind and resource type: each subquery tests
the row of the query around it. SQLAlchemy correlates an EXISTS automatically only with the
query right around it; a test two levels down on the filtered row silently became a cross
join with a second copy of that row's table (true for every row: a Task's receivers lost it
whenever any Task anywhere was a draft). The boundary joins explicitly, never with a comma: a
comma in a FROM list is such a copy."""

from __future__ import annotations

import re

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from service.config import Settings
from service.fhir.access import AccessContext
from service.fhir.searchparams import supported_types
from service.fhir.tables import ResourceRow
from service.security.policy import BoundaryPolicy

R = ResourceRow.__table__
CALLERS = {
    "organization": AccessContext(client_id="c", organization="Organization/clinic-1"),
    "patient": AccessContext(client_id="c", patient="Patient/p-1"),
    "organization and patient": AccessContext(client_id="c", organization="Organization/clinic-1",
                                              patient="Patient/p-1"),
}


def _cross_joins(sql: str) -> list[str]:
    return re.findall(r"FROM \w+ AS \w+, \w+ AS \w+", sql)


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_every_subquery_of_the_boundary_tests_its_own_row(caller: str) -> None:
    policy = BoundaryPolicy(Settings(database_url="sqlite://", auth="on", base_url="http://x/fhir"))
    problems = {}
    for resource_type in [*sorted(supported_types()), "*"]:
        clause = policy.visible(CALLERS[caller], resource_type, R.c.resource_type, R.c.id)
        if clause is None:
            continue
        sql = str(sa.select(R.c.id).where(clause).compile(dialect=postgresql.dialect()))
        if crossed := _cross_joins(sql):
            problems[resource_type] = crossed
    assert problems == {}
