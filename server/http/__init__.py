"""The OpenAI-compatible HTTP adapter: a second thin protocol adapter (beside the gRPC
servicer) over the one request path, `server.inference.InferenceService`.

    app.py        the FastAPI application factory (routes, error handlers, limits, playground)
    server.py     uvicorn embedded in the App's event loop (no signal handlers of its own)
    routes.py     the endpoints: authenticate, map, call the service, count
    schemas.py    request bodies (Pydantic: validation and the OpenAPI document)
    responses.py  OpenAI's response and stream-chunk shapes, built from the service's types
    errors.py     ServiceError -> OpenAI's error JSON and HTTP status
    limits.py     the request body size limit (413)
    playground/   the static chat page served at /
"""
