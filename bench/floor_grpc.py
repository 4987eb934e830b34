"""The grpc.aio floor (path G of the benchmark): what one Python grpc.aio process costs
when it only writes tokens, with no upstream to read and nothing else per call.

It serves tokenwire.v1.GenerationService/Generate with the same prompt words as the Go
upstream (``tokens=N interval_us=U``) and the same token text (a space and the emission
time in Unix ns as 16 hex digits), so the compiled reader measures it exactly as it
measures tokenwire. Each stream is one task that sleeps until the next token is due and
writes one Token per token, then a final ``done`` message: the least a gRPC token
streamer in Python does. It is a reference for "close to the floor", not a product.

    python bench/floor_grpc.py --listen 127.0.0.1:50060
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time

import grpc
import uvloop

from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1 import generation_pb2_grpc as pb_grpc


def _words(prompt: str) -> tuple[int, float]:
    tokens, interval_us = 256, 0.0
    for word in prompt.split():
        key, _, value = word.partition("=")
        if key == "tokens":
            tokens = int(value)
        elif key == "interval_us":
            interval_us = float(value)
    return tokens, interval_us / 1e6


class Floor(pb_grpc.GenerationServiceServicer):
    async def Generate(self, request: pb.GenerateRequest,  # type: ignore[override]
                       context: grpc.aio.ServicerContext) -> None:
        tokens, interval = _words(request.prompt)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(tokens):
            if interval:
                delay = start + i * interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            await context.write(pb.Token(text=f" {time.time_ns():016x}", chunk_count=1))
        await context.write(pb.Token(done=True, finish_reason=pb.FINISH_REASON_STOP))


async def serve(listen: str) -> None:
    server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 2048)])
    pb_grpc.add_GenerationServiceServicer_to_server(Floor(), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(listen)
    await server.start()
    gc.collect()  # the same collector settings as tokenwire-server
    gc.freeze()
    gc.set_threshold(20_000, *gc.get_threshold()[1:])
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:50060")
    args = parser.parse_args()
    uvloop.run(serve(args.listen))


if __name__ == "__main__":
    main()
