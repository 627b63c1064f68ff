"""``cmhash serve``: a small HTTP service over one bundle and one or more indexes, with a
JSON API and one search page (``cmhash-sdk[serve]``: Starlette, uvicorn, python-multipart).

Starlette is the framework: a small, well-kept ASGI toolkit (FastAPI is built on it) whose
routing, form parsing and test client are all this service needs; cmhash checks its own
inputs with its typed errors, so FastAPI's pydantic layer would add a dependency and a
second validation path without adding a feature. uvicorn runs it.

Routes (every error is JSON ``{"error": message, "type": error class}`` with a 4xx status,
never a stack trace; an unexpected failure is a 500 with a one-line message, logged here):

- ``GET /``: the search page (a text box, an image upload, a grid of results).
- ``GET /api/info``: the collections (name, items, bits), the bundle's modalities, the limits.
- ``GET /api/search?text=...&k=10&radius=&collection=``: a text query.
- ``POST /api/search``: a form (``multipart/form-data``) with ``image`` (a file) or
  ``text``, and ``k``, ``radius``, ``collection``.
- ``GET /api/thumbnail/{collection}/{id}``: a JPEG thumbnail of an item, read from the
  images folder given at start, only for names the index holds and only inside that folder.

Defaults are the safe ones: loopback only, request bodies over
:data:`cmhash.limits.MAX_UPLOAD_BYTES` refused before they are read (413), k over
:data:`~cmhash.limits.MAX_QUERY_K` refused (400), images decoded under the bundle's pixel
limit, no names or paths of the server's files in responses except the items' own names.
"""

from __future__ import annotations

import functools
import io
import ipaddress
import logging
import socket
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import limits
from .errors import CmhashError, ImageNotFoundError, InvalidArgumentError, NotFoundError, RequestTooLargeError
from .query import Searcher, check_query_k

log = logging.getLogger("cmhash.serve")

THUMBNAIL_SIDE = 192  # pixels, the longer side
THUMBNAIL_CACHE = 4096  # thumbnails kept in memory
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; style-src 'self' 'unsafe-inline'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _too_large(size: int | None = None) -> RequestTooLargeError:
    said = f" ({size:,} bytes)" if size is not None else ""
    return RequestTooLargeError(f"the request body{said} is over the limit of {limits.MAX_UPLOAD_BYTES:,} bytes; send a "
                         "smaller image, or start the server with a larger CMHASH_MAX_UPLOAD_BYTES")


