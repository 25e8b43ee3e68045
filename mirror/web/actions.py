"""The page's actions, under ``/ui/actions/<action>``: ``pin``, ``unpin``,
``invalidate`` (a cached tag: stale now), ``remove`` (a cached image) and ``delete``
(a hosted tag or manifest).

``GET`` with ``upstream``, ``repository``, ``reference`` (a tag or a digest) and
``next`` shows what will happen (confirm.html); ``POST`` of that form with
``confirm=yes`` and the CSRF token does it, logs it (``mirror.web``: account, action,
target) and redirects to ``next`` (a path on this server only) with a flash message.
Who may do what: session.py. What is done is what the CLI does (cache_admin.py,
remove.py) or the API's DELETE (HostedStore.delete_manifest), on the server's own
cache; every worker sees the change through the index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from .. import cache_admin, remove
from ..admin import human_size
from ..errors import RegistryError
from ..models import HOSTED, is_digest, validate_digest, validate_name, validate_tag
from ..routing import Router
from .session import (
    ACL_ACTION,
    HOSTED_ACTIONS,
    Viewer,
    WebState,
    csrf_ok,
    error_page,
    flash,
    page,
    read_form,
    safe_next,
    state,
    take_flash,
    viewer,
)

log = logging.getLogger("mirror.web")

TITLES = {"pin": "Pin", "unpin": "Unpin", "invalidate": "Invalidate", "remove": "Remove",
          "delete": "Delete"}


class Refused(Exception):
    """A 4xx page: the status and one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Target:
    action: str
    upstream: str
    repository: str
    reference: str

    @property
    def text(self) -> str:
        where = self.repository if self.upstream == HOSTED else \
            f"{self.upstream}/{self.repository}"
        return f"{where}{'@' if is_digest(self.reference) else ':'}{self.reference}"

    @property
    def form(self) -> dict[str, str]:
        return {"upstream": self.upstream, "repository": self.repository,
                "reference": self.reference}


def parse(web: WebState, action: str, params: dict[str, str]) -> Target:
    """The target named by the form or query; Refused (400/404) if it is not one."""
    upstream = params.get("upstream", "")
    repository = params.get("repository", "")
    reference = params.get("reference", "")
    if action in HOSTED_ACTIONS:
        if upstream != HOSTED or web.hosted is None:
            raise Refused(400, f"{action}: only hosted repositories (pushed here) are deleted; "
                               "cached content is removed")
    elif upstream not in web.config.upstreams:
        raise Refused(404 if upstream else 400,
                      f"{action}: no upstream named {upstream[:100]!r}" if upstream
                      else f"{action}: only cached repositories (hosted ones are deleted)")
    try:
        validate_name(repository)
        if ":" in reference:
            validate_digest(reference)
        else:
            validate_tag(reference)
    except RegistryError as exc:
        raise Refused(400, exc.message[:300]) from None
    if action == "invalidate" and is_digest(reference):
        raise Refused(400, "invalidate: a tag, not a digest (a digest never changes)")
    return Target(action, upstream, repository, reference)


# -- what will happen (GET) and doing it (POST) ----------------------------------------------


async def describe(web: WebState, t: Target) -> tuple[str, list[str]]:
    """(what will happen, facts such as sizes) for the confirmation page; Refused if
    there is nothing to act on."""
    local = web.local
    await local.catch_up()        # what other workers cached or pushed a moment ago
    if t.action == "pin":
        row = None if is_digest(t.reference) else local.tag(t.upstream, t.repository,
                                                             t.reference)
        digest = row.digest if row else t.reference
        facts = [f"digest {digest}"] if row else []
        if local.manifest_info(digest) is not None:
            facts.append(f"{human_size(await local.index.closure_size(digest))} cached")
        else:
            facts.append("not cached yet: kept once it is pulled")
        return (f"Pin {t.text}: eviction (max_size, expire_unused) will never remove it.",
                facts)
    if t.action == "unpin":
        pins = {p[2] for p in await local.index.pins(t.upstream, t.repository)}
        if t.reference not in pins:
            raise Refused(409, f"{t.text} is not pinned")
        return f"Unpin {t.text}: eviction may remove it again.", []
    if t.action == "invalidate":
        row = local.tag(t.upstream, t.repository, t.reference)
        if row is None:
            raise Refused(404, f"{t.text} is not cached")
        return (f"Invalidate {t.text}: the tag becomes stale now, and the next pull of it "
                "asks upstream whether it moved.", [f"now {row.digest}"])
    if t.action == "remove":
        removal = await remove.plan(local, await _targets(web, t))
        facts = [f"{len(removal.tags)} tag(s), {len(removal.manifests)} manifest(s) and "
                 f"{len(removal.blobs)} blob(s): {human_size(removal.bytes)}"]
        facts += [f"kept {d}: {why}" for d, why in sorted(removal.kept.items())]
        if removal.skipped:
            raise Refused(409, f"{t.text} is pinned: unpin it first")
        return (f"Remove {t.text} from the cache: its tag and what nothing else uses are "
                "deleted; the next pull fetches it again from upstream.", facts)
    # delete (hosted)
    if is_digest(t.reference):
        if not local.linked(HOSTED, t.repository, t.reference):
            raise Refused(404, f"{t.text} is not in {t.repository}")
        what = (f"Delete the manifest {t.text}: it leaves the repository with every tag on "
                "it; garbage collection frees its bytes.")
    else:
        if local.tag(HOSTED, t.repository, t.reference) is None:
            raise Refused(404, f"{t.text} is not a tag of {t.repository}")
        what = (f"Delete the tag {t.text}: the manifest stays, reachable by digest until "
                "garbage collection.")
    if not web.hosted.config.delete:
        raise Refused(405, "deleting is disabled: hosted.delete is false in the config")
    return what, []


