"""WebSocket echo server and clients for tests/tests/websocket.rs.

    python3 ws.py server HOST PORT LOG   echo every message; one JSON line per
                                         closed connection in LOG: its path,
                                         the close code it received, when
    python3 ws.py client URL             clients driven by lines on stdin:
        open GROUP N     N clients on URL/GROUP/i, each echoing a message every
                         100 ms; answers "opened GROUP ok FAILED"
        finish GROUP     its clients close normally (1000); answers "finished GROUP"
        wait GROUP SECS  until its clients are closed (by the other side);
                         answers "closed GROUP OPEN_LEFT"
        report           answers "report <JSON list of clients>", then exits

Times are Unix seconds (time.time()), the clock the Rust side reads too.
"""

import asyncio
import json
import sys
import time

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

# One message per client this often.
PERIOD = 0.1
# An echo later than this is an error.
ECHO_TIMEOUT = 5.0


async def run_server(host, port, log_path):
    log = open(log_path, "a", buffering=1)

    async def echo(ws):
        code = None
        try:
            while True:
                await ws.send(await ws.recv())
        except ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd else None
        log.write(json.dumps({"path": ws.request.path, "code": code, "t": time.time()}) + "\n")

    async with serve(echo, host, int(port), ping_interval=None):
        print("ready", flush=True)
        await asyncio.Future()


class Client:
    def __init__(self, group, i):
        self.rec = {
            "group": group,
            "id": i,
            "echoes": [],
            "close_code": None,
            "close_t": None,
            "closed_by_us": False,
            "error": None,
        }
        self.stop = asyncio.Event()
        self.opened = asyncio.get_running_loop().create_future()

    async def run(self, url):
        rec = self.rec
        try:
            ws = await connect(url, ping_interval=None, open_timeout=10, close_timeout=2)
        except Exception as e:  # noqa: BLE001 -- reported to the test
            rec["error"] = f"connect: {e!r}"
            self.opened.set_result(False)
            return
        self.opened.set_result(True)
        seq = 0
        try:
            while not self.stop.is_set():
                msg = f"{rec['group']}-{rec['id']}-{seq}"
                await ws.send(msg)
                got = await asyncio.wait_for(ws.recv(), ECHO_TIMEOUT)
                if got != msg:
                    rec["error"] = f"echo {got!r} for {msg!r}"
                    return
                rec["echoes"].append(time.time())
                seq += 1
                try:
                    await asyncio.wait_for(self.stop.wait(), PERIOD)
                except asyncio.TimeoutError:
                    pass
            rec["closed_by_us"] = True
            await ws.close()
        except ConnectionClosed as e:
            rec["close_t"] = time.time()
            rec["close_code"] = e.rcvd.code if e.rcvd else None
        except Exception as e:  # noqa: BLE001 -- reported to the test
            rec["error"] = repr(e)


async def run_clients(url):
    loop = asyncio.get_running_loop()
    groups = {}
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        words = line.split()
        if not words:
            return
        cmd, args = words[0], words[1:]
        if cmd == "open":
            group, n = args[0], int(args[1])
            clients = [Client(group, i) for i in range(n)]
            tasks = [asyncio.create_task(c.run(f"{url}/{group}/{c.rec['id']}")) for c in clients]
            groups[group] = (clients, tasks)
            results = [await c.opened for c in clients]
            print(f"opened {group} {sum(results)} {n - sum(results)}", flush=True)
        elif cmd == "finish":
            clients, tasks = groups[args[0]]
            for c in clients:
                c.stop.set()
            await asyncio.gather(*tasks)
            print(f"finished {args[0]}", flush=True)
        elif cmd == "wait":
            clients, tasks = groups[args[0]]
            _, pending = await asyncio.wait(tasks, timeout=float(args[1]))
            print(f"closed {args[0]} {len(pending)}", flush=True)
        elif cmd == "report":
            recs = [c.rec for clients, _ in groups.values() for c in clients]
            print("report " + json.dumps(recs), flush=True)
            return


def main():
    if sys.argv[1] == "server":
        asyncio.run(run_server(*sys.argv[2:5]))
    else:
        asyncio.run(run_clients(sys.argv[2]))


if __name__ == "__main__":
    main()
