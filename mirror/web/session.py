"""Who is looking at the page and what they may do there.

``viewer(request)`` is what every page and action asks: the account (or anonymous),
whether it may pull a repository (what lists show) and act on it (what buttons
show, what actions accept), and the CSRF token its forms carry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request

from ..auth import Identity


@dataclass(frozen=True)
class Viewer:
    account: str = ""                      # "" anonymous
    identity: Identity = field(default_factory=lambda: Identity(""))
    csrf: str = ""                         # the token forms carry; "" when it may not act
    admin: bool = False                    # may act at all (ACL permitting)

    def may_pull(self, upstream: str, repository: str) -> bool:
        return True

    def may(self, action: str, upstream: str, repository: str) -> bool:
        """``action``: pin, unpin, invalidate, remove (cached), delete (hosted)."""
        return self.admin


async def viewer(request: Request) -> Viewer:
    return Viewer()
