"""The ``tokenwire`` command: a thin shell over ``tokenwire.client.Client``.

It parses flags, calls the client, and prints; every behaviour it has is the library's.
The options of every command (``--target``, TLS, metadata, ``--json``...) may come before
or after the command's name, with the same meaning. ``--json`` prints messages as grpcurl
does (proto field names, enum names), so one ``jq`` script reads both.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from tokenwire.client._channel import DEFAULT_SERVICE_CONFIG, ServiceConfigLike
from tokenwire.client._errors import TokenwireError
from tokenwire.client._sync import Client, TokenStream
from tokenwire.client._types import Completion, FormatLike, MessageLike
from tokenwire.v1 import generation_pb2

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_SERVING = 3
EXIT_INTERRUPTED = 130
#: What a shell shows for a process that SIGPIPE ended (128 + 13), as ``cat`` or ``grep``
#: end when the reader of their output goes away: a pipeline under ``set -o pipefail``
#: treats the CLI as it treats them, and the status differs from a failed call's (1).
EXIT_BROKEN_PIPE = 141

_EPILOG = f"""\
exit codes:
  {EXIT_OK}    success
  {EXIT_FAILED}    the call failed: the gRPC status, its message and details go to stderr
  {EXIT_USAGE}    usage error (bad flag, unreadable file)
  {EXIT_NOT_SERVING}    health: the service is not SERVING
  {EXIT_INTERRUPTED}  generate was interrupted (Ctrl-C); the call is cancelled
  {EXIT_BROKEN_PIPE}  the reader of stdout went away (e.g. `| head -1`); the call is cancelled

The options above (--target ... --json) work after the command too:
  tokenwire generate --target host:50051 --json MODEL PROMPT
