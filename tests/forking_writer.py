"""ForkingWriter: a process that forks writers on request, for tests that SIGKILL them mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


class ForkingWriter:
    """A Python process that runs ``setup`` once, then per ``fork()`` forks a child running ``loop`` until it
    is killed. Forking keeps each trial cheap: no interpreter start, no imports."""

    SERVER = '''
import os, sys
for line in sys.stdin:
    command = line.split()
    if command[0] == "fork":
        pid = os.fork()
        if pid == 0:
            try:
                child_loop()
            finally:
                os._exit(1)
        print(pid, flush=True)
    elif command[0] == "reap":
        _, status = os.waitpid(int(command[1]), 0)
        print("reaped", status, flush=True)
    else:
        break
'''

    def __init__(self, setup: str, argument: Path) -> None:
        source = setup + self.SERVER
        self.process = subprocess.Popen([sys.executable, "-c", source, str(argument)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True,
                                        env=dict(os.environ, PYTHONPATH=str(SRC)))
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin, self.stdout = self.process.stdin, self.process.stdout
        ready = self.stdout.readline().split()
        assert ready and ready[0] == "ready", ready
        self.seconds_per_write = float(ready[1])

    def kill_after(self, seconds: float) -> None:
        """Fork a writer, let it run ``seconds``, SIGKILL it and wait until it is gone."""
        self.stdin.write("fork\n")
        self.stdin.flush()
        pid = int(self.stdout.readline())
        time.sleep(seconds)
        os.kill(pid, signal.SIGKILL)
        self.stdin.write(f"reap {pid}\n")
        self.stdin.flush()
        assert self.stdout.readline().startswith("reaped")

    def close(self) -> None:
        self.stdin.write("quit\n")
        self.stdin.close()
        self.process.wait(timeout=60)
