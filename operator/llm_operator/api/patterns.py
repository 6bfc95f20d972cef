"""The regexes the API models validate with, in one place: the LLMDeployment and the gateway's
configuration check the same names the same way (and the CRD carries them to the API server)."""

from __future__ import annotations

# A Go-style duration as Kubernetes tools write it: 30s, 5m, 1h30m, 500ms.
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
# Resource quantities as Kubernetes accepts them: 16Gi, 500m, 2, 1.5G.
# Kubernetes' resource.Quantity grammar, unsigned (a request or size is never negative):
# digits with at most one point, then a binary (Ki..Ei) or decimal (n..E) suffix or an
# exponent. "1.2.3" and "." do not match (the API server would refuse them in the Pod).
QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# What clients may send as "model": an OpenAI-style id such as llama-70b or org/model:tag.
SERVED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"
# A container's environment variable, as the API server accepts it (dots and dashes allowed).
CONTAINER_ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
# A variable the gateway reads from its own process environment: a POSIX shell name, so it can
# also be set with `export` and in the chart's env list.
PROCESS_ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
# host:port, where host is a DNS name, an IPv4 address or a bracketed IPv6 address.
ADDRESS_PATTERN = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?):[0-9]{1,5}$"
SHA256_HEX_PATTERN = r"^[0-9a-f]{64}$"
# Label keys and values as Kubernetes validates them: an optional DNS-subdomain prefix and a
# name of at most 63 characters; a value of at most 63 (possibly empty).
LABEL_NAME_PART = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*/)?"
    + LABEL_NAME_PART
    + "$"
)
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LABEL_PREFIX_MAX = 253
# An IANA_SVC_NAME (a container port's name): a DNS label of at most 15 characters.
PORT_NAME_PATTERN = DNS_LABEL_PATTERN
