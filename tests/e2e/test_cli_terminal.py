"""The tokenwire CLI as a person uses it: a real process, a real terminal, a
real Ctrl-C, against the real server and the test Ollama."""

from __future__ import annotations

import asyncio
import os
import pty
import signal
import sys
from pathlib import Path

from tests.fakeollama import FakeOllama
from tests.helpers import last_body
from tokenwire.service import Runtime

CLI = str(Path(sys.executable).with_name("tokenwire"))


class Terminal:
    """A child process on a pseudo-terminal, read without blocking the loop."""

    def __init__(self, *argv: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child
            # As an interactive shell does for a foreground job: a suite started in the
            # background (`cmd &` ignores SIGINT) must not hand that on to the CLI.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGQUIT, signal.SIG_DFL)
            os.execv(argv[0], list(argv))
        self.screen = ""
        self._changed = asyncio.Event()
        os.set_blocking(self.fd, False)
        asyncio.get_running_loop().add_reader(self.fd, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.fd)
        self.screen += data.decode(errors="replace")
        self._changed.set()

    async def wait_for(self, text: str, start: int = 0) -> int:
        async with asyncio.timeout(10):
            while (at := self.screen.find(text, start)) < 0:
                self._changed.clear()
                await self._changed.wait()
        return at + len(text)

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    async def exit_code(self) -> int:
        for _ in range(500):
            pid, status = os.waitpid(self.pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG: no wait
            if pid:
                asyncio.get_running_loop().remove_reader(self.fd)
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            await asyncio.sleep(0.02)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("the CLI did not exit")


async def test_generate_streams_to_the_terminal(runtime: Runtime, fake: FakeOllama) -> None:
    term = Terminal(CLI, "--target", runtime.target, "generate", "tiny", "Why?")
    await term.wait_for("".join(fake.tokens))
    assert await term.exit_code() == 0
    assert "tokens" in term.screen  # the stats line


async def test_chat_ctrl_c_stops_the_answer_not_the_session(runtime: Runtime,
                                                           fake: FakeOllama) -> None:
    fake.token_delay = 0.3  # a slow model
    term = Terminal(CLI, "--target", runtime.target, "chat", "tiny")
    at = await term.wait_for("> ")
    term.type("tell me a story\r")
    at = await term.wait_for(fake.tokens[1], at)  # the answer is streaming...
    term.type("\x03")  # ... when the person presses Ctrl-C
    await fake.wait_for_disconnect(timeout=5)  # the model was stopped
    assert not fake.streams[-1].completed
    at = await term.wait_for("> ", at)  # and the session goes on
    fake.token_delay = 0.0
    term.type("and another\r")
    at = await term.wait_for("".join(fake.tokens), at)
    await term.wait_for("> ", at)
    assert fake.streams[-1].completed
    # the interrupted turn was dropped from the history: system-less, one user message
    assert [m["role"] for m in last_body(fake, "/api/chat")["messages"]] == ["user"]
    term.type("\x04")  # Ctrl-D ends the session
    assert await term.exit_code() == 0
