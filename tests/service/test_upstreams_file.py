"""The upstreams file: what it accepts, every problem it refuses (naming the file, the
table and the key), reloads, and where keys come from."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tokenwire.service.backends._factory import BackendOptions, build_backend, read_api_key
from tokenwire.service.backends._upstreams import (
    AliasTarget,
    UpstreamsFile,
    UpstreamsFileError,
    parse_upstreams,
    single_upstream,
)

SRC = "/etc/tokenwire/upstreams.toml"

FULL = """
[upstreams.gpu1]
kind = "ollama"
url = "http://10.0.0.5:11434/"
discover = true
discover_interval = 30
slots = 4
weight = 2
priority = 0
failover_timeout = 12.5

[upstreams.gpu2]
kind = "ollama"
url = "http://admin:hunter2@10.0.0.6:11434"
models = ["smollm2:*", "llama3.2"]

[upstreams.hosted]
kind = "openai"
url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"
models = ["gpt-4o-mini"]
priority = 10

[upstreams.local-llama]
kind = "openai"
url = "http://127.0.0.1:8080/v1"
api_key_file = "keys/llama"
models = ["*"]
priority = 5

[aliases]
"chat-small" = [{upstream = "gpu1", model = "smollm2:135m"},
                {upstream = "hosted", model = "gpt-4o-mini"}]
