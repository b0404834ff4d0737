"""`refusalscope serve`: binds 127.0.0.1 by default and answers there, refuses foreign Host
headers, a port already in use ends in one line and exit code 2, and a killed server can be
started again on its port at once."""

import errno
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from refusalscope.interfaces.cli import app
from refusalscope.interfaces.web.serve import is_loopback

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_a_busy_port_is_one_line_and_exit_2(tiny_run):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        res = CliRunner().invoke(app, ["serve", str(tiny_run), "--port", str(busy.getsockname()[1])])
    finally:
        busy.close()
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot listen on 127.0.0.1:") and "--port" in lines[0]


def test_serve_of_a_folder_that_is_no_run_is_one_line(tmp_path):
    res = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert res.exit_code == 2 and res.output.startswith("error: no run found")


def test_serves_on_loopback_by_default(tiny_run):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "refusalscope", "serve", str(tiny_run), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://([\d.]+):(\d+)/", line)
        assert m, line
        host, port = m.group(1), int(m.group(2))
        assert host == "127.0.0.1"
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/prompts", timeout=10) as resp:
                    assert resp.status == 200 and b"Refused prompts" in resp.read()
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        else:
            raise AssertionError("the server never answered")
        req = urllib.request.Request(f"http://127.0.0.1:{port}/prompts", headers={"Host": "rebind.example"})
        try:
            urllib.request.urlopen(req, timeout=10)
            raise AssertionError("a foreign Host header was served")
        except urllib.error.HTTPError as err:
            assert err.code == 400
        # nothing listens on the machine's other addresses
        others = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
        for addr in others:
            with socket.socket() as s:
                s.settimeout(2)
                assert s.connect_ex((addr, port)) != 0
    finally:
        proc.terminate()
        proc.wait(20)


def test_loopback_names():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")


def _start(run_dir, port: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "refusalscope", "serve", str(run_dir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return proc, proc.stdout.readline()


def _answers(port: int) -> bool:
    for _ in range(150):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/prompts", timeout=10) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    return False


def test_serve_restarts_on_the_same_port_at_once_after_kill_9(tiny_run):
    """A killed server leaves its open connections behind (FIN_WAIT / TIME_WAIT for a minute or
    more): a plain bind of the port fails meanwhile, and serve binds with SO_REUSEADDR so it does not."""
    first, line = _start(tiny_run, 0)
    try:
        port = int(re.search(r"http://[\d.]+:(\d+)/", line).group(1))
        assert _answers(port)
        held = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # a browser's keep-alive connection
        held.request("GET", "/prompts")
        assert held.getresponse().read()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(20)
    held.close()
    with socket.socket() as plain:  # the condition users met: "Address already in use" for about 75 s
        with pytest.raises(OSError) as err:
            plain.bind(("127.0.0.1", port))
        assert err.value.errno == errno.EADDRINUSE
    second, line = _start(tiny_run, port)
    try:
        assert f"http://127.0.0.1:{port}/" in line, line
        assert _answers(port)
    finally:
        second.terminate()
        second.wait(20)
