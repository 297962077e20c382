"""The app `run_study.py ui` serves (`mlflow server --app-name harness-ui`, registered in
pyproject.toml under MLflow's `mlflow.app` entry points, the way its own `basic-auth` app is):
MLflow's own server app, unchanged but for its landing page, whose first-visit defaults are set
for training runs.

MLflow 3.17's UI keeps three choices in the browser's local storage, with no server setting:
the view (GenAI or "Model training", default GenAI: a run or registry page opened from a link
lands among Traces, Judges and "Evaluation runs"), the Assistant panel (open on a quarter of
every page) and the "new Model Registry UI" pop-up. The landing page sets the training view, a
closed panel and a dismissed pop-up where the browser has no choice of its own yet: a person
who picks GenAI or opens the panel keeps that choice.
"""

from __future__ import annotations

import json

# Local-storage keys of MLflow 3.17's UI (its `useLocalStorage` hook stores `KEY_vN` as JSON).
UI_DEFAULTS = {
    "mlflow.workflowType_v1": "machine_learning",
    "mlflow.assistant.panelOpen_v1": False,
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
    "_mlflow_model_registry_promo_modal_dismissed_v1": True,
}


def defaults_script() -> str:
    """A script that stores each of `UI_DEFAULTS` the browser has not stored yet."""
    return (
        "<script>(function(d){for(var k in d){try{if(localStorage.getItem(k)===null)"
        "{localStorage.setItem(k,JSON.stringify(d[k]))}}catch(e){}}})("
        + json.dumps(UI_DEFAULTS)
        + ");</script>"
    )


def landing_page(index_html: str) -> str:
    """MLflow's index.html with `defaults_script` first in its head (before the UI's code)."""
    head = index_html.find("<head>")
    if head < 0:
        raise ValueError("MLflow's index.html has no <head>: the UI defaults cannot be set")
    at = head + len("<head>")
    return index_html[:at] + defaults_script() + index_html[at:]


def create_app():
    """MLflow's FastAPI app with its landing page (`/`) served by `landing_page`; every other
    path (the REST API, the UI's files, the artifacts) is MLflow's own."""
    from pathlib import Path

    from mlflow.server import app as flask_app
    from mlflow.server.fastapi_app import app
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    index = Path(flask_app.static_folder) / "index.html"
    page = landing_page(index.read_text())

    async def landing(request):
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    # Before MLflow's catch-all mount of its Flask app at "/", which would answer first.
    app.router.routes.insert(0, Route("/", landing, methods=["GET", "HEAD"]))
    return app
