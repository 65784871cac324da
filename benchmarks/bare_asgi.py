"""A bare ASGI app answering POST /recommend as the service does, without BentoML: BentoML's share of the HTTP cost.

bench_service.py serves this beside `bentoml serve` of the same project and loads both with the same wrk run. It
does what the service's /recommend does per request (the same request model validates the body, the same
`OnlineRecommender.recommend` scores, the same response model writes the answer) on plain Starlette under uvicorn
with uvicorn's defaults (uvloop, httptools: what BentoML's worker runs), one process, no middleware. Known users
only: no recent_events, no Redis.

    python benchmarks/bare_asgi.py PROJECT --port 3001
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import gc
import tempfile
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from recflow.config import load_settings
from recflow.ops.registry import load_production_bundle
from recflow.serving.online import OnlineRecommender
from recflow.serving.schemas import RecommendResponse, ScoredItem, request_models
from recflow.serving.userstate import LocalUserState


def app(project: Path, state_dir: Path) -> Starlette:
    settings = load_settings(project / "params.yaml")
    config = settings.service.resolved(os.environ)
    request_model = request_models(settings.events, config).recommend
    version, bundle = load_production_bundle(settings, project)
    state = LocalUserState(state_dir / "state.jsonl")
    recommender = OnlineRecommender(bundle, version.tag, state, settings.events)
    gc.collect()
    gc.freeze()  # as the service does after loading a model

    async def recommend(request: Request) -> Response:
        ask = request_model.model_validate_json(await request.body())
        answer = recommender.recommend(ask.user_id, ask.k, exclude_seen=ask.exclude_seen)
        items = [ScoredItem(item_id=i, score=s) for i, s in answer.items]
        body = RecommendResponse(user_id=answer.user_id, items=items, model_version=recommender.version,
                                 strategy=answer.strategy)  # fmt: skip
        return Response(body.model_dump_json(), media_type="application/json")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ready": True})

    return Starlette(routes=[Route("/recommend", recommend, methods=["POST"]), Route("/healthz", healthz)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("project", type=Path, help="a project with a deployed version (bench_service.py builds one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3001)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bare-asgi-") as state_dir:
        uvicorn.run(app(args.project, Path(state_dir)), host=args.host, port=args.port, log_level="warning",
                    access_log=False, server_header=False)  # fmt: skip


if __name__ == "__main__":
    main()
