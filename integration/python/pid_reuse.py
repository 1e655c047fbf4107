"""A connection whose connecting process exits and whose pid is taken by another pod's process.

Run inside pod 1's cgroup (integration/tests/node_e2e.rs places it there), as root. It plays
the attack node mode's PID-reuse defence exists for:

  1. A child of this process (so, in pod 1) connects to the agent's SDS socket and exits at
     once; this process keeps the connected socket (the child's connect() is what the kernel
     records in SO_PEERCRED, so the connection's peer pid is the child's). Nothing is sent:
     the agent proves a caller at its first request, not at accept.
  2. The child's pid is handed to a new process in pod 2 (--victim-cgroup): the kernel's next
     pid is set through /proc/sys/kernel/ns_last_pid and a shell that moves itself into pod
     2's cgroup and then sleeps is started, again until it gets that pid (other processes on
     the machine may take it first; bounded by --attempts).
  3. The held socket is then used for FetchSecrets `default`, through a byte relay (gRPC's
     C-core cannot be handed a connected fd): grpcio connects to a relay socket, and every
     byte goes to and from the held connection. To the agent, the request comes from the
     connection whose peer pid is now pod 2's process.

It prints one JSON object: the pids, the attempts, the gRPC code and details, the names of
the secrets that came and their URI SANs; never key material. With --no-reuse it skips step 2
(the pid stays dead), the control case. It does not judge: the Rust test asserts.

  pid_reuse.py --socket PATH --victim-cgroup DIR [--attempts N] [--no-reuse]
"""

import argparse
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time

import grpc

import sds_grpcio as sds

NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"


def connect_in_child(path):
    """A socket connected by a child that has exited by the time this returns."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        try:
            s.connect(path)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return s, pid


def take_pid(pid, cgroup, attempts):
    """A process in `cgroup` whose pid is `pid`, or None; and how many tries it took."""
    for attempt in range(1, attempts + 1):
        with open(NS_LAST_PID, "w") as f:
            f.write(str(pid - 1))
        victim = subprocess.Popen(
            ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec sleep 120', cgroup]
        )
        if victim.pid == pid:
            # Wait until it is in the cgroup (the shell's first act) and has become `sleep`.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                with open(f"/proc/{pid}/cgroup") as f:
                    in_pod = os.path.basename(cgroup) in f.read()
                with open(f"/proc/{pid}/comm") as f:
                    slept = f.read().strip() == "sleep"
                if in_pod and slept:
                    return victim, attempt
                time.sleep(0.01)
            victim.kill()
            victim.wait()
            return None, attempt
        victim.kill()
        victim.wait()
    return None, attempts


def relay(listener, held):
    """Copies bytes both ways between the first connection to `listener` and `held`."""
    conn, _ = listener.accept()
    sel = selectors.DefaultSelector()
    sel.register(conn, selectors.EVENT_READ, held)
    sel.register(held, selectors.EVENT_READ, conn)
    try:
        while True:
            for key, _ in sel.select():
                data = key.fileobj.recv(65536)
                if not data:
                    return
                key.data.sendall(data)
    except OSError:
        return
    finally:
        conn.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", required=True)
    p.add_argument("--victim-cgroup", required=True)
    p.add_argument("--attempts", type=int, default=200)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--no-reuse", action="store_true")
    args = p.parse_args()

    held, dead_pid = connect_in_child(args.socket)
    out = {"connected_pid": dead_pid, "victim_pid": None, "attempts": 0}
    victim = None
    if not args.no_reuse:
        # The agent's clock for "started after accept" has a one-tick (10 ms) tolerance.
        time.sleep(0.05)
        victim, out["attempts"] = take_pid(dead_pid, args.victim_cgroup, args.attempts)
        if victim is None:
            print(f"no process got pid {dead_pid} in {out['attempts']} attempts", file=sys.stderr)
            return 2
        out["victim_pid"] = victim.pid
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "relay.sock")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(1)
            threading.Thread(target=relay, args=(listener, held), daemon=True).start()
            with grpc.insecure_channel("unix://" + path) as channel:
                call = channel.unary_unary(
                    sds.SDS + "FetchSecrets",
                    request_serializer=lambda b: b,
                    response_deserializer=lambda b: b,
                )
                try:
                    resp = sds.discovery_response(
                        call(sds.discovery_request(["default"]), timeout=args.timeout)
                    )
                    out["code"], out["details"] = "OK", ""
                except grpc.RpcError as e:
                    resp = None
                    out["code"], out["details"] = e.code().name, e.details() or ""
        got = (resp or {}).get("secrets", [])
        out["names"] = [s["name"] for s in got]
        out["uri_sans"] = sorted(
            {u for s in got for u in ((s.get("leaf") or {}).get("uri_sans") or [])}
        )
    finally:
        if victim is not None:
            victim.kill()
            victim.wait()
        held.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
