"""FHIR search: parse a query, run it against the index tables, page it, render the Bundle.

Public API (used by the store and the REST layer)::

    parse_search(resource_type, params, *, strict=False) -> SearchRequest
    execute_search(conn, request, *, visible=None) -> SearchPage
    find_matches(conn, resource_type, query, *, limit=2) -> list[str]
    searchset_bundle(page, *, base_url) -> bytes

Modules: ``parse`` / ``values`` (query text → typed criteria), ``sql`` (criteria → SQL on the
index tables), ``dialect`` (the SQLite/PostgreSQL differences), ``cursor`` (keyset cursors),
``execute`` (paging, totals, includes), ``bundle`` (the searchset Bundle).
"""

from service.fhir.search.bundle import searchset_bundle
from service.fhir.search.execute import Visible, execute_search, find_matches
from service.fhir.search.model import SearchPage, SearchRequest
from service.fhir.search.parse import parse_search

__all__ = ["SearchPage", "SearchRequest", "Visible", "execute_search", "find_matches", "parse_search",
           "searchset_bundle"]