"""
_CHAT_HELP = """\
Interactive chat: one user turn per line, the answer streams back; the conversation
history is kept and sent with each turn. Ctrl-C during an answer cancels it, and the
interrupted turn (question and partial answer) is dropped from the history; Ctrl-C or
Ctrl-D at the prompt exits. When stdin is not a terminal, each line is one turn, and a
failed turn stops the command."""
_OPTION_FLAGS = ("temperature", "top_p", "top_k", "max_tokens", "stop", "seed", "num_ctx")
_DIM, _RESET = "\x1b[2m", "\x1b[0m"

Handler = Callable[[Client, argparse.Namespace], int]


class _UsageError(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse reported
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    args.metadata += args.metadata_after
    try:
        with _client(args) as client:
            handler: Handler = args.handler
            return handler(client, args)
    except TokenwireError as exc:
        _print_error(exc)
        return EXIT_FAILED
    except _UsageError as exc:  # as argparse words its own: usage, then the error
        command: argparse.ArgumentParser = args.command_parser
        command.print_usage(sys.stderr)
        print(f"{command.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (`| head -1`). The stream's `with` has cancelled
        # the call and the channel is closed; what is still buffered goes to /dev/null,
        # so that Python's flush at exit cannot print a traceback of its own.
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _generate(client: Client, args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt in (None, "-") else args.prompt
    if not prompt.strip():
        where = "on stdin" if args.prompt in (None, "-") else "as its argument"
        raise _UsageError(
            f"the prompt {where} is empty; give the text to complete. (An empty prompt asks "
            f"the server only to load the model: to do that on purpose, run "
            f"`tokenwire load {args.model}`.)")
    stream = client.generate(args.model, prompt, system=args.system, **_request_params(args),
                             resumable=args.resumable)
    return _print_stream(stream, args)


def _load(client: Client, args: argparse.Namespace) -> int:
    """An empty prompt: the server loads the model (keep_alive 0: unloads it)."""
    stream = client.generate(args.model, "", keep_alive=args.keep_alive)
    out = _TokenPrinter(args.json)
    out.show(stream)
    if not args.json:
        reason = stream.completion.finish_reason_name
        print({"LOAD": f"loaded {args.model}", "UNLOAD": f"unloaded {args.model}"}.get(
            reason, f"{args.model}: finish {reason}"))
    return EXIT_OK


def _resume(client: Client, args: argparse.Namespace) -> int:
    return _print_stream(client.resume(args.stream_id, args.after), args)


def _cancel(client: Client, args: argparse.Namespace) -> int:
    stopped = client.cancel(args.stream_id)
    if args.json:
        _print_json(generation_pb2.CancelResponse(stopped=stopped))
    else:
        print("stopped" if stopped else "already ended (finished, failed or cancelled before)")
    return EXIT_OK


def _print_stream(stream: TokenStream, args: argparse.Namespace) -> int:
    out = _TokenPrinter(args.json)
    try:
        out.show(stream)
    except KeyboardInterrupt:
        out.end_line()
        if stream.stream_id is not None:
            print(f"tokenwire: interrupted; the stream goes on for its detach grace: "
                  f"`tokenwire resume {stream.stream_id} --after {stream.position}` continues "
                  f"it, `tokenwire cancel {stream.stream_id}` stops it", file=sys.stderr)
        else:
            print("tokenwire: interrupted; the call was cancelled", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not args.quiet:
        print(_stats(stream.completion), file=sys.stderr)
    return EXIT_OK


def _chat(client: Client, args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    history: list[MessageLike] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    out = _TokenPrinter(args.json)
    while (line := _read_turn(interactive)) is not None:
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        stream = client.chat(args.model, history, **_request_params(args))
        try:
            out.show(stream)
        except KeyboardInterrupt:
            history.pop()
            print("[interrupted: turn dropped from the history]", file=sys.stderr)
            continue
        except TokenwireError as exc:
            history.pop()
            if not interactive:
                raise
            _print_error(exc)
            continue
        history.append(stream.completion.to_message())
    return EXIT_OK


def _models(client: Client, args: argparse.Namespace) -> int:
    if args.json:
        _print_json(generation_pb2.ListModelsResponse(models=client.list_models()))
        return EXIT_OK
    rows = [("NAME", "SIZE", "FAMILY", "PARAMS", "QUANTIZATION", "UPSTREAMS")]
    rows += [
        (m.name, _size(m.size_bytes), m.family, m.parameter_size, m.quantization_level,
         ",".join(m.upstreams))
        for m in client.list_models()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return EXIT_OK


def _health(client: Client, args: argparse.Namespace) -> int:
    status = client.health(args.service)
    if args.json:
        _print_json(health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.ServingStatus.Value(status)))
    else:
        print(status)
    return EXIT_OK if status == "SERVING" else EXIT_NOT_SERVING


def _embed(client: Client, args: argparse.Namespace) -> int:
    vectors = client.embed(args.model, args.texts, dimensions=args.dimensions)
    if args.json:  # the EmbedResponse's embeddings (the client returns the vectors alone)
        _print_json(generation_pb2.EmbedResponse(
            embeddings=[generation_pb2.Embedding(values=v) for v in vectors]))
    else:
        print(json.dumps(vectors))
    return EXIT_OK


class _TokenPrinter:
    """Streams tokens to stdout (text, or one JSON object per line), thinking to stderr."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.open_line = False

    def show(self, stream: TokenStream) -> None:
        told = False
        try:
            with stream:
                for token in stream:
                    if not told and stream.stream_id is not None:
                        told = True  # before the text, so that a kill cannot lose it
                        print(f"tokenwire: stream id {stream.stream_id}", file=sys.stderr,
                              flush=True)
                    self._token(token)
        finally:
            self.end_line()

    def _token(self, token: generation_pb2.Token) -> None:
        if self.as_json:
            _write(sys.stdout, _json(token) + "\n")
            return
        if token.thinking:
            dim = sys.stderr.isatty()
            _write(sys.stderr, f"{_DIM}{token.thinking}{_RESET}" if dim else token.thinking)
        if token.text:
            _write(sys.stdout, token.text)
            self.open_line = not token.text.endswith("\n")

    def end_line(self) -> None:
        if self.open_line:
            _write(sys.stdout, "\n")
            self.open_line = False


def _json(message: Message) -> str:
    """One line of JSON as grpcurl prints a message: proto field names (``chunk_count``,
    not ``chunkCount``), enum names, fields left at their zero value omitted."""
    return json_format.MessageToJson(message, indent=None, preserving_proto_field_name=True,
                                     ensure_ascii=False)


def _print_json(message: Message) -> None:
    _write(sys.stdout, _json(message) + "\n")


def _write(stream: TextIO, text: str) -> None:
    stream.write(text)
    stream.flush()


def _read_turn(interactive: bool) -> str | None:
    if not interactive:
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None
    try:
        return input("> ")
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
        return None


def _request_params(args: argparse.Namespace) -> dict[str, Any]:
    options = {name: getattr(args, name) for name in _OPTION_FLAGS}
    return {
        "options": {k: v for k, v in options.items() if v is not None} or None,
        "format": _format(args.format),
        "keep_alive": args.keep_alive,
        "think": args.think,
    }


