"""py-spiffe (the SPIFFE project's Python Workload API client) against the agent's Workload
API socket: a client nobody here wrote, on gRPC's C-core.

Modes (each prints one JSON object on stdout; any failure exits non-zero with a message on
stderr that says what was expected and what came):

  fetch --socket PATH --spiffe-id ID --trust-domain TD [--federated TD ...]
      fetch_x509_svid(), fetch_x509_bundles() and fetch_x509_context() return the SVID of ID
      (py-spiffe parses and checks it as an X509-SVID), a bundle for TD, and a leaf that the
      chain or the bundle issued; and a bundle for each --federated trust domain in both
      bundle sets (their authorities' serials are printed under "federated").

  stream --socket PATH --spiffe-id ID --trust-domain TD [--serials N] [--within SECONDS]
      stream_x509_contexts() on one stream (retry_connect=False, so a stream that ends or
      fails is a failure, not a silent reconnect) until it has seen N different leaf serials.

  refused --socket PATH [--expect-code PERMISSION_DENIED]
      fetch_x509_svid(), fetch_x509_bundles() and stream_x509_contexts() are all refused with
      that gRPC status.

Every wait is bounded: --timeout (default 10 s) per call, --within for the stream.
"""

import argparse
import json
import sys
import threading
import time

import grpc
from spiffe import TrustDomain, WorkloadApiClient


class Failure(Exception):
    """What the script was checking, and what came instead."""


def serial(cert):
    return format(cert.serial_number, "x")


def describe_svid(svid):
    leaf = svid.leaf
    return {
        "spiffe_id": str(svid.spiffe_id),
        "trust_domain": svid.spiffe_id.trust_domain.name,
        "leaf_serial": serial(leaf),
        "chain_length": len(svid.cert_chain),
        "private_key": svid.private_key is not None,
        "not_after": leaf.not_valid_after_utc.isoformat(),
    }


def issued_by_one_of(leaf, issuers):
    """Whether one of `issuers` signed `leaf` (cryptography's verify_directly_issued_by)."""
    for issuer in issuers:
        try:
            leaf.verify_directly_issued_by(issuer)
            return True
        except Exception:  # wrong issuer name, wrong signature, unsupported key: not this one
            continue
    return False


def check_svid(call, svid, spiffe_id, trust_domain):
    got = describe_svid(svid)
    if got["spiffe_id"] != spiffe_id:
        raise Failure(f"{call}: SPIFFE ID {got['spiffe_id']!r}, expected {spiffe_id!r}")
    if got["trust_domain"] != trust_domain:
        raise Failure(f"{call}: trust domain {got['trust_domain']!r}, expected {trust_domain!r}")
    if not got["private_key"]:
        raise Failure(f"{call}: an SVID without its private key")
    return got


def bundle_for(call, bundle_set, trust_domain):
    bundle = bundle_set.get_bundle_for_trust_domain(TrustDomain(trust_domain))
    if bundle is None:
        tds = sorted(b.trust_domain.name for b in bundle_set.bundles)
        raise Failure(f"{call}: no bundle for {trust_domain!r}, only for {tds}")
    if not bundle.x509_authorities:
        raise Failure(f"{call}: the bundle of {trust_domain!r} has no X.509 authorities")
    return bundle


def client(args):
    return WorkloadApiClient(socket_path="unix://" + args.socket, default_timeout=args.timeout)


def run_fetch(args):
    with client(args) as c:
        svid = c.fetch_x509_svid()
        out_svid = check_svid("fetch_x509_svid", svid, args.spiffe_id, args.trust_domain)

        bundles = c.fetch_x509_bundles()
        bundle = bundle_for("fetch_x509_bundles", bundles, args.trust_domain)
        out_bundles = {
            "trust_domains": sorted(b.trust_domain.name for b in bundles.bundles),
            "authorities": sorted(serial(a) for a in bundle.x509_authorities),
        }

        ctx = c.fetch_x509_context()
        out_ctx_svid = check_svid(
            "fetch_x509_context", ctx.default_svid, args.spiffe_id, args.trust_domain
        )
        ctx_bundle = bundle_for("fetch_x509_context", ctx.x509_bundle_set, args.trust_domain)
        leaf = ctx.default_svid.leaf
        issuers = list(ctx.default_svid.cert_chain[1:]) + list(ctx_bundle.x509_authorities)
        if not issued_by_one_of(leaf, issuers):
            raise Failure(
                "fetch_x509_context: the leaf was issued by neither its chain nor the bundle "
                f"({[serial(i) for i in issuers]})"
            )
        federated = {}
        for td in args.federated:
            from_bundles = bundle_for("fetch_x509_bundles", bundles, td)
            from_ctx = bundle_for("fetch_x509_context", ctx.x509_bundle_set, td)
            serials = sorted(serial(a) for a in from_bundles.x509_authorities)
            if serials != sorted(serial(a) for a in from_ctx.x509_authorities):
                raise Failure(f"the bundles of {td!r} differ between the two calls")
            federated[td] = serials
        return {
            "socket": args.socket,
            "federated": federated,
            "x509_svid": out_svid,
            "x509_bundles": out_bundles,
            "x509_context": {
                "default_svid": out_ctx_svid,
                "svids": len(ctx.x509_svids),
                "trust_domains": sorted(b.trust_domain.name for b in ctx.x509_bundle_set.bundles),
                "authorities": sorted(serial(a) for a in ctx_bundle.x509_authorities),
                "leaf_issued_by_chain_or_bundle": True,
            },
        }


