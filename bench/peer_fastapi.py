"""Peer (B) of the tokenwire benchmark: the usual way to put an LLM stream on the web.

A FastAPI app served by uvicorn (uvloop event loop, httptools parser) that proxies Ollama's
NDJSON ``/api/generate`` and re-emits each upstream token as one Server-Sent Event::

    data: {"text": "<token>", "done": false}\n\n

and a final event with ``"done": true`` and the engine's figures. It is written as a
competent engineer would write it, not as a straw man: one shared ``httpx.AsyncClient``
(connection pool sized for 1000 streams), orjson for parsing and encoding (the same JSON
library tokenwire uses), ``async with client.stream(...)`` so that when the caller goes away
Starlette cancels the generator and the upstream response is closed, which is how Ollama
learns to stop.

    python bench/peer_fastapi.py --listen 127.0.0.1:8001 --ollama-url http://127.0.0.1:11434
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask


def build_app(ollama_url: str, max_connections: int = 2000) -> FastAPI:
    state: dict[str, httpx.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["client"] = httpx.AsyncClient(
            base_url=ollama_url,
            timeout=httpx.Timeout(connect=5.0, read=None, write=30.0, pool=None),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
            trust_env=False,
        )
        try:
            yield
        finally:
            await state["client"].aclose()

    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    @app.post("/v1/generate")
    async def generate(request: Request) -> StreamingResponse:
        body: dict[str, Any] = orjson.loads(await request.body())
        payload = {"model": body.get("model", ""), "prompt": body.get("prompt", ""),
                   "stream": True}
        client = state["client"]
        upstream = await client.send(
            client.build_request("POST", "/api/generate", content=orjson.dumps(payload)),
            stream=True,
        )
        if upstream.status_code != 200:
            detail = (await upstream.aread()).decode("utf-8", "replace")
            await upstream.aclose()
            raise HTTPException(status_code=502,
                                detail=f"upstream {upstream.status_code}: {detail}")

        async def events() -> AsyncIterator[bytes]:
            try:
                async for line in upstream.aiter_lines():
                    if not line:
                        continue
                    chunk = orjson.loads(line)
                    if "error" in chunk:
                        error = orjson.dumps({"error": chunk["error"]})
                        yield b"event: error\ndata: " + error + b"\n\n"
                        return
                    event: dict[str, Any] = {"text": chunk.get("response", ""),
                                             "done": bool(chunk.get("done"))}
                    if event["done"]:
                        event["done_reason"] = chunk.get("done_reason")
                        event["eval_count"] = chunk.get("eval_count")
                    yield b"data: " + orjson.dumps(event) + b"\n\n"
            finally:
                # Runs on normal end, on error, and when Starlette cancels us because the
                # caller disconnected: closing mid-body drops the upstream connection.
                await upstream.aclose()

        # The background task also closes the upstream when the caller left before the
        # body started (the generator then never runs, so its finally cannot).
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(upstream.aclose))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8001")
    parser.add_argument("--ollama-url", default="http://127.0.0.1:11434")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    if not ipaddress.ip_address(host).is_loopback:
        parser.error("the benchmark peer listens on loopback only")
    uvicorn.run(build_app(args.ollama_url), host=host, port=int(port), loop="uvloop",
                http="httptools", access_log=False, log_level="warning", backlog=4096)


if __name__ == "__main__":
    main()
