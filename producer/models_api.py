"""The gateway and the model registry (inferlog/registry.py): GET /v1/models and
/v1/models/{id} in OpenAI's shapes, and the check that refuses a request for a model nobody
serves (404) or a task its model does not do (400) before anything is published.

The directory is read on a thread of its own; what is asked here is a dict under a lock, so the
endpoints call it on the event loop. While the directory has not read the topic to its end (a
cluster not reached yet, a topic not created yet) nothing is refused for its model: the request
goes to its model's topics, where a worker of that model answers it once one serves.
"""
from __future__ import annotations

from fastapi import Depends, FastAPI, HTTPException, Path
from fastapi.responses import JSONResponse

from inferlog.errors import RecordError
from inferlog.registry import LiveModel, ModelDirectory, refuse_unserved

from . import openai_api as oai

MODELS = "/v1/models"


def refuse_openai(directory: ModelDirectory, model: str, task: str) -> None:
    """For the OpenAI endpoints: OpenAIError 404 model_not_found / 400 unsupported_task, param "model"."""
    try:
        refuse_unserved(directory, model, task)
    except RecordError as e:
        err = oai.failure(e.reason, e.detail)
        err.param = "model"
        raise err from None


def refuse_submit(directory: ModelDirectory, model: str | None, task: str) -> None:
    """For POST /v1/requests (`model`: the one the request names, else the gateway's own, whose
    topics it goes to): 404 {"detail": {"reason": "UNKNOWN_MODEL", ...}} or 400 UNSUPPORTED_TASK,
    the reason a worker's dead letter would have given."""
    try:
        refuse_unserved(directory, model, task)
    except RecordError as e:
        status, _, code = oai.REASONS[e.reason]
        raise HTTPException(status, {"reason": e.reason, "detail": e.detail, "code": code}) from None


def not_found(model: str) -> JSONResponse:
    err = oai.OpenAIError(f"The model {model!r} does not exist or is not served by any worker", 404,
                          param="model", code="model_not_found")
    return JSONResponse(err.body(), status_code=404)


def add_routes(app: FastAPI, directory: ModelDirectory, tenant) -> None:
    """GET /v1/models and /v1/models/{id}, for callers with credentials (`tenant`: the app's dependency)."""

    @app.get(MODELS, tags=["openai"], responses={401: {}, 403: {}})
    async def list_models(who: str = Depends(tenant)) -> dict:
        """The models at least one live worker serves (OpenAI's list; `task` and `members` are inferlog's)."""
        return {"object": "list", "data": [lm.openai() for lm in directory.live().values()]}

    @app.get(MODELS + "/{model_id:path}", tags=["openai"], responses={404: {}, 401: {}, 403: {}})
    async def get_model(model_id: str = Path(max_length=256), who: str = Depends(tenant)):
        """One served model (OpenAI's object), or 404 model_not_found."""
        lm: LiveModel | None = directory.live().get(model_id)
        return lm.openai() if lm is not None else not_found(model_id)
