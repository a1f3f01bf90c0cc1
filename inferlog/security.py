"""Kafka security for inferlog: the ACLs each role needs, SCRAM users, throwaway certificates.

ROLES is data on purpose: the `inferlog kafka acls` command, the tests and SECURITY.md (and
so the Helm docs) all read the same table. Resource names are templates over Settings
fields, so the roles follow renamed topics and groups.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .clients import confluent_config
from .errors import InferlogError
from .settings import Settings

SCRAM_MECHANISM = "SCRAM-SHA-512"
SCRAM_ITERATIONS = 8192


class SecurityError(InferlogError):
    """ACLs or SCRAM credentials could not be applied."""


@dataclass(frozen=True)
class Grant:
    """ALLOW `operations` on one resource (pattern) to the role's principal, from any host."""

    resource: str  # topic | group | transactional_id | cluster
    name: str  # a template over Settings fields, e.g. "{results_topic}"
    pattern: str  # literal | prefixed
    operations: tuple[str, ...]  # AclOperation names


_REQUESTS = ("{requests_topic}", "{high_priority_topic}")


def _requests(*operations: str) -> tuple[Grant, ...]:
    """`operations` on every model's request topics (<base>.<model>, topic_layout per-model) and
    on the shared ones (topic_layout shared, or an old deployment's), both tiers."""
    return (*(Grant("topic", t, "literal", operations) for t in _REQUESTS),
            *(Grant("topic", t + ".", "prefixed", operations) for t in _REQUESTS))


_OUTPUTS = ("{results_topic}", "{deadletter_topic}")


def _outputs(*operations: str) -> tuple[Grant, ...]:
    """`operations` on every model's results and dead-letter topics (<base>.<model>, topic_layout
    per-model) and on the shared ones (topic_layout shared, or an old deployment's)."""
    return (*(Grant("topic", t, "literal", operations) for t in _OUTPUTS),
            *(Grant("topic", t + ".", "prefixed", operations) for t in _OUTPUTS))



ROLES: dict[str, tuple[Grant, ...]] = {
    # Writes requests (both priority tiers), and reads the model registry by assignment (the
    # SDK's and `inferlog produce`'s check of a request's model; the group id is librdkafka's
    # requirement): no results, no other group.
    "producer": (
        *_requests("WRITE", "DESCRIBE"),
        Grant("cluster", "kafka-cluster", "literal", ("IDEMPOTENT_WRITE",)),
        Grant("topic", "{models_topic}", "literal", ("READ", "DESCRIBE")),
        Grant("group", "inferlog-models-", "prefixed", ("READ", "DESCRIBE")),
    ),
    # Consumes its model's requests in its model's group (group_id.<model>), writes its model's
    # results and dead letters (topics it may create: a new model needs no admin) in transactions whose ids
    # all start with inferlog-<group> (consumer/emit.py), and reads them back where its own
    # transactions were left open (the sweep, consumer/sweep.py, by assignment).
    "worker": (
        *_requests("READ", "DESCRIBE", "CREATE"),
        Grant("group", "{group_id}", "literal", ("READ", "DESCRIBE")),  # the shared layout's
        Grant("group", "{group_id}.", "prefixed", ("READ", "DESCRIBE")),  # each model's
        *_outputs("READ", "WRITE", "DESCRIBE", "CREATE"),
        Grant("transactional_id", "inferlog-{group_id}-", "prefixed", ("WRITE", "DESCRIBE")),
        Grant("transactional_id", "inferlog-{group_id}.", "prefixed", ("WRITE", "DESCRIBE")),
        Grant("cluster", "kafka-cluster", "literal", ("IDEMPOTENT_WRITE",)),
        # its announcement of the model it serves (inferlog/registry.py), outside transactions
        Grant("topic", "{models_topic}", "literal", ("WRITE", "DESCRIBE")),
    ),
    # The producer's rights plus reading outcomes: the SDK's infer() and the HTTP gateway
    # read results and dead letters by assignment (the SDK's client needs a group id).
    "gateway": (
        *_requests("WRITE", "DESCRIBE"),
        Grant("cluster", "kafka-cluster", "literal", ("IDEMPOTENT_WRITE",)),
        *_outputs("READ", "DESCRIBE"),
        Grant("group", "inferlog-replies-", "prefixed", ("READ", "DESCRIBE")),
        # the model registry, read by assignment (the group id is librdkafka's requirement)
        Grant("topic", "{models_topic}", "literal", ("READ", "DESCRIBE")),
        Grant("group", "inferlog-models-", "prefixed", ("READ", "DESCRIBE")),
    ),
    # Reads everything the service wrote, never writes. Audit and replay-window readers
    # assign partitions themselves; the group grants cover their group ids.
    "auditor": (
        *_requests("READ", "DESCRIBE"),
        *_outputs("READ", "DESCRIBE"),
        Grant("group", "inferlog-audit", "prefixed", ("READ", "DESCRIBE")),
        Grant("group", "inferlog-window-", "prefixed", ("READ", "DESCRIBE")),
    ),
}
# `inferlog kafka acls --standard`: each role for the user of the same name.
STANDARD_PRINCIPALS = {role: f"User:{role}" for role in ROLES}


