"""Security check (issue 17): the gateway compares client keys in constant time.

What the gateway does (gateway/admission.py `identify`): it hashes the presented bearer token
with SHA-256 and looks the hex digest up in a dict of the configured keys' digests
(`RoutingTable.keys`, built with routing.hash_key). No comparison ever touches a raw key.

Why a dict lookup of a SHA-256 digest is safe although dict lookups are not constant time: the
only thing a timing difference can reveal is how the *digest of the attacker's own guess*
relates to a stored digest (hash bucket, then a string compare of digests). Steering a guess so
that its digest shares a longer prefix with a stored one is a preimage search on SHA-256; so the
byte-by-byte leak that makes `==` on raw secrets dangerous gives nothing here. The digests are
also all the same length, so length leaks nothing either. (hmac.compare_digest over every key
would be constant time too, but O(keys) per request.)

These tests pin that property so a refactor cannot silently replace it with `==` on keys.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import re
from pathlib import Path

from llm_operator.gateway import admission, routing

GATEWAY = Path(admission.__file__).resolve().parent
#: Names that hold a presented token or a raw client key in the gateway (`key` alone names
#: backends and selectors there, so it is not one of them).
SECRET_NAMES = re.compile(r"^(token|auth|api_?key|raw_?key|client_?key|secret|bearer)$", re.I)


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def test_identify_looks_up_the_sha256_digest_of_the_token() -> None:
    source = inspect.getsource(admission.identify)
    tree = ast.parse(source)
    lookups = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == "get"
        and _name(n.func.value) == "keys"
    ]
    assert len(lookups) == 1, "identify() should look the key up once, by digest"
    [arg] = lookups[0].args
    # keys.get(hashlib.sha256(token).hexdigest())
    assert isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute)
    assert arg.func.attr == "hexdigest"
    inner = arg.func.value
    assert isinstance(inner, ast.Call) and _name(inner.func) == "sha256"
    assert [_name(a) for a in inner.args] == ["token"]


def test_no_gateway_module_compares_a_raw_key_with_eq_or_in() -> None:
    """`==`, `!=`, `in` on a token or key variable would leak it byte by byte."""
    found = []
    for path in sorted(GATEWAY.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            secret = [_name(s) for s in sides if SECRET_NAMES.match(_name(s) or "")]
            # `x is None` and comparisons with literals are not comparisons of secrets.
            literal = any(isinstance(s, ast.Constant) for s in sides)
            identity = all(isinstance(op, ast.Is | ast.IsNot) for op in node.ops)
            if secret and not literal and not identity:
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "raw key comparisons (hash, then look the digest up):\n" + "\n".join(found)


def test_the_table_holds_only_fixed_length_digests_of_keys() -> None:
    digest = routing.hash_key("sk-secret-value")
    assert digest == hashlib.sha256(b"sk-secret-value").hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert "sk-secret-value" not in digest
    # The table's docstring promises digests, and identify() hashes with the same function.
    assert routing.hash_key("k") == hashlib.sha256(b"k").hexdigest()
