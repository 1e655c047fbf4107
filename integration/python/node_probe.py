"""A pod's process asking a node-mode agent for every identity it can name.

Run inside a pod's cgroup (integration/tests/node_e2e.rs places it there). Over one gRPC
C-core channel (grpcio, as an application would connect), it asks:

  - with each SDS method (StreamSecrets, FetchSecrets, DeltaSecrets) for `default,ROOTCA`, for
    its own SPIFFE ID (--own), for the bundles `ALL` and `spiffe://<its trust domain>`, and
    for each --other SPIFFE ID;
  - the SPIFFE Workload API's FetchX509SVID (on --workload-socket, if given).

It prints one JSON object: for each question, the gRPC code, the details, the names of the
secrets that came and the URI SANs of every certificate in them; never key material. It does
not judge: the Rust test asserts.

  node_probe.py --socket PATH --own ID [--other ID ...] [--workload-socket PATH]
"""

import argparse
import json
import sys

import grpc

import sds_grpcio as sds


def first_response(channel, method, request, decode, names_of, wanted, timeout):
    """The first response of a streaming SDS method that holds every `wanted` name (a new
    identity's certificate may follow the bundle in a later response), or the call's status.
    Responses are not ACKed: the agent pushes what exists as it comes."""
    call = channel.stream_stream(
        sds.SDS + method, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    requests = sds.RequestStream()
    requests.send(request)
    responses = call(iter(requests), timeout=timeout)
    seen, last = set(), None
    try:
        for raw in responses:
            last = decode(raw)
            seen |= set(names_of(last))
            if set(wanted) <= seen:
                return "OK", "", last
        return responses.code().name, responses.details() or "", last
    except grpc.RpcError as e:
        return e.code().name, e.details() or "", last if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED else None
    finally:
        requests.close()
        responses.cancel()


def secrets_of(kind, resp):
    if resp is None:
        return []
    if kind == "delta":
        return [dict(r["secret"], name=r["name"]) for r in resp["resources"] if r["secret"]]
    return resp["secrets"]


def ask(channel, kind, names, timeout):
    if kind == "fetch":
        call = channel.unary_unary(
            sds.SDS + "FetchSecrets",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        try:
            resp = sds.discovery_response(call(sds.discovery_request(names), timeout=timeout))
            code, details = "OK", ""
        except grpc.RpcError as e:
            resp, code, details = None, e.code().name, e.details() or ""
    elif kind == "stream":
        code, details, resp = first_response(
            channel,
            "StreamSecrets",
            sds.discovery_request(names),
            sds.discovery_response,
            lambda r: [s["name"] for s in r["secrets"]],
            names,
            timeout,
        )
    else:
        code, details, resp = first_response(
            channel,
            "DeltaSecrets",
            sds.delta_request(subscribe=names),
            sds.delta_response,
            lambda r: [x["name"] for x in r["resources"]],
            names,
            timeout,
        )
    got = secrets_of(kind, resp)
    return {
        "code": code,
        "details": details,
        "names": [s["name"] for s in got],
        "uri_sans": sorted(
            {u for s in got for u in ((s.get("leaf") or {}).get("uri_sans") or [])}
        ),
        "private_key": any(s.get("private_key") for s in got),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", required=True)
    p.add_argument("--own", required=True)
    p.add_argument("--other", action="append", default=[])
    p.add_argument("--workload-socket")
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()
    out = {"sds": {}, "workload": None}
    with grpc.insecure_channel("unix://" + args.socket) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=args.timeout)
        except grpc.FutureTimeoutError:
            print(f"could not connect to {args.socket}", file=sys.stderr)
            return 1
        # The bundles are nobody's identity: every pod may ask for them.
        own_domain = "spiffe://" + args.own.split("/")[2]
        questions = {
            "default,ROOTCA": ["default", "ROOTCA"],
            "own": [args.own],
            "bundles": ["ALL", own_domain],
        }
        for i, other in enumerate(args.other):
            questions[f"other{i}"] = [other]
        for label, names in questions.items():
            out["sds"][label] = {
                kind: ask(channel, kind, names, args.timeout) for kind in ("stream", "fetch", "delta")
            }
    if args.workload_socket:
        with grpc.insecure_channel("unix://" + args.workload_socket) as channel:
            code, details, resp = sds.fetch_x509_svid_once(
                channel, args.timeout, (("workload.spiffe.io", "true"),)
            )
            out["workload"] = {
                "code": code,
                "details": details,
                "spiffe_ids": [s["spiffe_id"] for s in (resp or {}).get("svids", [])],
            }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