def _format(value: str | None) -> FormatLike | None:
    """``json``, or a JSON Schema file sent as its text (key order as written in the file)."""
    if value is None:
        return None
    if value == "json":
        return "json"
    try:
        text = (_read_bytes(value) or b"").decode("utf-8")
        schema = json.loads(text)
    except ValueError as exc:  # not UTF-8, or not JSON
        raise _UsageError(f"--format {value}: not a JSON file ({exc})") from None
    if not isinstance(schema, dict):
        raise _UsageError(f"--format {value}: the file must hold a JSON Schema object")
    return generation_pb2.Format(json_schema_text=text)


def _client(args: argparse.Namespace) -> Client:
    config: ServiceConfigLike = DEFAULT_SERVICE_CONFIG
    if args.service_config == "none":
        config = None
    elif args.service_config is not None:
        config = (_read_bytes(args.service_config) or b"").decode("utf-8", "replace")
    try:
        return Client(args.target, tls=args.tls, root_certificates=_read_bytes(args.ca_file),
                      metadata=args.metadata, timeout=args.timeout, service_config=config)
    except json.JSONDecodeError as exc:
        raise _UsageError(f"--service-config {args.service_config}: not JSON ({exc})") from None
    except ValueError as exc:  # a list of addresses gRPC cannot resolve
        raise _UsageError(f"--target: {exc}") from None