class _BodyLimit:
    """ASGI middleware: a declared Content-Length over the limit is refused before anything
    is read, and a body that turns out longer (chunked) stops being read at the limit."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = limits.MAX_UPLOAD_BYTES
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            exc = _too_large(int(declared)) if declared.isdigit() else InvalidArgumentError("bad Content-Length")
            response = _error_response(exc, 413 if isinstance(exc, RequestTooLargeError) else 400)
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _too_large()
            return message

        await self.app(scope, limited_receive, send)


def _error_response(exc: Exception, status: int) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(exc).split()), "type": type(exc).__name__}, status_code=status,
                        headers=SECURITY_HEADERS)


def _status_of(exc: CmhashError) -> int:
    if isinstance(exc, RequestTooLargeError):
        return 413
    if isinstance(exc, NotFoundError):
        return 404
    return 400


def create_app(collections: dict[str, Searcher], images: str | Path | None = None,
               thumbnail_side: int = THUMBNAIL_SIDE) -> Starlette:
    """The ASGI application over ``collections`` (name -> :class:`~cmhash.query.Searcher`,
    the first is the default); thumbnails are read from ``images`` (the folder the
    collection was encoded from) when given."""
    if not collections:
        raise InvalidArgumentError("cmhash serve needs at least one index")
    default = next(iter(collections))
    root = Path(images).resolve() if images is not None else None
    if root is not None and not root.is_dir():
        raise InvalidArgumentError(f"--images {images}: not a folder; give the folder the collection was encoded from")
    page = resources.files("cmhash") / "web"

    def collection(name: str | None) -> tuple[str, Searcher]:
        name = name or default
        if name not in collections:
            raise NotFoundError(f"no collection {name!r}; the collections are: {', '.join(collections)}")
        return name, collections[name]

    @functools.lru_cache(maxsize=THUMBNAIL_CACHE)
    def thumbnail(name: str, item: int) -> bytes:
        from .preprocess import load_image

        path = _item_path(name, item)
        if path is None:
            raise NotFoundError(f"no thumbnail for item {item} of {name!r}")
        try:
            image = load_image(path)
        except ImageNotFoundError:  # removed since it was found
            raise NotFoundError(f"no thumbnail for item {item} of {name!r}") from None
        image.thumbnail((thumbnail_side, thumbnail_side))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
        return out.getvalue()

    @functools.lru_cache(maxsize=4 * THUMBNAIL_CACHE)  # every result asks; resolving a path costs several stats
    def _item_path(name: str, item: int) -> Path | None:
        """The image file of an item: its recorded name, inside the images folder."""
        if root is None or not 0 <= item < 2**63:
            return None
        try:
            (item_name,) = collections[name].names([item])
        except (CmhashError, IndexError, KeyError, ValueError):
            return None
        if not item_name:
            return None
        path = (root / item_name).resolve()  # symlinks and ".." resolved before the check
        return path if path.is_relative_to(root) and path.is_file() else None

    def results(name: str, hits) -> list[dict]:
        return [{**hit.to_dict(),
                 "thumbnail": f"/api/thumbnail/{name}/{hit.id}" if _item_path(name, hit.id) is not None else None}
                for hit in hits]

    async def search(request: Request) -> JSONResponse:
        started = time.perf_counter()
        if request.method == "GET":
            fields: Any = request.query_params
            image = None
        else:
            content_type = request.headers.get("content-type", "")
            if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
                raise InvalidArgumentError("POST /api/search takes a form (multipart/form-data with 'image' or 'text'); "
                                           "for a text query GET /api/search?text=... works too")
            fields = await request.form(max_files=1, max_fields=8)
            image = fields.get("image")
        name, searcher = collection(fields.get("collection"))
        k = check_query_k(_int_field(fields, "k", 10))
        radius = _int_field(fields, "radius", None)
        text = fields.get("text")
        if image is not None and not isinstance(image, str):
            data = await image.read()
            if not data:
                raise InvalidArgumentError("the uploaded image is empty")
            hits = await run_in_threadpool(searcher.search_image, data, k, radius)
            query = {"kind": "image", "filename": image.filename, "bytes": len(data)}
        elif isinstance(text, str) and text.strip():
            hits = await run_in_threadpool(searcher.search_text, text, k, radius)
            query = {"kind": "text", "text": text}
        else:
            raise InvalidArgumentError("give a query: 'text' (words) or 'image' (an uploaded file)")
        return JSONResponse({"query": query, "collection": name, "k": k, "radius": radius,
                             "seconds": round(time.perf_counter() - started, 6), "results": results(name, hits)},
                            headers=SECURITY_HEADERS)

    async def info(request: Request) -> JSONResponse:
        first = collections[default]
        return JSONResponse({
            "collections": [{"name": n, "items": len(s), "bits": s.index.bits} for n, s in collections.items()],
            "modalities": list(first.modalities),
            "thumbnails": root is not None,
            "limits": {"max_k": limits.MAX_QUERY_K, "max_upload_bytes": limits.MAX_UPLOAD_BYTES,
                       "max_text_chars": limits.MAX_QUERY_TEXT_CHARS},
        }, headers=SECURITY_HEADERS)

    async def thumbnail_route(request: Request) -> Response:
        name, _ = collection(request.path_params["collection"])
        data = await run_in_threadpool(thumbnail, name, request.path_params["item"])
        return Response(data, media_type="image/jpeg", headers={**SECURITY_HEADERS, "Cache-Control": "max-age=3600"})

    def static(filename: str, media_type: str):
        body = (page / filename).read_bytes()

        async def endpoint(request: Request) -> Response:
            return Response(body, media_type=media_type, headers=SECURITY_HEADERS)

        return endpoint

    async def cmhash_error(request: Request, exc: CmhashError) -> JSONResponse:
        return _error_response(exc, _status_of(exc))

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail, "type": "HTTPException"}, status_code=exc.status_code,
                            headers=SECURITY_HEADERS)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("cmhash serve: %s %s failed", request.method, request.url.path)
        return JSONResponse({"error": "internal error; the server's log has the details", "type": "InternalError"},
                            status_code=500)

    routes = [
        Route("/", static("search.html", "text/html; charset=utf-8")),
        Route("/search.js", static("search.js", "text/javascript; charset=utf-8")),
        Route("/api/info", info),
        Route("/api/search", search, methods=["GET", "POST"]),
        Route("/api/thumbnail/{collection}/{item:int}", thumbnail_route),
    ]
    app = Starlette(routes=routes, exception_handlers={CmhashError: cmhash_error, HTTPException: http_error,
                                                       Exception: unexpected})
    app.add_middleware(_BodyLimit)
    return app


def _int_field(fields, key: str, default: int | None) -> int | None:
    raw = fields.get(key)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return default
    if not isinstance(raw, str):
        raise InvalidArgumentError(f"{key} must be an integer, not a file")
    try:
        return int(raw)
    except ValueError:
        raise InvalidArgumentError(f"{key} must be an integer, got {raw[:20]!r}") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(app: Starlette, host: str = "127.0.0.1", port: int = 8000, announce=print) -> None:
    """Run ``app`` with uvicorn until interrupted, announcing the address served (flushed)
    once it listens: with port 0 the system picks a free port, and the line says which."""
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:  # a typed error instead of uvicorn's exit
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise InvalidArgumentError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port "
                                       "or --host") from None
    if not is_loopback(host):
        print(f"cmhash serve: warning: listening on {host}, reachable from other machines; the service has no "
              "authentication (put it behind a proxy that has)", file=sys.stderr, flush=True)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                bound = self.servers[0].sockets[0].getsockname()[1]
                shown = f"[{host}]" if family == socket.AF_INET6 else host
                announce(f"cmhash serve: http://{shown}:{bound}/  (Ctrl-C stops)")
                sys.stdout.flush()

    # uvicorn binds the socket itself, so accepted connections get TCP_NODELAY from asyncio
    # (a socket made here and handed over would not, and kept-alive replies would wait 40 ms)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, timeout_keep_alive=5,
                            limit_concurrency=64, server_header=False)
    Server(config).run()
