"""String normalisation shared by the indexer and the query engine.

Both sides must fold text identically, or a search misses rows: the index stores
``normalize_string(value)`` and the query engine compares against ``normalize_string(query)``.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

#: Longest normalised / exact string stored in idx_string. HAPI uses 200; we keep 255 characters,
#: which stays well under PostgreSQL's B-tree row limit even for CJK text (3 bytes a character).
#: The query engine truncates its search value the same way before comparing.
MAX_STRING_CHARS = 255

#: Longest token code/system, uri and reference url stored (800 CJK characters < 2,704 bytes).
MAX_VALUE_CHARS = 800


# Only accents (combining diacritics), as HAPI's StringUtils.stripAccents does. Other combining
# marks carry meaning: Japanese voicing marks (が), Indic vowel signs.
_ACCENTS = re.compile("[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]+")


@lru_cache(maxsize=16384)
def normalize_string(s: str) -> str:
    """Case- and accent-fold for matching: ``"Ångström Müller"`` → ``"angstrom muller"``.

    casefold (so ß → ss), NFKD (full-width ``Ａ`` → ``A``, ligatures split), drop combining
    diacritics, then NFC so Hangul and kana recompose: CJK text comes back unchanged. Cached:
    names, cities and codes' displays repeat across resources.
    """
    if s.isascii():
        return s.lower()
    decomposed = unicodedata.normalize("NFKD", s.casefold())
    return unicodedata.normalize("NFC", _ACCENTS.sub("", decomposed))
