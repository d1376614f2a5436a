"""What the non-Rust test clients share of callq's wire contract (version 1)."""

import os
import time
import uuid


def uuid7():
    """A UUID version 7 (RFC 9562): 48 bits of Unix milliseconds, then random.

    The call schema says a `call_id` MUST be a UUID v7 from the publisher's
    clock; Python before 3.14 has no uuid.uuid7().
    """
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a = rand >> 68  # 12 bits
    rand_b = rand & ((1 << 62) - 1)  # 62 bits
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    u = uuid.UUID(int=value)
    assert u.version == 7 and u.variant == uuid.RFC_4122
    return str(u)


def call(call_id, service, method, args, reply_to):
    """A call envelope, as schemas/json/call.schema.json describes it."""
    return {
        "v": 1,
        "call_id": call_id,
        "service": service,
        "method": method,
        "args": args,
        "reply_to": reply_to,
    }