def run_stream(args):
    seen = []  # (seconds since start, leaf serial), every update in order
    errors = []
    done = threading.Event()
    lock = threading.Lock()
    started = time.monotonic()

    def on_success(ctx):
        try:
            check_svid("stream_x509_contexts", ctx.default_svid, args.spiffe_id, args.trust_domain)
            bundle_for("stream_x509_contexts", ctx.x509_bundle_set, args.trust_domain)
        except Failure as e:
            with lock:
                errors.append(str(e))
            done.set()
            return
        with lock:
            seen.append((round(time.monotonic() - started, 3), serial(ctx.default_svid.leaf)))
            if len({s for _, s in seen}) >= args.serials:
                done.set()

    def on_error(err):
        with lock:
            errors.append(f"{type(err).__name__}: {err}")
        done.set()

    with client(args) as c:
        handle = c.stream_x509_contexts(on_success, on_error, retry_connect=False)
        try:
            done.wait(args.within)
        finally:
            handle.cancel()
    with lock:
        updates, errs = list(seen), list(errors)
    distinct = []
    for _, s in updates:
        if s not in distinct:
            distinct.append(s)
    out = {
        "socket": args.socket,
        "updates": [{"at_s": at, "leaf_serial": s} for at, s in updates],
        "distinct_serials": distinct,
        "errors": errs,
    }
    if errs:
        raise Failure(f"stream_x509_contexts reported errors: {errs}; updates: {updates}")
    if len(distinct) < args.serials:
        raise Failure(
            f"stream_x509_contexts saw {len(distinct)} different leaf serials in {args.within} s "
            f"on one stream, expected {args.serials}: {updates}"
        )
    return out


def grpc_code(err):
    """The gRPC status behind a py-spiffe error (it wraps grpc.RpcError as its __cause__)."""
    cause = err
    while cause is not None:
        if isinstance(cause, grpc.RpcError) and isinstance(cause, grpc.Call):
            return cause.code().name, cause.details()
        cause = cause.__cause__
    return None, str(err)


def run_refused(args):
    out = {"socket": args.socket}
    with client(args) as c:
        for name, call in (
            ("fetch_x509_svid", c.fetch_x509_svid),
            ("fetch_x509_bundles", c.fetch_x509_bundles),
        ):
            try:
                got = call()
            except Exception as e:  # py-spiffe's FetchX509SvidError / FetchX509BundleError
                code, details = grpc_code(e)
                out[name] = {"error": type(e).__name__, "code": code, "details": details}
                if code != args.expect_code:
                    raise Failure(f"{name} failed with {code} ({details!r}), expected {args.expect_code}")
            else:
                raise Failure(f"{name} was answered ({got!r}), expected {args.expect_code}")

        # The stream: py-spiffe reports only the code's name, in its error's message.
        errors, updates = [], []
        done = threading.Event()
        handle = c.stream_x509_contexts(
            lambda ctx: (updates.append(str(ctx.default_svid.spiffe_id)), done.set()),
            lambda err: (errors.append(str(err)), done.set()),
            retry_connect=False,
        )
        try:
            if not done.wait(args.timeout):
                raise Failure(f"stream_x509_contexts neither failed nor answered in {args.timeout} s")
        finally:
            handle.cancel()
        out["stream_x509_contexts"] = {"errors": errors, "updates": updates}
        if updates or not any(f"StatusCode.{args.expect_code}" in e for e in errors):
            raise Failure(
                f"stream_x509_contexts: expected {args.expect_code}, got errors {errors}, "
                f"updates {updates}"
            )
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    for mode in ("fetch", "stream", "refused"):
        m = sub.add_parser(mode)
        m.add_argument("--socket", required=True, help="absolute path of the Workload API socket")
        m.add_argument("--timeout", type=float, default=10.0, help="deadline of each call, s")
        if mode in ("fetch", "stream"):
            m.add_argument("--spiffe-id", required=True)
            m.add_argument("--trust-domain", required=True)
        if mode == "fetch":
            m.add_argument("--federated", action="append", default=[])
        if mode == "stream":
            m.add_argument("--serials", type=int, default=2)
            m.add_argument("--within", type=float, default=30.0)
        if mode == "refused":
            m.add_argument("--expect-code", default="PERMISSION_DENIED")
    args = p.parse_args()
    if not args.socket.startswith("/"):
        p.error("--socket must be absolute")
    run = {"fetch": run_fetch, "stream": run_stream, "refused": run_refused}[args.mode]
    try:
        out = run(args)
    except Failure as e:
        print(f"workload_api.py {args.mode}: FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # py-spiffe's errors: say which call and what it said
        code, details = grpc_code(e)
        print(
            f"workload_api.py {args.mode}: FAILED: {type(e).__name__}: {e} (gRPC status {code})",
            file=sys.stderr,
        )
        sys.exit(1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
