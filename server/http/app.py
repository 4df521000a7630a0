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
COUNTED = {"/v1/chat/completions": "ChatCompletion", "/v1/completions": "Completion", "/v1/models": "ListModels"}

DESCRIPTION = """OpenAI-compatible API of a sol server: the same API keys (`Authorization: Bearer <key>`),
budgets, rate limits, ledger and engines as its gRPC API. Send `Idempotency-Key` (or `X-Request-Id`)
to make a request idempotent: it is billed once, and a repeat gets 409. Usage always carries
`prompt_tokens_details.cached_tokens`; the `sol` field carries the cost and the model version."""


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    problems, param = [], None
    for e in err.errors():
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        if e.get("type") == "json_invalid":
            return f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')}); send a JSON " \
                   "object", None
        where = ".".join(loc)
        param = param or where or None
        problems.append(f"{where}: {e.get('msg', 'invalid')}" if where else e.get("msg", "invalid"))
    return "; ".join(problems) or "invalid request body", param


def create_app(service: InferenceService, auth: Authenticator, prices: PriceBook, health: Health,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
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
    return app
