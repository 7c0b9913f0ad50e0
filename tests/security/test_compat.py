"""Ordinary code still works under the default seccomp profile, Landlock and the rest of the sandbox: real
workloads through the real daemon. A profile or mount rule that breaks one of these is a regression even if
every attack still fails."""
from __future__ import annotations

import textwrap

import pytest

pytestmark = pytest.mark.cgroup2

PYTHON = {
    "threads": """
        import threading
        out = []
        ts = [threading.Thread(target=out.append, args=(i,)) for i in range(16)]
        [t.start() for t in ts]; [t.join() for t in ts]
        assert sorted(out) == list(range(16))
    """,
    "asyncio": """
        import asyncio
        async def main():
            r, w = await asyncio.open_connection(*(await start()).sockets[0].getsockname())
            w.write(b'ping\\n'); await w.drain()
            return await r.readline()
        async def start():
            async def echo(r, w):
                w.write(await r.readline()); await w.drain(); w.close()
            return await asyncio.start_server(echo, '127.0.0.1', 0)
        assert asyncio.run(main()) == b'ping\\n'
    """,
    "subprocess": """
        import subprocess, sys
        assert subprocess.run([sys.executable, '-c', 'print(2 + 2)'], capture_output=True, text=True).stdout == '4\\n'
        assert subprocess.run(['sh', '-c', 'echo $((3 * 3))'], capture_output=True, text=True).stdout == '9\\n'
    """,
    "multiprocessing_fork": """
        import multiprocessing as mp
        with mp.get_context('fork').Pool(2) as p:
            assert p.map(abs, [-1, -2, -3]) == [1, 2, 3]
    """,
    "multiprocessing_spawn": """
        import multiprocessing as mp
        if __name__ == '__main__':
            with mp.get_context('spawn').Pool(2) as p:
                assert p.map(abs, [-1, -2, -3]) == [1, 2, 3]
            q = mp.get_context('spawn').Queue(); q.put('x'); assert q.get(timeout=5) == 'x'
    """,
    "sqlite3": """
        import sqlite3
        db = sqlite3.connect('/tmp/t.db'); db.execute('create table t (x)'); db.executemany('insert into t values (?)', [(i,) for i in range(100)])
        db.commit(); assert db.execute('select sum(x) from t').fetchone()[0] == 4950
    """,
    "stdlib": """
        import json, zlib, hashlib, ssl, base64, decimal, datetime, tempfile, shutil, os
        assert zlib.decompress(zlib.compress(b'x' * 1000)) == b'x' * 1000
        assert hashlib.sha256(b'').hexdigest().startswith('e3b0c442')
        ctx = ssl.create_default_context(); assert ctx.protocol
        assert json.loads(json.dumps({'a': [1, 2]})) == {'a': [1, 2]}
        d = tempfile.mkdtemp(); shutil.rmtree(d); assert not os.path.exists(d)
    """,
}


@pytest.mark.parametrize("name", sorted(PYTHON))
def test_python_workloads(sandbox, name):
    r = sandbox.run(textwrap.dedent(PYTHON[name]) + "\nif __name__ == '__main__':\n    print('ok')", wall_time=30)
    assert (r.outcome, r.stdout) == ("exited", b"ok\n"), (r.outcome, r.message, r.stderr.decode()[-2000:])


def test_bash_pipeline_with_coreutils(sandbox):
    code = ("set -euo pipefail\nseq 1 1000 | sort -rn | head -3 | tr '\\n' ' ' | sed 's/ $//'; echo\n"
            "printf 'b\\na\\nb\\n' | sort | uniq -c | awk '{print $1 $2}' | paste -sd, -\n"
            "mkdir -p /tmp/d && cd /tmp/d && touch f1 f2 && ls | wc -l\n"
            "echo hi > /dev/stdout; date +%Y >/dev/null; grep -c root /etc/passwd")
    r = sandbox.run(code, "bash")
    assert r.outcome == "exited" and r.stdout.decode().split("\n")[:5] == ["1000 999 998", "1a,2b", "2", "hi", "1"], \
        (r.stdout, r.stderr)


def test_node_when_present(sandbox):
    runners = {x.name: x for x in sandbox.runners()}
    if "node" not in runners or not runners["node"].available:
        pytest.skip("no node in the host image")
    code = ("const fs = require('fs'); const cp = require('child_process'); const zlib = require('zlib');\n"
            "fs.writeFileSync('/tmp/x', 'data'); const z = zlib.gzipSync(fs.readFileSync('/tmp/x'));\n"
            "const sum = [1, 2, 3].reduce((a, b) => a + b);\n"
            "const out = cp.execSync('echo child').toString().trim();\n"
            "new Promise(r => setTimeout(r, 10)).then(() => console.log(sum, out, zlib.gunzipSync(z).toString()));")
    r = sandbox.run(code, "node", wall_time=30)
    assert (r.outcome, r.stdout) == ("exited", b"6 child data\n"), (r.message, r.stderr.decode()[-2000:])
