"""What a bad request field is, and the identifiers every service checks the same way.

Servers answer :class:`InvalidField` with INVALID_ARGUMENT and its message, which starts with the
field's name (``sampling.max_tokens must be >= 1, got 0``).
"""

from __future__ import annotations

import re


class InvalidField(ValueError):
    """A request field is out of bounds; the message starts with the field's name."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field


# Tenant ids become cache filters and metric labels (and, in the keys file, table names): a
# strict alphabet with no quote, backslash or space keeps every one of those safe. The gateway
# admits keys by it and the cache refuses anything else.
TENANT_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
