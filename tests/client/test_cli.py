"""The ``tokenwire`` CLI, run in-process through ``main`` against the sync test server."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from google.protobuf import json_format

from tokenwire.client._cli import main
from tokenwire.v1 import generation_pb2

from .conftest import Served

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(sync_server: Served, capsys: pytest.CaptureFixture[str]) -> Run:
    """``run(*argv, stdin=None)`` -> (exit code, stdout, stderr)."""

    def run_cli(*argv: str, stdin: str | None = None) -> tuple[int, str, str]:
        if stdin is not None:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr("sys.stdin", io.StringIO(stdin))
                code = main(["--target", sync_server.target, *argv])
        else:
            code = main(["--target", sync_server.target, *argv])
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    return run_cli


def test_generate_streams_text_and_prints_stats(run: Run) -> None:
    code, out, err = run("generate", "tiny", "hi")
    assert code == 0
    assert out == "echo: hi\n"
    assert "2 tokens" in err
    assert "first token 12 ms" in err
    assert "42.5 tokens/s" in err
    assert "finish STOP" in err
    assert "upstream gpu2 (2 attempts)" in err
    assert "request id req-test-1" in err


def test_generate_quiet_and_prompt_from_stdin(run: Run) -> None:
    code, out, err = run("generate", "-q", "tiny", stdin="from stdin")
    assert (code, out, err) == (0, "echo: from stdin\n", "")
    assert run("generate", "-q", "tiny", "-", stdin="dash")[1] == "echo: dash\n"


def test_generate_json_prints_one_token_per_line(run: Run) -> None:
    code, out, _ = run("generate", "--json", "tiny", "hi")
    assert code == 0
    tokens = [json_format.Parse(line, generation_pb2.Token()) for line in out.splitlines()]
    assert [t.text for t in tokens] == ["echo: ", "hi", ""]
    assert tokens[-1].done and tokens[-1].usage.completion_tokens == 2


def test_thinking_goes_to_stderr(run: Run) -> None:
    code, out, err = run("generate", "thinker", "hi")
    assert code == 0
    assert out == "Calling a tool.\n"
    assert "Let me think. " in err


def test_generation_flags_reach_the_request(run: Run, sync_server: Served) -> None:
    flags = "--system brief --temperature 0 --top-p 0.5 --top-k 7 --max-tokens 9 --stop a"
    flags += " --stop b --seed 42 --num-ctx 512 --format json --think-level high --keep-alive -1"
    assert run("generate", *flags.split(), "tiny", "hi")[0] == 0
    request = sync_server.seen.requests[-1]
    assert request.system == "brief"
    options = request.options
    assert options.HasField("temperature") and options.temperature == 0
    assert (options.top_p, options.top_k, options.max_tokens) == (0.5, 7, 9)
    assert (list(options.stop), options.seed, options.num_ctx) == (["a", "b"], 42, 512)
    assert request.format.json
    assert request.think == generation_pb2.THINK_HIGH
    assert request.keep_alive.seconds == -1
    assert run("generate", "--no-think", "tiny", "hi")[0] == 0
    assert sync_server.seen.requests[-1].think == generation_pb2.THINK_DISABLED
    assert not sync_server.seen.requests[-1].HasField("options")
    assert run("generate", "--think", "tiny", "hi")[0] == 0  # the flag takes no value
    assert sync_server.seen.requests[-1].think == generation_pb2.THINK_ENABLED


def test_format_schema_file(run: Run, sync_server: Served, tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    text = json.dumps({"type": "object", "properties": {"z": {}, "a": {}}, "required": ["z"]},
                      indent=2)
    schema.write_text(text)
    assert run("generate", "--format", str(schema), "tiny", "hi")[0] == 0
    assert sync_server.seen.requests[-1].format.json_schema_text == text  # as written
    code, _, err = run("generate", "--format", str(tmp_path / "nope.json"), "tiny", "hi")
    assert code == 2 and "cannot read" in err
    for content, says in ((b'{"type": ', "not a JSON file"), (b"\xff{}", "not a JSON file"),
                          (b"[1]", "must hold a JSON Schema object")):
        schema.write_bytes(content)
        code, _, err = run("generate", "--format", str(schema), "tiny", "hi")
        assert code == 2 and says in err, err


def test_not_found_prints_status_and_exits_1(run: Run) -> None:
    code, out, err = run("generate", "missing", "hi")
    assert code == 1
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == "tokenwire: NOT_FOUND: model 'missing' not found"
    assert "  reason: MODEL_NOT_FOUND" in lines
    assert "  request id: req-test-1" in lines


def test_invalid_argument_prints_field_violations(run: Run) -> None:
    code, _, err = run("generate", "bad", "hi")
    assert code == 1
    assert err.splitlines()[:2] == [
        "tokenwire: INVALID_ARGUMENT: invalid request",
        "  prompt: must not be empty",
    ]


def test_mid_stream_failure_keeps_printed_text(run: Run) -> None:
    code, out, err = run("generate", "flaky", "hi")
    assert code == 1
    assert out == "partial answer\n"
    assert "tokenwire: UNAVAILABLE: engine went away" in err
    assert "  retry after: 0.5 s" in err


def test_timeout_flag(run: Run) -> None:
    code, _, err = run("--timeout", "0.3", "generate", "forever", "go")
    assert code == 1
    assert "DEADLINE_EXCEEDED" in err


def test_metadata_flag(run: Run, sync_server: Served) -> None:
    code, _, err = run(
        "--metadata", "x-request-id=cli-1", "--metadata", "a=b=c", "generate", "tiny", "hi"
    )
    assert code == 0 and "request id cli-1" in err
    assert sync_server.seen.metadata[-1]["a"] == "b=c"
    assert run("--metadata", "novalue", "models")[0] == 2


def test_chat_reads_one_turn_per_line_and_keeps_history(run: Run) -> None:
    code, out, _ = run("chat", "tiny", stdin="hello\n\nagain\n")
    assert code == 0
    assert out == "echo: hello [1]\necho: again [3]\n"
    code, out, _ = run("chat", "--system", "be brief", "tiny", stdin="hello\n")
    assert out == "echo: hello [2]\n"


def test_chat_ctrl_c_cancels_the_answer_and_drops_the_turn(
    run: Run, sync_server: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    class InterruptFirstWrite(io.StringIO):
        armed = True

        def write(self, text: str) -> int:
            if self.armed:
                self.armed = False
                raise KeyboardInterrupt
            return super().write(text)

    monkeypatch.setattr("sys.stdout", InterruptFirstWrite())
    code, _, err = run("chat", "forever", stdin="first\n")
    assert code == 0
    assert "interrupted" in err
    assert sync_server.seen.interrupted.wait(5)

    screen = InterruptFirstWrite()
    monkeypatch.setattr("sys.stdout", screen)
    assert run("chat", "tiny", stdin="first\nsecond\n")[0] == 0
    assert screen.getvalue() == "echo: second [1]\n"


def test_chat_failure_stops_when_not_interactive(run: Run) -> None:
    code, _, err = run("chat", "missing", stdin="hello\n")
    assert code == 1
    assert err.startswith("tokenwire: NOT_FOUND")


def test_models_table(run: Run) -> None:
    code, out, _ = run("models")
    assert code == 0
    header, first, second = out.splitlines()
    assert header.split() == ["NAME", "SIZE", "FAMILY", "PARAMS", "QUANTIZATION", "UPSTREAMS"]
    assert first.split() == ["tiny:latest", "91.0", "MB", "llama", "134.52M", "Q4_1",
                             "gpu1,gpu2"]
    assert second.split() == ["thinker:1b", "1.3", "GB", "qwen3", "hosted"]
    assert second.index("hosted") == header.index("UPSTREAMS")  # in its column


def test_health(run: Run) -> None:
    assert run("health")[:2] == (0, "SERVING\n")
    assert run("health", "tokenwire.v1.GenerationService")[0] == 0
    assert run("health", "down")[:2] == (3, "NOT_SERVING\n")
    code, _, err = run("health", "nope")
    assert code == 1 and err.startswith("tokenwire: NOT_FOUND")


def test_embed_prints_json(run: Run) -> None:
    code, out, _ = run("embed", "emb", "ab", "abc")
    assert code == 0
    assert json.loads(out) == [[2.0, 0.5], [3.0, 0.5]]


def test_usage_errors_exit_2(run: Run, tmp_path: Path) -> None:
    assert run()[0] == 2
    assert run("generate", "--think-level", "extreme", "tiny", "hi")[0] == 2
    code, _, err = run("--ca-file", str(tmp_path / "missing.pem"), "models")
    assert code == 2 and "cannot read" in err


def test_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", "127.0.0.1:1", "--timeout", "5", "models"]) == 1
    assert capsys.readouterr().err.startswith("tokenwire: UNAVAILABLE")


def test_options_work_after_the_command(sync_server: Served,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`tokenwire generate --target HOST:PORT MODEL PROMPT`: the options of every command
    mean the same after its name; metadata given on both sides is all sent."""
    argv = ["--metadata", "a=before", "generate", "--target", sync_server.target, "--json",
            "--timeout", "30", "--metadata", "x-request-id=after-1", "tiny", "hi"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert '"text": "echo: "' in out.splitlines()[0]  # --json after the command
    assert "request id after-1" in err
    assert sync_server.seen.metadata[-1]["a"] == "before"
    assert main(["models", "--target", sync_server.target]) == 0
    assert "tiny:latest" in capsys.readouterr().out
    # an option given before the command is kept when the command gives others
    assert main(["--target", sync_server.target, "health", "--timeout", "5"]) == 0


def test_errors_after_the_command_blame_that_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--timeout", "soon", "tiny", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: tokenwire generate ")
    assert "tokenwire generate: error: argument --timeout: invalid float value: 'soon'" in err
    assert main(["models", "--metadata", "novalue"]) == 2
    assert "argument --metadata: expected KEY=VALUE, got 'novalue'" in capsys.readouterr().err
    assert main(["generate", "tiny", "hi", "--target"]) == 2
    assert "argument --target: expected one argument" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["argument", "stdin", "dash", "blank"])
