"""grpcio (gRPC's C-core) against the agent's sockets: a client nobody here wrote.

gRPC C-core on a Unix socket sends the percent-encoded socket path as `:authority`
(`unix:///tmp/x/a.sock` -> `tmp%2Fx%2Fa.sock`). This script connects exactly as an
application would, with `grpc.insecure_channel("unix:///abs/path")` and no authority
override, and calls the methods generically (no generated stubs): the requests are
hand-encoded protobuf, the responses hand-decoded, with the field numbers of Envoy's
envoy/service/discovery/v3/discovery.proto, envoy/extensions/transport_sockets/tls/v3/
{secret,common}.proto and envoy/config/core/v3/base.proto, and of the SPIFFE Workload API's
workload.proto.

Modes (each prints one JSON object on stdout; any failure exits non-zero with a message on
stderr that says what was expected and what came):

  sds --socket PATH [--names default,ROOTCA] [--watch SECONDS]
      StreamSecrets (request, first response, ACK of it, the stream must stay up; with
      --watch, waits that long on the ACKed stream for a push of a new version),
      FetchSecrets and DeltaSecrets (subscribe, responses until every name came, ACK).

  workload-header --socket PATH [--expect-code INVALID_ARGUMENT]
      /SpiffeWorkloadAPI/FetchX509SVID without the `workload.spiffe.io: true` metadata
      (must fail with --expect-code), then the same call with it (must answer an SVID),
      so the header is shown to be the only difference.

Every wait is bounded by --timeout (default 10 s) per call.
"""

import argparse
import json
import queue
import sys
import threading
import time

import grpc

try:  # A dependency of py-spiffe, so in the test virtualenv; only for serials and SANs.
    from cryptography import x509
except ImportError:  # pragma: no cover
    x509 = None

SDS = "/envoy.service.secret.v3.SecretDiscoveryService/"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
FETCH_X509_SVID = "/SpiffeWorkloadAPI/FetchX509SVID"
NODE_ID = "grpcio-interop"
NODE_CLUSTER = "interop"


class Failure(Exception):
    """What the script was checking, and what came instead."""


# --- protobuf wire format, as little as these messages need -------------------------------


def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_bytes(number, value):
    """A length-delimited field (wire type 2): string, bytes or embedded message."""
    if isinstance(value, str):
        value = value.encode()
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _message(*fields):
    """Fields as (number, value) pairs; None values and empty strings are left out, as
    proto3 leaves out defaults."""
    return b"".join(_field_bytes(n, v) for n, v in fields if v not in (None, "", b""))


def decode(data):
    """Every field of a message: {number: [value, ...]}, varints as int, length-delimited
    fields as bytes (the caller knows which are messages)."""
    fields = {}
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
        elif wire == 2:
            n, i = _read_varint(data, i)
            if i + n > len(data):
                raise Failure(f"truncated field {number}: {n} bytes at {i} of {len(data)}")
            value, i = data[i : i + n], i + n
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        elif wire == 5:
            value, i = data[i : i + 4], i + 4
        else:
            raise Failure(f"unsupported wire type {wire} of field {number}")
        fields.setdefault(number, []).append(value)
    return fields


def _read_varint(data, i):
    n = shift = 0
    while True:
        if i >= len(data):
            raise Failure("truncated varint")
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i
        shift += 7


def _first(fields, number, default=b""):
    return fields.get(number, [default])[0]


def _text(fields, number):
    return _first(fields, number).decode()


# --- Envoy messages -------------------------------------------------------------------------


def node():
    """envoy.config.core.v3.Node: id = 1, cluster = 2."""
    return _message((1, NODE_ID), (2, NODE_CLUSTER))


def discovery_request(names, version_info="", response_nonce=""):
    """envoy.service.discovery.v3.DiscoveryRequest: version_info = 1, node = 2,
    resource_names = 3, type_url = 4, response_nonce = 5."""
    return (
        _message((1, version_info), (2, node()))
        + b"".join(_field_bytes(3, n) for n in names)
        + _message((4, SECRET_TYPE), (5, response_nonce))
    )