class Acl(NamedTuple):
    principal: str
    resource: str
    name: str
    pattern: str
    operation: str


def role_acls(role: str, principal: str, settings: Settings) -> list[Acl]:
    """The role's grants with names filled in from `settings`, one Acl per operation."""
    if role not in ROLES:
        raise SecurityError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    if not principal.startswith("User:"):
        raise SecurityError(f"principal {principal!r} must look like User:<name>")
    fields = settings.model_dump()
    out = []
    for g in ROLES[role]:
        name = g.name.format(**fields)
        out += [Acl(principal, g.resource, name, g.pattern, op) for op in g.operations]
    return list(dict.fromkeys(out))  # a topic named twice (requests == high tier) once


def _binding(acl: Acl):
    from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

    # librdkafka calls the cluster resource BROKER; its name is always "kafka-cluster".
    restype = ResourceType.BROKER if acl.resource == "cluster" else ResourceType[acl.resource.upper()]
    return AclBinding(restype, acl.name, ResourcePatternType[acl.pattern.upper()], acl.principal, "*",
                      AclOperation[acl.operation], AclPermissionType.ALLOW)


def _admin(settings: Settings):
    from confluent_kafka.admin import AdminClient

    return AdminClient(confluent_config(settings))


def apply_acls(admin_settings: Settings, acls: list[Acl], timeout: float = 30) -> int:
    """Create the ACLs (idempotent: the broker keeps one copy) as the principal in
    `admin_settings`, which needs ALTER on the cluster (a super user). Returns how many."""
    from confluent_kafka import KafkaException

    admin = _admin(admin_settings)  # held until the futures resolve: a collected client fails them
    futures = admin.create_acls([_binding(a) for a in acls], request_timeout=timeout)
    for binding, fut in futures.items():
        try:
            fut.result()
        except KafkaException as e:
            raise SecurityError(f"cannot create ACL {binding}: {e.args[0].str()}") from e
    # The controller acknowledges before the brokers' authorizers have the new ACLs: wait,
    # so that a client started next is not refused.
    wanted, deadline = set(futures), time.monotonic() + timeout
    while not wanted <= _existing(admin, timeout):
        if time.monotonic() > deadline:
            raise SecurityError(f"ACLs created but not in force on {admin_settings.bootstrap_servers} in time")
        time.sleep(0.1)
    return len(futures)


def _existing(admin, timeout: float) -> set:
    from confluent_kafka.admin import AclBindingFilter, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

    any_acl = AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, None, None, AclOperation.ANY,
                               AclPermissionType.ANY)
    return set(admin.describe_acls(any_acl, request_timeout=timeout).result())


def upsert_scram_users(admin_settings: Settings, users: dict[str, str], timeout: float = 30) -> None:
    """Create or change SCRAM-SHA-512 credentials (AlterUserScramCredentials)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion

    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS)
    admin = _admin(admin_settings)
    futures = admin.alter_user_scram_credentials(
        [UserScramCredentialUpsertion(u, info, p.encode()) for u, p in users.items()], request_timeout=timeout)
    for user, fut in futures.items():
        try:
            fut.result()
        except KafkaException as e:  # the error names the user, never the password
            raise SecurityError(f"cannot set SCRAM credentials of {user!r}: {e.args[0].str()}") from e


def scram_users(admin_settings: Settings, timeout: float = 10) -> set[str]:
    """Users that have SCRAM credentials on the cluster."""
    admin = _admin(admin_settings)
    return set(admin.describe_user_scram_credentials(request_timeout=timeout).result())


# -- certificates --------------------------------------------------------------------------
class TlsFiles(NamedTuple):
    certfile: str  # the broker's certificate (PEM)
    keyfile: str  # its private key (PEM)
    cafile: str  # the CA that signed it: what clients put in ssl_cafile


def generate_certs(out_dir: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 30,
                   ca_name: str = "inferlog throwaway CA") -> TlsFiles:
    """A fresh CA and a broker certificate for `hosts` (subject alternative names, since
    clients verify the host). For local brokers and tests, not for production."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name(ca_name)).issuer_name(name(ca_name))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def san(h: str) -> x509.GeneralName:
        try:
            return x509.IPAddress(ipaddress.ip_address(h))
        except ValueError:
            return x509.DNSName(h)

    cert = (x509.CertificateBuilder().subject_name(name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([san(h) for h in hosts]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    files = TlsFiles(str(out / "broker.crt"), str(out / "broker.key"), str(out / "ca.crt"))
    Path(files.certfile).write_bytes(cert.public_bytes(pem))
    Path(files.cafile).write_bytes(ca.public_bytes(pem))
    # PKCS#8: the only unencrypted key form Kafka's PEM keystore reads.
    write_private(Path(files.keyfile), key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return files


def pkcs8_pem(key_pem: bytes) -> bytes:
    """The key as unencrypted PKCS#8 PEM, converting PKCS#1/SEC1 keys (Kafka reads only PKCS#8)."""
    if b"-----BEGIN PRIVATE KEY-----" in key_pem:
        return key_pem
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(key_pem, password=None)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private(path: Path, data: bytes | str) -> None:
    """Write a file only its owner can read, mode set at creation (no window at 0644)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
    with open(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
