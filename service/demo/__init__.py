"""Demo data: a medical alliance in Yangquan as one FHIR R4 transaction Bundle.

``demo_bundle()`` is what ``YILIAN_DEMO_DATA`` and ``yilian demo`` load; the resident-ID
helpers live in :mod:`service.demo.resident_id`.
"""

from service.demo.alliance import demo_bundle, demo_resources
from service.demo.resident_id import check_character, make_resident_id

__all__ = ["check_character", "demo_bundle", "demo_resources", "make_resident_id"]
