"""String types and schema rules shared by request bodies.

JSON can carry a NUL character; PostgreSQL text can neither store nor compare one. These types refuse it at
the schema, where the problem names the field; a NUL in a path or query parameter meets the ``DataError``
handler in ``service.core.problems``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import StringConstraints

_NO_NUL = r"^[^\x00]*$"

Text = Annotated[str, StringConstraints(pattern=_NO_NUL)]
# Names and ids chosen by clients: dataset names, sample ids, data subjects, ids they send back.
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=_NO_NUL)]


def exactly_one_of(*groups: tuple[str, str]) -> dict[str, Any]:
    """JSON Schema for "exactly one of each pair of members" (each ``oneOf`` holds when one is present): a
    model's ``json_schema_extra``, its pair's members typed ``X | SkipJsonSchema[None]`` (a JSON null counts
    as absent, so the document lists only the present form of each)."""
    return {"allOf": [{"oneOf": [{"required": [a]}, {"required": [b]}]} for a, b in groups]}