async def _targets(web: WebState, t: Target) -> list[remove.Target]:
    spec = remove.Spec(t.text, t.upstream, t.repository,
                       **({"digest": t.reference} if is_digest(t.reference)
                          else {"tag": t.reference}))
    found = await remove.targets(web.local, web.config, _router(web), spec)
    if not found:
        raise Refused(404, f"{t.text} is not cached")
    return found


def _router(web: WebState) -> Router:
    return Router(web.config)


async def perform(web: WebState, t: Target) -> str:
    """Do it; the flash message."""
    local = web.local
    await local.catch_up()
    if t.action == "pin":
        pinned = await cache_admin.pin(local, t.upstream, t.repository, t.reference)
        if pinned.already:
            return f"{t.text} was already pinned"
        return f"pinned {t.text}" + (f" ({human_size(pinned.size)} cached)" if pinned.cached
                                     else " (not cached yet)")
    if t.action == "unpin":
        if not await cache_admin.unpin(local, t.upstream, t.repository, t.reference):
            raise Refused(409, f"{t.text} is not pinned")
        return f"unpinned {t.text}"
    if t.action == "invalidate":
        if local.tag(t.upstream, t.repository, t.reference) is None:
            raise Refused(404, f"{t.text} is not cached")
        await cache_admin.expire(local, [(t.upstream, t.repository, t.reference)])
        await cache_admin.settle(local)
        return f"invalidated {t.text}: the next pull asks upstream"
    if t.action == "remove":
        removal = await remove.plan(local, await _targets(web, t))
        if removal.skipped:
            raise Refused(409, f"{t.text} is pinned: unpin it first")
        await cache_admin.apply_removal(local, removal)
        await cache_admin.settle(local)
        return (f"removed {t.text}: {len(removal.manifests)} manifest(s) and "
                f"{len(removal.blobs)} blob(s), {human_size(removal.bytes)}")
    await web.hosted.delete_manifest(t.repository, t.reference)
    return f"deleted {t.text}"


# -- the route ----------------------------------------------------------------------------


async def action(request: Request) -> Response:
    name = request.path_params["action"]
    web = state(request)
    if name not in ACL_ACTION or web is None or web.local is None:
        return error_page(request, 404, f"no such action: {name[:50]!r}")
    who = await viewer(request)
    if request.method == "POST":
        form = await read_form(request)
        if form is None:
            return error_page(request, 400, "expected a form (application/x-www-form-urlencoded)")
        params = form
    else:
        params = dict(request.query_params)
    back = safe_next(params.get("next"))
    try:
        target = parse(web, name, params)
        _allowed(who, target)
        if request.method == "GET":
            what, facts = await describe(web, target)
            return page(request, "confirm.html", {
                "action": name, "title": TITLES[name], "what": what, "facts": facts,
                "target": target, "fields": target.form, "next": back, "error": None,
                "flash": take_flash(request)})
        if not csrf_ok(request, who, params):
            log.warning("refused %s %s for %s: CSRF token or origin wrong", name, target.text,
                        who.name)
            raise Refused(403, "refused: the form's CSRF token or origin is wrong; reload "
                               "the page and try again")
        if params.get("confirm") != "yes":
            raise Refused(400, f"{name}: not confirmed (confirm=yes)")
        message = await perform(web, target)
    except Refused as exc:
        return error_page(request, exc.status, exc.message)
    except RegistryError as exc:
        return error_page(request, exc.status if 400 <= exc.status < 500 else 502,
                          exc.message[:300])
    log.info("%s %s %s: %s", who.name, name, target.text, message)
    flash(request, message)
    return RedirectResponse(back, 303)


def _allowed(who: Viewer, target: Target) -> None:
    """Refused (403) unless ``who`` may do it. A repository it may not see is refused
    in the same words, so nothing is learnt about it."""
    if not who.may(target.action, target.upstream, target.repository):
        raise Refused(403, f"you may not {target.action} {target.text}"
                      + ("" if who.account or who.guard is None else "; log in first")
                      + ("" if who.admin else ": the page is read-only (ui.admin: acl "
                                               "without logins)"))


ROUTES = [Route("/ui/actions/{action}", action, methods=["GET", "POST"])]