def _read_bytes(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise _UsageError(f"cannot read {path}: {exc.strerror}") from None


def _stats(completion: Completion) -> str:
    parts = []
    usage = completion.usage
    if usage.proto.ByteSize():
        parts.append(f"{usage.completion_tokens} tokens")
        if usage.proto.HasField("time_to_first_token"):
            parts.append(f"first token {usage.time_to_first_token * 1000:.0f} ms")
        rate = usage.eval_tokens_per_second or usage.tokens_per_second
        if rate:
            parts.append(f"{rate:.1f} tokens/s")
    parts.append(f"finish {completion.finish_reason_name}")
    if completion.upstream:
        attempts = completion.attempts
        parts.append(f"upstream {completion.upstream} ({attempts} attempt"
                     f"{'' if attempts == 1 else 's'})")
    if completion.request_id:
        parts.append(f"request id {completion.request_id}")
    return "[" + ", ".join(parts) + "]"


def _print_error(exc: TokenwireError) -> None:
    lines = [f"tokenwire: {exc}"]
    lines += [f"  {field}: {description}" for field, description in exc.field_violations]
    if exc.error_info is not None and exc.error_info.reason:
        lines.append(f"  reason: {exc.error_info.reason}")
    if exc.retry_after is not None:
        lines.append(f"  retry after: {exc.retry_after:g} s")
    if exc.request_id:
        lines.append(f"  request id: {exc.request_id}")
    print("\n".join(lines), file=sys.stderr)


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _metadata_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _version() -> str:
    try:
        return importlib.metadata.version("tokenwire")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown (not installed)"


def _add_call_options(parser: argparse.ArgumentParser, *, after: bool) -> None:
    """The options of every command, on the main parser and (``after``) on each
    command's: given there they mean the same, and those not given leave what was
    given before the command (argparse copies only what a command's parser set)."""
    group = parser.add_argument_group("options of every command (before or after its name)")

    def default(value: object) -> object:
        return argparse.SUPPRESS if after else value

    group.add_argument(
        "--target", default=default(None),
        help="server host:port, a gRPC target (dns:///name:port: every address of the "
             "name), or replicas' IP:port addresses separated by commas (default: "
             "$TOKENWIRE_TARGET, else 127.0.0.1:50051)")
    group.add_argument(
        "--service-config", metavar="FILE|none", default=default(None),
        help="gRPC service config (JSON file) of the channel; none: gRPC's defaults. Not "
             "given: the client's own (round robin over the target's addresses, retry of "
             "calls that failed UNAVAILABLE before their first token)")
    group.add_argument("--tls", action="store_true", default=default(False),
                       help="connect with TLS")
    group.add_argument("--ca-file", default=default(None),
                       help="PEM root certificates to verify the server (implies --tls)")
    group.add_argument("--timeout", type=float, default=default(None),
                       help="deadline of each call, in seconds")
    group.add_argument(
        "--metadata", action="append", type=_metadata_pair, metavar="KEY=VALUE",
        dest="metadata_after" if after else "metadata", default=default([]),
        help="metadata sent with every call, e.g. 'authorization=Bearer TOKEN' (repeatable)")
    group.add_argument(
        "--json", action="store_true", default=default(False),
        help="print replies as JSON with the proto field names, as grpcurl does: one Token "
             "per line (generate, chat, resume, load), or the reply message (models, health, "
             "embed, cancel)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenwire",
        description="Stream LLM tokens from a tokenwire gateway.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _add_call_options(parser, after=False)
    parser.set_defaults(metadata_after=[], command_parser=parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, *, parents: tuple[argparse.ArgumentParser, ...]
                = (), **kwargs: Any) -> argparse.ArgumentParser:
        cmd = commands.add_parser(name, parents=list(parents), **kwargs)
        _add_call_options(cmd, after=True)
        cmd.set_defaults(handler=handler, command_parser=cmd)
        return cmd

    generation = argparse.ArgumentParser(add_help=False)
    group = generation.add_argument_group("generation options")
    group.add_argument("--system", help="system prompt")
    group.add_argument("--temperature", type=float)
    group.add_argument("--top-p", type=float)
    group.add_argument("--top-k", type=int)
    group.add_argument("--max-tokens", type=int, help="tokens to generate at most (-1: no limit)")
    group.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    group.add_argument("--seed", type=int)
    group.add_argument("--num-ctx", type=int, help="context window, in tokens")
    group.add_argument(
        "--format", metavar="json|SCHEMA_FILE",
        help="answer as JSON: any JSON, or matching the JSON Schema in the file (its "
             "property order kept)")
    group.add_argument(
        "--think", action="store_const", const=True, help="let the model think before answering"
    )
    group.add_argument("--no-think", dest="think", action="store_const", const=False)
    group.add_argument(
        "--think-level", dest="think", choices=("low", "medium", "high"), help="thinking effort"
    )
    group.add_argument("--keep-alive", type=float, metavar="SECONDS",
                       help="how long the model stays loaded after the call (<0: forever, "
                            "0: unload it when idle); not given: the server's")

    cmd = command("generate", _generate, parents=(generation,), help="complete one prompt")
    cmd.add_argument("model")
    cmd.add_argument("prompt", nargs="?",
                     help="prompt text, not empty; '-' or omitted: read stdin")
    cmd.add_argument("-q", "--quiet", action="store_true", help="no stats line on stderr")
    cmd.add_argument(
        "--resumable", action="store_true",
        help="make the stream resumable: its id goes to stderr; it survives this command "
             "being killed for the server's detach grace, and resumes by itself when the "
             "connection drops")

    cmd = command("resume", _resume, help="continue a resumable stream")
    cmd.add_argument("stream_id", metavar="ID")
    cmd.add_argument(
        "--after", type=int, default=0, metavar="N",
        help="chunks already received (position + chunk_count of the last Token; default "
             "0: replay from the start)")
    cmd.add_argument("-q", "--quiet", action="store_true", help="no stats line on stderr")

    cmd = command("cancel", _cancel, help="stop a resumable stream")
    cmd.add_argument("stream_id", metavar="ID")

    cmd = command("load", _load, help="load a model into memory without generating (what "
                                      "an empty prompt asks of the server)")
    cmd.add_argument("model")
    cmd.add_argument("--keep-alive", type=float, metavar="SECONDS",
                     help="how long it stays loaded (<0: forever, 0: unload it); not given: "
                          "the server's")

    cmd = command("unload", _load, help="unload a model from memory (as soon as it is idle)")
    cmd.add_argument("model")
    cmd.set_defaults(keep_alive=0.0)

    cmd = command("chat", _chat, parents=(generation,), help="interactive chat",
                  description=_CHAT_HELP)
    cmd.add_argument("model")

    command("models", _models, help="list models and the upstreams that serve them")

    cmd = command("health", _health, help="check serving status (exit 0 only if SERVING)")
    cmd.add_argument("service", nargs="?", default="",
                     help="service name, e.g. tokenwire.v1.GenerationService (default '': "
                          "the whole server)")

    cmd = command("embed", _embed, help="print embedding vectors as JSON")
    cmd.add_argument("model")
    cmd.add_argument("texts", nargs="+", metavar="TEXT")
    cmd.add_argument("--dimensions", type=int, help="truncate vectors to this many dimensions")
    return parser


if __name__ == "__main__":
    sys.exit(main())