def delta_request(subscribe=(), response_nonce="", with_node=True):
    """envoy.service.discovery.v3.DeltaDiscoveryRequest: node = 1, type_url = 2,
    resource_names_subscribe = 3, response_nonce = 6."""
    return (
        _message((1, node() if with_node else None), (2, SECRET_TYPE))
        + b"".join(_field_bytes(3, n) for n in subscribe)
        + _message((6, response_nonce))
    )


def data_source(raw):
    """envoy.config.core.v3.DataSource: inline_bytes = 2, inline_string = 3."""
    f = decode(raw)
    return _first(f, 2) or _first(f, 3)


def certificates(pem):
    """The PEM blocks of a bundle or chain, in order."""
    text = pem.decode(errors="replace")
    blocks, current = [], None
    for line in text.splitlines():
        if line.startswith("-----BEGIN "):
            current = [line]
        elif current is not None:
            current.append(line)
            if line.startswith("-----END "):
                blocks.append("\n".join(current) + "\n")
                current = None
    return blocks


def describe_cert(pem_block):
    """Serial (lowercase hex) and URI SANs of one PEM certificate, if cryptography is here."""
    if x509 is None:
        return {}
    cert = x509.load_pem_x509_certificate(pem_block.encode())
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uris = sans.value.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    return {"serial": format(cert.serial_number, "x"), "uri_sans": uris}


def describe_secret(raw):
    """envoy.extensions.transport_sockets.tls.v3.Secret: name = 1, tls_certificate = 2
    (TlsCertificate: certificate_chain = 1, private_key = 2), validation_context = 4
    (CertificateValidationContext: trusted_ca = 1). The private key is only said to be
    there, never printed."""
    f = decode(raw)
    out = {"name": _text(f, 1)}
    if 2 in f:
        tls = decode(_first(f, 2))
        chain = data_source(_first(tls, 1)) if 1 in tls else b""
        key = data_source(_first(tls, 2)) if 2 in tls else b""
        blocks = certificates(chain)
        out.update(
            kind="tls_certificate",
            pem_first_line=blocks[0].splitlines()[0] if blocks else None,
            certificates=len(blocks),
            private_key=bool(key),
            private_key_first_line=key.decode(errors="replace").splitlines()[0] if key else None,
            leaf=describe_cert(blocks[0]) if blocks else None,
        )
    elif 4 in f:
        vc = decode(_first(f, 4))
        ca = data_source(_first(vc, 1)) if 1 in vc else b""
        domains = spiffe_validator_domains(_first(vc, 12)) if 12 in vc else None
        if domains is not None:
            # The SPIFFE validator: every trust domain's roots, in the order listed.
            ca = b"".join(pem for _, pem in domains)
        blocks = certificates(ca)
        out.update(
            kind="validation_context",
            validator="spiffe" if domains is not None else "trusted_ca",
            trust_domains=[name for name, _ in domains] if domains is not None else None,
            pem_first_line=blocks[0].splitlines()[0] if blocks else None,
            certificates=len(blocks),
            roots=[describe_cert(b) for b in blocks],
        )
    else:
        out["kind"] = f"unknown (fields {sorted(f)})"
    return out


SPIFFE_VALIDATOR = "envoy.tls.cert_validator.spiffe"
SPIFFE_VALIDATOR_TYPE = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
)


def spiffe_validator_domains(raw):
    """CertificateValidationContext.custom_validator_config = 12, a TypedExtensionConfig
    (name = 1, typed_config = 2, an Any: type_url = 1, value = 2) of Envoy's SPIFFE validator,
    whose SPIFFECertValidatorConfig lists trust_domains = 1 (name = 1, trust_bundle = 2):
    [(name, PEM)]."""
    ext = decode(raw)
    if _text(ext, 1) != SPIFFE_VALIDATOR:
        raise Failure(f"a custom validator {_text(ext, 1)!r}, not {SPIFFE_VALIDATOR!r}")
    typed = decode(_first(ext, 2))
    if _text(typed, 1) != SPIFFE_VALIDATOR_TYPE:
        raise Failure(f"a validator config of type {_text(typed, 1)!r}")
    config = decode(_first(typed, 2))
    domains = []
    for td in config.get(1, []):
        t = decode(td)
        domains.append((_text(t, 1), data_source(_first(t, 2)) if 2 in t else b""))
    return domains


