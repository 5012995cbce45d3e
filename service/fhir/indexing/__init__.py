"""Index-on-write: extract search parameter values from a resource as idx_* table rows.

    from service.fhir.indexing import index_resource
    rows = index_resource(patient_json)      # IndexRows(tokens=[...], strings=[...], ...)

Modules: ``model`` (R4 type model), ``paths`` (expression → compiled accessor), ``values``
(per-type converters), ``text``/``dates``/``numbers`` (normalisation shared with the query
engine), ``indexer`` (plans and index_resource).
"""

from service.fhir.indexing.dates import DATE_MAX, DATE_MIN, date_range
from service.fhir.indexing.indexer import IndexRows, accessor_stats, fallback_expressions, index_resource, plan_for
from service.fhir.indexing.numbers import number_range
from service.fhir.indexing.text import MAX_STRING_CHARS, MAX_VALUE_CHARS, normalize_string
from service.fhir.indexing.values import IDENTIFIER_SUFFIX

__all__ = [
    "DATE_MAX",
    "DATE_MIN",
    "IDENTIFIER_SUFFIX",
    "MAX_STRING_CHARS",
    "MAX_VALUE_CHARS",
    "IndexRows",
    "accessor_stats",
    "date_range",
    "fallback_expressions",
    "index_resource",
    "normalize_string",
    "number_range",
    "plan_for",
]
