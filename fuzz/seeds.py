#!/usr/bin/env python3
"""Writes the checked-in seed corpora under fuzz/corpus/ (run from anywhere).

Real shapes of what each parser reads: session hashes and script replies as Redis sends them
in RESP2 and RESP3, inbox reads, and request headers. libFuzzer mutates from these.
"""
import pathlib
import struct

ROOT = pathlib.Path(__file__).resolve().parent / "corpus"


def bulk(text):
    data = text.encode() if isinstance(text, str) else text
    return b"$%d\r\n%s\r\n" % (len(data), data)


def array(items):
    return b"*%d\r\n" % len(items) + b"".join(items)


def resp3_map(pairs):
    return b"%%%d\r\n" % len(pairs) + b"".join(k + v for k, v in pairs)


def integer(n):
    return b":%d\r\n" % n


SESSION = [
    ("m:tenant", "acme"), ("m:created", "1764950400000"), ("m:abs", "1765555200000"),
    ("m:idle", "1800000"), ("m:persist", "1"), ("m:user", "alice"),
    ("d:count", "3"), ("d:cart", '{"items":[1,2]}'), ("t:d:count", "1764950401000"),
]

seeds = {
    "session_hash": {
        "resp2": array([bulk(x) for pair in SESSION for x in pair]),
        "resp3": resp3_map([(bulk(k), bulk(v)) for k, v in SESSION]),
        "nil": b"_\r\n",
        "empty": b"*0\r\n",
        "no-metadata": array([bulk("d:a"), bulk("1")]),
        "not-json": array([bulk(x) for pair in SESSION[:5] + [("d:a", "{")] for x in pair]),
        # Found by the fuzzer: a tenant's name is written back in lower case.
        "mixed-case-tenant": array([bulk(x) for pair in [("m:tenant", "aCme")] + SESSION[1:] for x in pair]),
    },
    "ratelimit_reply": {
        "allowed": struct.pack("<Q", 100) + bulk("1 99 60000000 -1 0 0 1764950400000000"),
        "refused": struct.pack("<Q", 10) + bulk("0 0 1500000 1500000 0 0 1764950400000000"),
        "blocked": struct.pack("<Q", 10) + bulk("0 0 30000000 30000000 1 1764950430000000 1764950400000000"),
        "array": struct.pack("<Q", 10) + array([integer(1), integer(5), integer(1000), integer(-1)]),
        "error": struct.pack("<Q", 10) + b"-NOSCRIPT No matching script.\r\n",
    },
    "registry_reply": {
        "resp2": array([array([bulk("tt:inbox:i1"), array([
            array([bulk("1764950400000-0"), array([bulk("t"), bulk("acme"), bulk("u"), bulk("alice"), bulk("m"), bulk("hello")])]),
            array([bulk("1764950400001-0"), array([bulk("t"), bulk("acme")])]),
        ])])]),
        "resp3": resp3_map([(bulk("tt:inbox:i1"), array([
            array([bulk("1764950400000-0"), array([bulk("t"), bulk("beta"), bulk("u"), bulk("bob"), bulk("m"), bulk("hi")])]),
        ]))]),
        "nil": b"_\r\n",
        "member": b"instance-7f3a/42",
    },
    "session_id": {
        "cookie": b"\x00id\x00\x01\x00\x00\x00id=AAAAAAAAAAAAAAAAAAAAAA; other=1",
        "header": b"\x01x-session-id\x00AAAAAAAAAAAAAAAAAAAAAA",
        "signed": b"\x02id\x00\x02\x00\x00\x00id=\"abc\"; id=AAAAAAAAAAAAAAAAAAAAAA",
    },
    "client_key": {
        "xff": b"\x00\x0a\x00\x00\x01\x0110.0.0.0/8\x00\x01\x00203.0.113.7, 10.0.0.2",
        "forwarded": b"\x00\x0a\x00\x00\x01\x0110.0.0.1\x00\x00\x00for=\"[2001:db8::1]:443\";proto=https",
    },
    "tenant": {
        "path": b"/t/acme/orders?page=2\x00\x01",
        "host": b"http://Acme.example.com:8080/\x00",
        "header": b"/\x00\x00\x01beta",
    },
}

for target, files in seeds.items():
    directory = ROOT / target
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / f"seed-{name}").write_bytes(data)
print(f"wrote {sum(len(f) for f in seeds.values())} seeds into {ROOT}")