def any_secret(raw):
    """google.protobuf.Any: type_url = 1, value = 2; must hold a Secret."""
    f = decode(raw)
    type_url = _text(f, 1)
    if type_url != SECRET_TYPE:
        raise Failure(f"a resource of type {type_url!r}, not {SECRET_TYPE!r}")
    return describe_secret(_first(f, 2))


def discovery_response(raw):
    """envoy.service.discovery.v3.DiscoveryResponse: version_info = 1, resources = 2 (Any),
    type_url = 4, nonce = 5."""
    f = decode(raw)
    return {
        "version_info": _text(f, 1),
        "type_url": _text(f, 4),
        "nonce": _text(f, 5),
        "secrets": [any_secret(r) for r in f.get(2, [])],
    }


def delta_response(raw):
    """envoy.service.discovery.v3.DeltaDiscoveryResponse: system_version_info = 1,
    resources = 2 (Resource: version = 1, resource = 2 (Any), name = 3), type_url = 4,
    nonce = 5, removed_resources = 6."""
    f = decode(raw)
    resources = []
    for r in f.get(2, []):
        rf = decode(r)
        resources.append(
            {
                "name": _text(rf, 3),
                "version": _text(rf, 1),
                "secret": any_secret(_first(rf, 2)) if 2 in rf else None,
            }
        )
    return {
        "system_version_info": _text(f, 1),
        "type_url": _text(f, 4),
        "nonce": _text(f, 5),
        "resources": resources,
        "removed": [r.decode() for r in f.get(6, [])],
    }


# --- checks ---------------------------------------------------------------------------------


def check_secrets(call, secrets, names):
    """Every asked-for name came, `default` as a certificate chain with its key, `ROOTCA` as
    trusted CAs, each with at least one certificate."""
    by_name = {s["name"]: s for s in secrets}
    for name in names:
        s = by_name.get(name)
        if s is None:
            raise Failure(f"{call}: no secret {name!r} among {sorted(by_name)}")
        if s["kind"] == "tls_certificate":
            if not s["certificates"] or not s["private_key"]:
                raise Failure(f"{call}: {name!r} without a certificate chain and key: {s}")
        elif s["kind"] == "validation_context":
            if not s["certificates"]:
                raise Failure(f"{call}: {name!r} without a trusted CA: {s}")
        else:
            raise Failure(f"{call}: {name!r} is neither a certificate nor a CA: {s}")


def check_sotw(call, resp, names):
    if resp["type_url"] != SECRET_TYPE:
        raise Failure(f"{call}: type_url {resp['type_url']!r}")
    if not resp["version_info"] or not resp["nonce"]:
        raise Failure(f"{call}: a response without version_info or nonce: {resp}")
    check_secrets(call, resp["secrets"], names)


# --- calls ----------------------------------------------------------------------------------


class RequestStream:
    """The request side of a bidirectional call: messages put here are sent in order;
    close() ends the stream."""

    _END = object()

    def __init__(self):
        self._q = queue.Queue()

    def send(self, message):
        self._q.put(message)

    def close(self):
        self._q.put(self._END)

    def __iter__(self):
        while True:
            m = self._q.get()
            if m is self._END:
                return
            yield m