"""


def test_a_full_file_reads_with_its_defaults() -> None:
    config = parse_upstreams(FULL, SRC)
    gpu1, gpu2, hosted, local = config.upstreams
    assert (gpu1.name, gpu1.kind, gpu1.url) == ("gpu1", "ollama", "http://10.0.0.5:11434")
    assert gpu1.discover and gpu1.discover_interval == 30 and gpu1.models == ()
    assert (gpu1.slots, gpu1.weight, gpu1.priority, gpu1.failover_timeout) == (4, 2.0, 0, 12.5)
    assert gpu2.models == ("smollm2:*", "llama3.2")
    assert (gpu2.slots, gpu2.weight, gpu2.priority, gpu2.failover_timeout) == (1, 1.0, 0, None)
    assert hosted.api_key_env == "OPENAI_API_KEY" and hosted.priority == 10
    # a relative key file is found next to the upstreams file
    assert local.api_key_file == "/etc/tokenwire/keys/llama"
    assert config.aliases == {"chat-small": (AliasTarget("gpu1", "smollm2:135m"),
                                             AliasTarget("hosted", "gpt-4o-mini"))}


def test_the_printed_configuration_has_no_password_and_no_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret")
    config = parse_upstreams(FULL, SRC)
    printed = "\n".join(config.describe()) + repr(config.public()) + repr(config)
    assert "hunter2" not in printed and "sk-very-secret" not in printed
    assert "http://admin:***@10.0.0.6:11434" in printed
    assert "key=env OPENAI_API_KEY" in printed and "key=file /etc/tokenwire/keys/llama" in printed
    assert "gpu1: ollama http://10.0.0.5:11434 models=[discover (every 30s)] slots=4" in printed
    assert "alias chat-small: gpu1 (smollm2:135m), hosted (gpt-4o-mini)" in printed


def test_the_shortcut_is_one_ollama_for_every_model() -> None:
    [spec] = single_upstream("http://127.0.0.1:11434").upstreams
    assert (spec.name, spec.kind, spec.models) == ("ollama", "ollama", ("*",))


GOOD = '[upstreams.a]\nkind = "ollama"\nurl = "http://h:1"\nmodels = ["m"]\n'


def _with(extra: str, table: str = GOOD) -> str:
    return table + extra


# (file text, words the message must hold, besides the file's path)
BAD = [
    ("[upstreams.a\n", ["not valid TOML"]),
    ("workers = 3\n" + GOOD, ["unknown top-level key", "'workers'"]),
    ("", ["no upstreams", "[upstreams.<name>]"]),
    ("[upstreams]\n", ["no upstreams"]),
    ('[upstreams."gpu 1"]\nkind = "ollama"\nurl = "http://h:1"\nmodels = ["m"]\n',
     ["[upstreams.gpu 1]", "the name must be"]),
    ('upstreams = {a = 3}\n', ["[upstreams.a]", "must be a table"]),
    (_with('api_key = "sk-abc"\n'), ["[upstreams.a] api_key", "never goes into the upstreams "
                                                               "file", "api_key_env"]),
    (_with('token = "sk-abc"\n'), ["[upstreams.a] token", "never goes into"]),
    (_with("slot = 2\n"), ["[upstreams.a] slot", "unknown key", "slots"]),
    ('[upstreams.a]\nurl = "http://h:1"\nmodels = ["m"]\n', ["[upstreams.a] kind",
                                                             "ollama, openai"]),
    ('[upstreams.a]\nkind = "vllm"\nurl = "http://h:1"\nmodels = ["m"]\n',
     ["[upstreams.a] kind", "not 'vllm'"]),
    ('[upstreams.a]\nkind = "ollama"\nmodels = ["m"]\n', ["[upstreams.a] url", "required"]),
    ('[upstreams.a]\nkind = "ollama"\nurl = 80\nmodels = ["m"]\n', ["[upstreams.a] url"]),
    ('[upstreams.a]\nkind = "ollama"\nurl = "ftp://h"\nmodels = ["m"]\n',
     ["[upstreams.a] url", "'ftp://h' must be http://"]),
    ('[upstreams.a]\nkind = "ollama"\nurl = "http://h:port"\nmodels = ["m"]\n',
     ["[upstreams.a] url", "is not a URL"]),
    ('[upstreams.a]\nkind = "ollama"\nurl = "http:///x"\nmodels = ["m"]\n',
     ["[upstreams.a] url", "must be http://"]),
    ('[upstreams.a]\nkind = "openai"\nurl = "http://h:1"\nmodels = ["m"]\n'
     'api_key_env = "sk-live-123"\n', ["[upstreams.a] api_key_env", "not its value"]),
    ('[upstreams.a]\nkind = "openai"\nurl = "http://h:1"\nmodels = ["m"]\n'
     'api_key_env = ""\n', ["[upstreams.a] api_key_env", "non-empty string"]),
    ('[upstreams.a]\nkind = "openai"\nurl = "http://h:1"\nmodels = ["m"]\n'
     'api_key_file = 3\n', ["[upstreams.a] api_key_file", "non-empty string"]),
    ('[upstreams.a]\nkind = "openai"\nurl = "http://h:1"\nmodels = ["m"]\n'
     'api_key_env = "K"\napi_key_file = "/k"\n', ["[upstreams.a]", "api_key_env or "
                                                                    "api_key_file, not both"]),
    (_with('api_key_env = "K"\n'), ["[upstreams.a] api_key_env", "ollama kind takes no key"]),
    (_with('discover = "yes"\n'), ["[upstreams.a] discover", "true or false"]),
    (_with("discover = true\n"), ["[upstreams.a]", "models or discover = true, not both"]),
    ('[upstreams.a]\nkind = "ollama"\nurl = "http://h:1"\n',
     ["[upstreams.a]", "say which models it serves"]),
    (_with("discover_interval = 5\n"), ["[upstreams.a] discover_interval",
                                        "applies with discover = true"]),
    ('[upstreams.a]\nkind = "ollama"\nurl = "http://h:1"\ndiscover = true\n'
     "discover_interval = 0\n", ["[upstreams.a] discover_interval", "number > 0"]),
    ('[upstreams.a]\nkind = "ollama"\nurl = "http://h:1"\nmodels = "m"\n',
     ["[upstreams.a] models", "non-empty list"]),
    ('[upstreams.a]\nkind = "ollama"\nurl = "http://h:1"\nmodels = []\n',
     ["[upstreams.a] models", "non-empty list"]),
    ('[upstreams.a]\nkind = "ollama"\nurl = "http://h:1"\nmodels = ["m", 3]\n',
     ["[upstreams.a] models", "3 is not a model name"]),
    ('[upstreams.a]\nkind = "ollama"\nurl = "http://h:1"\nmodels = [" "]\n',
     ["[upstreams.a] models", "is not a model name"]),
    (_with("slots = 0\n"), ["[upstreams.a] slots", "whole number >= 1"]),
    (_with("slots = 2.5\n"), ["[upstreams.a] slots", "whole number >= 1"]),
    (_with("slots = true\n"), ["[upstreams.a] slots", "whole number >= 1"]),
    (_with("weight = 0\n"), ["[upstreams.a] weight", "number > 0"]),
    (_with('weight = "1"\n'), ["[upstreams.a] weight", "number > 0"]),
    (_with("weight = inf\n"), ["[upstreams.a] weight", "number > 0"]),
    (_with("priority = -1\n"), ["[upstreams.a] priority", "whole number >= 0"]),
    (_with("failover_timeout = 0\n"), ["[upstreams.a] failover_timeout", "number > 0"]),
    (GOOD + "[aliases.x]\nupstream = 'a'\n", ["[aliases] 'x'", "non-empty list"]),
    ("aliases = 3\n" + GOOD, ["[aliases] must be a table"]),
    (GOOD + '[aliases]\n"chat-*" = [{upstream = "a", model = "m"}]\n',
     ["[aliases] 'chat-*'", "one model name"]),
    (GOOD + '[aliases]\n"chat" = []\n', ["[aliases] 'chat'", "non-empty list"]),
    (GOOD + '[aliases]\n"chat" = ["a"]\n', ["[aliases] 'chat'[0]", "{upstream = ..., model"]),
    (GOOD + '[aliases]\n"chat" = [{upstream = "a", model = "m", weight = 2}]\n',
     ["[aliases] 'chat'[0] weight", "unknown key"]),
    (GOOD + '[aliases]\n"chat" = [{upstream = "b", model = "m"}]\n',
     ["[aliases] 'chat'[0] upstream", "'b' is not an upstream of this file", "known: a"]),
    (GOOD + '[aliases]\n"chat" = [{model = "m"}]\n',
     ["[aliases] 'chat'[0] upstream", "None is not an upstream"]),
    (GOOD + '[aliases]\n"chat" = [{upstream = "a", model = "m"}, {upstream = "a", model = "n"}]\n',
     ["[aliases] 'chat'[1] upstream", "listed twice"]),
    (GOOD + '[aliases]\n"chat" = [{upstream = "a"}]\n',
     ["[aliases] 'chat'[0] model", "the model name 'a' knows it by"]),
]


@pytest.mark.parametrize(("text", "words"), BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_every_problem_names_the_file_the_table_and_the_key(text: str, words: list[str]) -> None:
    with pytest.raises(UpstreamsFileError) as caught:
        parse_upstreams(text, SRC)
    message = str(caught.value)
    assert message.startswith(SRC + ": "), message
    for word in words:
        assert word in message, message
    assert "sk-abc" not in message and "sk-live-123" not in message  # never a key's value


def test_a_password_in_a_bad_url_is_not_repeated() -> None:
    text = '[upstreams.a]\nkind = "ollama"\nurl = "ftp://u:hunter2@h"\nmodels = ["m"]\n'
    with pytest.raises(UpstreamsFileError) as caught:
        parse_upstreams(text, SRC)
    assert "hunter2" not in str(caught.value) and "u:***@h" in str(caught.value)


# -- keys ---------------------------------------------------------------------------------

OPENAI = '[upstreams.h]\nkind = "openai"\nurl = "https://api.example/v1"\nmodels = ["g"]\n'


def test_keys_come_from_the_environment_or_a_file(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TW_TEST_KEY", " sk-from-env\n")
    [spec] = parse_upstreams(OPENAI + 'api_key_env = "TW_TEST_KEY"\n', SRC).upstreams
    assert read_api_key(spec) == "sk-from-env"
    (tmp_path / "key").write_text("sk-from-file\n")
    source = str(tmp_path / "upstreams.toml")
    [spec] = parse_upstreams(OPENAI + 'api_key_file = "key"\n', source).upstreams
    assert read_api_key(spec) == "sk-from-file"
    [spec] = parse_upstreams(OPENAI, SRC).upstreams
    assert read_api_key(spec) is None  # a local server without a key


def test_a_missing_key_is_a_clear_error_without_the_value(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TW_TEST_KEY", raising=False)
    [spec] = parse_upstreams(OPENAI + 'api_key_env = "TW_TEST_KEY"\n', SRC).upstreams
    with pytest.raises(UpstreamsFileError, match=r"\[upstreams.h\] api_key_env: the "
                                                 r"environment variable TW_TEST_KEY is not set"):
        read_api_key(spec)
    source = str(tmp_path / "u.toml")
    [spec] = parse_upstreams(OPENAI + 'api_key_file = "absent"\n', source).upstreams
    with pytest.raises(UpstreamsFileError, match=r"api_key_file: cannot read .*absent"):
        read_api_key(spec)
    (tmp_path / "empty").write_text("\n")
    [spec] = parse_upstreams(OPENAI + 'api_key_file = "empty"\n', source).upstreams
    with pytest.raises(UpstreamsFileError, match=r"api_key_file: .*empty is empty"):
        read_api_key(spec)


def test_the_openai_kind_builds_the_openai_backend_with_its_flavor(tmp_path: Path) -> None:
    from tokenwire.service.backends.openai import OpenAIBackend

    [spec] = parse_upstreams(OPENAI + 'flavor = "llama.cpp"\n', SRC).upstreams
    backend = build_backend(spec, BackendOptions())
    assert isinstance(backend, OpenAIBackend) and backend.flavor == "llama.cpp"
    assert backend.name == "h"
    for bad, why in (('flavor = "tgi"\n', r"flavor: must be one of openai, llama.cpp, vllm"),
                     ('ca_file = "nope.pem"\n', r"ca_file: no such file")):
        with pytest.raises(UpstreamsFileError, match=why):
            parse_upstreams(OPENAI + bad, str(tmp_path / "u.toml"))
    ollama = '[upstreams.o]\nkind = "ollama"\nurl = "http://h:1"\nmodels = ["m"]\n'
    with pytest.raises(UpstreamsFileError, match=r"flavor: applies to kind = \"openai\" only"):
        parse_upstreams(ollama + 'flavor = "vllm"\n', SRC)


# -- reloads --------------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    """Writes and moves the modification time on, as an editor saving later would."""
    path.write_text(text)
    stamp = path.stat().st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(stamp, stamp))


def test_reload_takes_a_good_change_and_keeps_the_previous_one_on_a_bad_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "upstreams.toml"
    path.write_text(GOOD)
    watched = UpstreamsFile(str(path))
    assert [s.name for s in watched.config.upstreams] == ["a"]
    assert watched.changed() is None  # not changed

    _write(path, GOOD + GOOD.replace("upstreams.a", "upstreams.b"))
    new = watched.changed()
    assert new is not None and [s.name for s in new.upstreams] == ["a", "b"]
    watched.accept(new)

    with caplog.at_level(logging.ERROR, "tokenwire.service"):
        _write(path, GOOD + "slots = 0\n")
        assert watched.changed() is None
        assert watched.changed() is None  # the same problem is logged once
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert "not reloaded (keeping the previous one)" in errors[0]
    assert f"{path}: [upstreams.a] slots" in errors[0]
    assert [s.name for s in watched.config.upstreams] == ["a", "b"]

    path.unlink()
    with caplog.at_level(logging.ERROR, "tokenwire.service"):
        assert watched.changed() is None
    assert "cannot read it" in caplog.records[-1].getMessage()

    _write(path, GOOD.replace('["m"]', '["m", "n"]'))
    fixed = watched.changed()
    assert fixed is not None and fixed.upstreams[0].models == ("m", "n")


def test_a_file_that_is_bad_at_start_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.toml"
    with pytest.raises(UpstreamsFileError, match="cannot read it"):
        UpstreamsFile(str(path))
    path.write_text("[upstreams]\n")
    with pytest.raises(UpstreamsFileError, match="no upstreams"):
        UpstreamsFile(str(path))