def test_an_empty_prompt_is_a_usage_error(run: Run, sync_server: Served, how: str) -> None:
    calls = len(sync_server.seen.requests)
    code, out, err = {
        "argument": lambda: run("generate", "tiny", ""),
        "stdin": lambda: run("generate", "tiny", stdin=""),
        "dash": lambda: run("generate", "tiny", "-", stdin=""),
        "blank": lambda: run("generate", "tiny", " \n\t"),
    }[how]()
    assert (code, out) == (2, "")
    assert err.startswith("usage: tokenwire generate ")
    assert "tokenwire generate: error: the prompt " in err
    assert "run `tokenwire load tiny`" in err  # how to load the model on purpose
    assert len(sync_server.seen.requests) == calls  # nothing was sent


def test_json_uses_the_proto_field_names(run: Run) -> None:
    """As grpcurl prints them (protojson's UseProtoNames), so a jq script reads both."""
    code, out, _ = run("--json", "generate", "tiny", "hi")
    assert code == 0
    final = json.loads(out.splitlines()[-1])
    assert final["finish_reason"] == "FINISH_REASON_STOP"
    assert final["usage"]["completion_tokens"] == 2
    assert "chunkCount" not in out and "finishReason" not in out
    code, out, _ = run("models", "--json")
    models = json.loads(out)["models"]
    assert models[0]["name"] == "tiny:latest"
    assert models[0]["size_bytes"] == "91000000"  # int64 as a string, as in protojson
    assert models[0]["quantization_level"] == "Q4_1"
    assert json.loads(run("health", "--json")[1]) == {"status": "SERVING"}
    assert json.loads(run("embed", "--json", "emb", "ab")[1]) == {
        "embeddings": [{"values": [2.0, 0.5]}]}
