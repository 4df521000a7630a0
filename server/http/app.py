"""The FastAPI application: the routes over the shared InferenceService, OpenAI-shaped
errors for every refusal (the service's, FastAPI's body validation, unknown routes), the
body size limit, and the playground page at /.

No Swagger UI: it loads its scripts from a CDN, and the server must work offline; the
OpenAPI document is at /openapi.json for any tool that reads it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.accounting.auth import Authenticator
from server.accounting.pricing import PriceBook
from server.errors import ServiceError
from server.health import Health
from server.http.errors import HTTP_TO_CODE, error_response, service_error_response
from server.http.limits import DEFAULT_MAX_BODY_BYTES, BodyLimit
from server.http.routes import HttpApi, build_router
from server.inference import InferenceService

PLAYGROUND = Path(__file__).parent / "playground"
# Paths whose refusals outside the service (malformed body, too large) are counted, and as what.
COUNTED = {"/v1/chat/completions": "ChatCompletion", "/v1/completions": "Completion", "/v1/models": "ListModels",
           "/tokenize": "Tokenize", "/detokenize": "Detokenize"}

# What a page on an allowed origin may send and read (CORS, --cors-origins).
CORS_REQUEST_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "X-Request-Id"]
CORS_EXPOSED_HEADERS = ["x-request-id", "retry-after", "retry-after-ms", "x-should-retry"]

DESCRIPTION = """OpenAI-compatible API of a sol server: the same API keys (`Authorization: Bearer <key>`),
budgets, rate limits, ledger and engines as its gRPC API. Send `Idempotency-Key` (or `X-Request-Id`)
to make a request idempotent: it is billed once, and a repeat gets 409. Usage always carries
`prompt_tokens_details.cached_tokens`; the `sol` field carries the cost and the model version."""


def _where(loc: list) -> str:
    """A Pydantic error location as the request field it names: messages[2].content."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    """The message and the one field at fault: the deepest location every error shares
    (a union's branches each report a failure below the same field), None when the errors
    are about different fields."""
    problems, locs = [], []
    for e in err.errors():
        loc = [p for p in e.get("loc", ()) if p != "body"]
        if e.get("type") == "json_invalid":
            return f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')}); send a JSON " \
                   "object", None
        where = _where(loc)
        locs.append(loc)
        problems.append(f"{where}: {e.get('msg', 'invalid')}" if where else e.get("msg", "invalid"))
    shared: list = []
    for parts in zip(*locs, strict=False) if locs else ():
        if any(p != parts[0] for p in parts):
            break
        shared.append(parts[0])
    return "; ".join(problems) or "invalid request body", _where(shared) or None


def create_app(service: InferenceService, auth: Authenticator, prices: PriceBook, health: Health,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, cors_origins: list[str] | None = None) -> FastAPI:
    api = HttpApi(service, auth, prices, health)
    app = FastAPI(title="sol", summary="OpenAI-compatible HTTP API of sol serve", description=DESCRIPTION,
                  version="1", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.include_router(build_router(api))

    def refused(path: str, code: str) -> None:
        if path in COUNTED:
            api.count("", COUNTED[path], code)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, err: ServiceError) -> JSONResponse:
        return service_error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
        # OpenAI answers a malformed body with 400 (FastAPI's default is 422).
        refused(request.url.path, "INVALID_ARGUMENT")
        message, param = _validation_message(err)
        return error_response(400, message, "invalid_request_error", "invalid_argument", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = HTTP_TO_CODE.get(err.status_code, "UNKNOWN")
        message = str(err.detail)
        if err.status_code == 404:
            message = (f"no such endpoint: {request.method} {request.url.path} (see /openapi.json; "
                       "the API is under /v1)")
        elif err.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(err.status_code, message, "invalid_request_error", code.lower())

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(PLAYGROUND / "index.html")

    app.mount("/playground", StaticFiles(directory=PLAYGROUND), name="playground")
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, on_refused=lambda path: refused(path, "INVALID_ARGUMENT"))
    if cors_origins:
        # Outermost (added last): preflights are answered before any other layer, and
        # refusals carry the CORS headers too, so a page can read the error. Keys travel
        # in the Authorization header, never in cookies: no credentials mode.
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=CORS_REQUEST_HEADERS, expose_headers=CORS_EXPOSED_HEADERS, max_age=600)
    return app