class ResponseReader:
    """Reads a streaming call's responses on a thread, so that every wait on them is
    bounded: next() gives up after `timeout` seconds."""

    def __init__(self, call, decode_fn):
        self.call = call
        self._q = queue.Queue()
        self._decode = decode_fn
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        try:
            for raw in self.call:
                self._q.put(("response", self._decode(raw)))
            self._q.put(("end", None))
        except grpc.RpcError as e:
            self._q.put(("error", e))
        except Failure as e:
            self._q.put(("malformed", e))

    def next(self, timeout, what):
        try:
            kind, value = self._q.get(timeout=timeout)
        except queue.Empty:
            raise Failure(f"no {what} within {timeout} s") from None
        if kind == "response":
            return value
        if kind == "end":
            raise Failure(f"the stream ended (status {self.call.code()}) before {what}")
        if kind == "error":
            raise Failure(f"the stream failed before {what}: {value.code()} {value.details()!r}")
        raise Failure(f"{what} could not be decoded: {value}")

    def poll(self, timeout):
        """The next event within `timeout`, or None: ("response", r), ("end", None), ..."""
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None


def stream_secrets(channel, names, timeout, watch):
    call = channel.stream_stream(
        SDS + "StreamSecrets",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    requests = RequestStream()
    requests.send(discovery_request(names))
    responses = ResponseReader(call(iter(requests), timeout=timeout + watch + 5), discovery_response)
    try:
        first = responses.next(timeout, "first StreamSecrets response")
        check_sotw("StreamSecrets", first, names)
        # ACK: the version and nonce of the response, the same names.
        requests.send(discovery_request(names, first["version_info"], first["nonce"]))
        out = {"first": first, "acked": True}
        # The stream stays up after the ACK: nothing ends it, nothing is re-sent for it.
        settle = 1.0
        event = responses.poll(settle)
        if event is not None:
            kind, value = event
            if kind == "response" and value["version_info"] == first["version_info"]:
                raise Failure(f"the ACK was answered with the same version again: {value}")
            if kind != "response":
                raise Failure(f"the stream ended {settle} s after the ACK: {kind} {value}")
        if not responses.call.is_active():
            raise Failure(f"the stream is not active after the ACK: {responses.call.code()}")
        out["alive_after_ack_s"] = settle
        pushes = []
        if event is not None:
            pushes.append(event[1])
        if watch and not pushes:
            pushes.append(responses.next(watch, f"a push on the ACKed stream within {watch} s"))
        for p in pushes:
            check_sotw("StreamSecrets push", p, names)
            if p["version_info"] == first["version_info"]:
                raise Failure(f"a push with the version already ACKed: {p}")
            # ACK the push too, as Envoy would.
            requests.send(discovery_request(names, p["version_info"], p["nonce"]))
        out["pushes_after_ack"] = pushes
        if pushes and not responses.call.is_active():
            raise Failure("the stream ended after the push")
        return out
    finally:
        requests.close()
        responses.call.cancel()


def fetch_secrets(channel, names, timeout):
    call = channel.unary_unary(
        SDS + "FetchSecrets",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    try:
        raw = call(discovery_request(names), timeout=timeout)
    except grpc.RpcError as e:
        raise Failure(f"FetchSecrets failed: {e.code()} {e.details()!r}") from None
    resp = discovery_response(raw)
    check_sotw("FetchSecrets", resp, names)
    return resp


def delta_secrets(channel, names, timeout):
    call = channel.stream_stream(
        SDS + "DeltaSecrets",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    requests = RequestStream()
    requests.send(delta_request(subscribe=names))
    responses = ResponseReader(call(iter(requests), timeout=timeout + 5), delta_response)
    try:
        got, seen = [], {}
        deadline = time.monotonic() + timeout
        while set(names) - set(seen):
            left = max(0.0, deadline - time.monotonic())
            resp = responses.next(left, f"DeltaSecrets responses naming {sorted(names)}")
            if resp["type_url"] != SECRET_TYPE or not resp["nonce"]:
                raise Failure(f"DeltaSecrets: a response without type_url or nonce: {resp}")
            for r in resp["resources"]:
                if r["secret"] is None or r["secret"]["name"] != r["name"] or not r["version"]:
                    raise Failure(f"DeltaSecrets: a resource without its secret or version: {r}")
                seen[r["name"]] = r["secret"]
            got.append(resp)
            # ACK each response, as Envoy does (no node after the first request).
            requests.send(delta_request(response_nonce=resp["nonce"], with_node=False))
        check_secrets("DeltaSecrets", list(seen.values()), names)
        event = responses.poll(0.5)
        if event is not None and event[0] != "response":
            raise Failure(f"the delta stream ended after the ACK: {event}")
        return {"responses": got, "names": sorted(seen), "acked": True}
    finally:
        requests.close()
        responses.call.cancel()


def run_sds(args):
    target = "unix://" + args.socket
    names = [n for n in args.names.split(",") if n]
    # No options: the channel's authority is gRPC's own default for a unix: target.
    with grpc.insecure_channel(target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=args.timeout)
        except grpc.FutureTimeoutError:
            raise Failure(f"could not connect to {target} within {args.timeout} s") from None
        return {
            "target": target,
            "grpc_version": grpc.__version__,
            "authority_override": None,
            "stream": stream_secrets(channel, names, args.timeout, args.watch),
            "fetch": fetch_secrets(channel, names, args.timeout),
            "delta": delta_secrets(channel, names, args.timeout),
        }


def x509_svid_response(raw):
    """X509SVIDResponse: svids = 1 (X509SVID: spiffe_id = 1, x509_svid = 2 (DER),
    x509_svid_key = 3, bundle = 4)."""
    svids = []
    for s in decode(raw).get(1, []):
        f = decode(s)
        svids.append(
            {
                "spiffe_id": _text(f, 1),
                "cert_bytes": len(_first(f, 2)),
                "private_key": bool(_first(f, 3)),
                "bundle_bytes": len(_first(f, 4)),
            }
        )
    return {"svids": svids}


def fetch_x509_svid_once(channel, timeout, metadata):
    """The first message of FetchX509SVID, or the call's status: (code name, details, msg)."""
    call = channel.unary_stream(
        FETCH_X509_SVID, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    responses = call(b"", timeout=timeout, metadata=metadata)
    try:
        raw = next(responses)
        return "OK", "", x509_svid_response(raw)
    except grpc.RpcError as e:
        return e.code().name, e.details(), None
    except StopIteration:
        return responses.code().name, responses.details(), None
    finally:
        responses.cancel()


def run_workload_header(args):
    target = "unix://" + args.socket
    with grpc.insecure_channel(target) as channel:
        code, details, _ = fetch_x509_svid_once(channel, args.timeout, None)
        without = {"code": code, "details": details}
        if code != args.expect_code:
            raise Failure(
                f"{FETCH_X509_SVID} without the workload.spiffe.io header ended with {code} "
                f"({details!r}), expected {args.expect_code}"
            )
        code, details, resp = fetch_x509_svid_once(
            channel, args.timeout, (("workload.spiffe.io", "true"),)
        )
        with_header = {"code": code, "details": details, "response": resp}
        if code != "OK" or not resp or not resp["svids"]:
            raise Failure(
                f"{FETCH_X509_SVID} with the header did not answer an SVID: {with_header}"
            )
        return {
            "target": target,
            "grpc_version": grpc.__version__,
            "without_header": without,
            "with_header": with_header,
        }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    sds = sub.add_parser("sds", help="StreamSecrets, FetchSecrets, DeltaSecrets")
    sds.add_argument("--socket", required=True, help="absolute path of the SDS socket")
    sds.add_argument("--names", default="default,ROOTCA")
    sds.add_argument("--timeout", type=float, default=10.0)
    sds.add_argument(
        "--watch",
        type=float,
        default=0.0,
        help="seconds to wait for a push of a new version on the ACKed StreamSecrets stream",
    )
    wl = sub.add_parser("workload-header", help="FetchX509SVID without, then with, the header")
    wl.add_argument("--socket", required=True, help="absolute path of the Workload API socket")
    wl.add_argument("--expect-code", default="INVALID_ARGUMENT")
    wl.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()
    if not args.socket.startswith("/"):
        p.error("--socket must be absolute")
    try:
        out = run_sds(args) if args.mode == "sds" else run_workload_header(args)
    except Failure as e:
        print(f"sds_grpcio.py {args.mode}: FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
