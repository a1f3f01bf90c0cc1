"""A real single-node Apache Kafka broker (KRaft) from Maven Central's jars and the local JDK.

`inferlog kafka fetch|start|stop|status|topics|acls`. The broker is the one in Apache Kafka's
distribution (kafka.Kafka), only resolved by Maven instead of unpacked from a tarball, so
tests and the demo run against the same code as production.

Secure mode (sasl_users, optionally tls): clients authenticate with SASL/SCRAM-SHA-512 on
SASL_PLAINTEXT, or SASL_SSL when certificates are given; the StandardAuthorizer denies
whatever no ACL allows; `admin` is the only super user. See SECURITY.md.
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import click

from .errors import ConfigError, InferlogError
from .options import settings_from, settings_options
from .security import (ROLES, SCRAM_MECHANISM, STANDARD_PRINCIPALS, SecurityError, TlsFiles, apply_acls, pkcs8_pem,
                       role_acls, write_private)
from .settings import Settings

POM = Path(__file__).with_name("kafka") / "pom.xml"
LOG4J2 = Path(__file__).with_name("kafka") / "log4j2.xml"

# Single node, transactions on, nothing waits for replicas or rebalance delays that only
# make sense with many brokers. Topics are created on purpose (inferlog.topics), never by
# a typo in a producer.
BROKER_DEFAULTS = {
    "process.roles": "broker,controller",
    "node.id": "1",
    "controller.listener.names": "CONTROLLER",
    "inter.broker.listener.name": "PLAINTEXT",
    "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
    "auto.create.topics.enable": "false",
    "num.partitions": "1",
    "default.replication.factor": "1",
    "min.insync.replicas": "1",
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "12",  # 50 by default: slow first group join on 2 cores
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "12",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "group.initial.rebalance.delay.ms": "0",
    "group.min.session.timeout.ms": "1000",  # lets crash tests use short session timeouts
    # the consumer group protocol (KIP-848) keeps its session and heartbeat on the broker: a
    # dead worker's partitions move after 6 s (45 s by default), and assignments reach the
    # members within a second (5 s heartbeats by default)
    "group.consumer.session.timeout.ms": "6000",
    "group.consumer.min.session.timeout.ms": "1000",
    "group.consumer.heartbeat.interval.ms": "1000",
    "group.consumer.min.heartbeat.interval.ms": "500",
    # One node is the controller and its only broker: fencing the broker (no heartbeat within
    # its session) leaves every partition leaderless, with nobody to take over, until it comes
    # back. On a loaded 2-core machine the node stalled for 10 to 13 s ("Exceptionally slow
    # controller event writeNoOpRecord ... took 9918 ms", nothing logged for 13 s) and with
    # the 9 s default the controller fenced its own broker mid-suite (issue 24). 20 s rides
    # that out. Longer costs every restart after an unclean stop (SIGKILL): the controller
    # holds the dead broker's session open from its start and the broker may register again
    # only once it expires (measured here: answers after 18 s with 9 s, 30 s with 20 s, 44 s
    # with 30 s). A clean stop fences the broker itself: no wait.
    "broker.session.timeout.ms": "20000",
    "num.network.threads": "2",
    "num.io.threads": "4",
    "num.recovery.threads.per.data.dir": "1",
    "log.cleaner.threads": "1",
}
ADMIN = "admin"  # the super user; the broker also uses it for its own connections
STANDARD_USERS = (ADMIN, *(p.split(":", 1)[1] for p in STANDARD_PRINCIPALS.values()))
# 1 GiB is headroom, not the fix of issue 24: grown the suite's way to ~1,900 partitions
# under load, the broker kept ~220 MB after young collections, paused 0.3 s at most, no full GC. The GC and safepoint log (in the data
# dir, where the broker runs) tells a stop of the whole JVM from a stalled thread.
JVM_OPTS = ["-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true",
            "-Xlog:gc,safepoint:file=gc.log:time,uptime:filecount=2,filesize=10m"]


class LocalKafkaError(InferlogError):
    """The local broker could not be fetched, formatted, started or stopped."""


def _cluster_id() -> str:
    # Kafka's Uuid string form: 16 random bytes, URL-safe base64 without padding; Kafka
    # never hands out ids starting with '-' (they read as command-line flags).
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie answers kill(0) but is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class LocalKafka:
    def __init__(self, libs_dir: Path, data_dir: Path, port: int = 9092, controller_port: int = 9093,
                 version: str = "4.1.1", extra: dict[str, str] | None = None,
                 sasl_users: dict[str, str] | None = None, tls: TlsFiles | tuple[str, str, str] | None = None):
        # Absolute from here on: the broker runs with its data dir as cwd, mvn from the pom's.
        self.libs_dir = Path(libs_dir).resolve()
        self.data_dir = Path(data_dir).resolve()
        self.port, self.controller_port, self.version = port, controller_port, version
        self.extra = dict(extra or {})
        self.sasl_users = dict(sasl_users or {})
        self.tls = TlsFiles(*(str(Path(f).resolve()) for f in tls)) if tls else None
        if self.tls and not self.sasl_users:
            raise LocalKafkaError("tls needs sasl_users: the local broker serves SASL_SSL, not bare SSL")
        if self.sasl_users:
            if ADMIN not in self.sasl_users:
                raise LocalKafkaError(f"sasl_users must include {ADMIN!r}, the super user")
            for user, pw in self.sasl_users.items():
                # They end up inside JAAS strings and a --add-scram argument.
                if not user.replace("-", "").replace("_", "").replace(".", "").isalnum():
                    raise LocalKafkaError(f"SASL user name {user!r}: use letters, digits, . _ -")
                if not pw or any(c in pw for c in '"\\\n\r,[]='):
                    raise LocalKafkaError(f"the password of {user!r} is empty or has one of \" \\ , [ ] = or a newline")
        self._proc: subprocess.Popen | None = None
        self.started_in: float | None = None  # seconds the last start() took

    @classmethod
    def from_settings(cls, settings: Settings, **kw) -> "LocalKafka":
        """The broker that settings.bootstrap_servers points at, when that is 127.0.0.1:<port>."""
        home = Path(settings.kafka_home)
        kw.setdefault("port", settings.kafka_port or _default_port(settings))
        kw.setdefault("controller_port", settings.kafka_controller_port or kw["port"] + 1)
        kw.setdefault("libs_dir", settings.kafka_libs_dir or home / "libs" / settings.kafka_version)
        kw.setdefault("data_dir", settings.kafka_data_dir or home / "data")
        kw.setdefault("version", settings.kafka_version)
        return cls(**kw)

    # -- paths ---------------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def security_protocol(self) -> str:
        if not self.sasl_users:
            return "PLAINTEXT"
        return "SASL_SSL" if self.tls else "SASL_PLAINTEXT"

    def client_settings(self, user: str | None = ADMIN, **fields) -> Settings:
        """Settings that connect to this broker as `user` (None: with no credentials)."""
        conn: dict = {"bootstrap_servers": self.bootstrap, "security_protocol": self.security_protocol}
        if self.sasl_users and user is not None:
            conn.update(sasl_mechanism=SCRAM_MECHANISM, sasl_username=user, sasl_password=self.sasl_users[user])
        elif self.sasl_users:  # what an unauthenticated client gets: the port without SASL
            conn["security_protocol"] = "SSL" if self.tls else "PLAINTEXT"
        if self.tls:
            conn["ssl_cafile"] = self.tls.cafile
        return Settings(**conn, **fields)

    def scrub(self, text: str) -> str:
        """`text` with every password replaced, for error messages that quote tool output."""
        for pw in self.sasl_users.values():
            text = text.replace(pw, "***")
        return text

    @property
    def log_file(self) -> Path:
        return self.data_dir / "broker.log"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "broker.pid"

    @property
    def properties_file(self) -> Path:
        return self.data_dir / "server.properties"

    def _jars_present(self) -> bool:
        return (self.libs_dir / f"kafka_2.13-{self.version}.jar").is_file()

    # -- fetch ---------------------------------------------------------------------------
    def fetch(self) -> Path:
        """Resolve the broker's jars once; later calls find them and return at once."""
        if self._jars_present():
            return self.libs_dir
        mvn = shutil.which("mvn")
        if not mvn:
            raise LocalKafkaError("Maven (mvn) is needed once to fetch Kafka's jars; install it or "
                                  f"put the jars of kafka_2.13-{self.version} into {self.libs_dir}")
        # Resolve into a sibling folder and rename: an interrupted download never looks complete.
        tmp = self.libs_dir.with_name(f".{self.libs_dir.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        cmd = [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies", "-DincludeScope=runtime",
               f"-DoutputDirectory={tmp}", f"-Dkafka.version={self.version}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not (tmp / f"kafka_2.13-{self.version}.jar").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            raise LocalKafkaError(f"mvn could not resolve org.apache.kafka:kafka_2.13:{self.version}:\n"
                                  f"{(res.stdout + res.stderr)[-3000:]}")
        if self._jars_present():  # someone else finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(self.libs_dir, ignore_errors=True)
            os.replace(tmp, self.libs_dir)
        return self.libs_dir

    # -- process -------------------------------------------------------------------------
    def pid(self) -> int | None:
        """The broker's pid if it is running from this data dir, else None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if not _alive(pid):
            return None
        try:  # the pid may have been reused by an unrelated process since
            if b"kafka.Kafka" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return None
        except OSError:
            pass  # no /proc (macOS): trust the pid file
        return pid

    def is_running(self) -> bool:
        return self.pid() is not None

    def _java(self) -> str:
        home = os.environ.get("JAVA_HOME")
        java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
        if not java or not Path(java).exists():
            raise LocalKafkaError("no java found (need JDK 17+ on PATH or JAVA_HOME)")
        return java

    def _classpath(self) -> str:
        return str(self.libs_dir / "*")

    def _write_properties(self) -> None:
        props = {
            **BROKER_DEFAULTS,
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            # Static voters, not a dynamic quorum: the controller port may change between
            # runs on the same data dir without re-formatting.
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "log.dirs": str(self.data_dir / "logs"),
            **(self._security_properties() if self.sasl_users else {}),
            **self.extra,
        }
        text = "".join(f"{k}={v}\n" for k, v in props.items())
        if self.sasl_users:  # the JAAS lines carry the admin password
            write_private(self.properties_file, text)
        else:
            self.properties_file.write_text(text)

    def _security_properties(self) -> dict[str, str]:
        pw = self.sasl_users[ADMIN]
        props = {
            # Clients on CLIENT (SCRAM, which lives in the cluster metadata, so users can be
            # added at run time). The controller listener cannot use SCRAM (the controller
            # would need its own metadata to log in), so it takes PLAIN with one static user:
            # admin. No listener lets anyone in unauthenticated.
            "listeners": f"CLIENT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"CLIENT://127.0.0.1:{self.port}",
            "listener.security.protocol.map": f"CLIENT:{self.security_protocol},CONTROLLER:SASL_PLAINTEXT",
            # The broker talks to itself too (transaction markers): as admin, over SCRAM.
            "inter.broker.listener.name": "CLIENT",
            "sasl.mechanism.inter.broker.protocol": SCRAM_MECHANISM,
            "listener.name.client.sasl.enabled.mechanisms": SCRAM_MECHANISM,
            f"listener.name.client.{SCRAM_MECHANISM.lower()}.sasl.jaas.config":
                f'org.apache.kafka.common.security.scram.ScramLoginModule required username="{ADMIN}" password="{pw}";',
            "sasl.mechanism.controller.protocol": "PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.controller.plain.sasl.jaas.config":
                f'org.apache.kafka.common.security.plain.PlainLoginModule required username="{ADMIN}" '
                f'password="{pw}" user_{ADMIN}="{pw}";',
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": f"User:{ADMIN}",
            "allow.everyone.if.no.acl.found": "false",
        }
        if self.tls:
            # A PEM keystore is one file: the PKCS#8 key, then the certificate chain.
            keystore = self.data_dir / "tls" / "keystore.pem"
            write_private(keystore, pkcs8_pem(Path(self.tls.keyfile).read_bytes()).rstrip(b"\n") + b"\n"
                          + Path(self.tls.certfile).read_bytes())
            props.update({
                "listener.name.client.ssl.keystore.type": "PEM",
                "listener.name.client.ssl.keystore.location": str(keystore),
                # Its own connections (inter-broker) verify its certificate like any client.
                "listener.name.client.ssl.truststore.type": "PEM",
                "listener.name.client.ssl.truststore.location": self.tls.cafile,
            })
        return props

    def _format_storage(self, java: str) -> None:
        if (self.data_dir / "logs" / "meta.properties").exists():
            return  # formatted on an earlier start: the data stays
        cmd = [java, "-Xmx256m", f"-Dlog4j2.configurationFile={LOG4J2}", "-cp", self._classpath(),
               "kafka.tools.StorageTool", "format", "--config", str(self.properties_file),
               "--cluster-id", _cluster_id(), "--ignore-formatted"]
        if self.sasl_users:
            # Only admin is bootstrapped here (the broker needs it to start); the other users
            # are set through the Admin API once it runs, so they can change later.
            cmd += ["--add-scram", f"{SCRAM_MECHANISM}=[name={ADMIN},password={self.sasl_users[ADMIN]}]"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise LocalKafkaError(f"formatting {self.data_dir / 'logs'} failed:\n"
                                  f"{self.scrub((res.stdout + res.stderr)[-3000:])}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return self.scrub("\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:]))
        except OSError:
            return "(no broker log)"

    def start(self, timeout: float = 90) -> str:
        """Start the broker (idempotent) and return its bootstrap servers once it answers."""
        if self.is_running():
            return self.bootstrap
        if not self._jars_present():
            raise LocalKafkaError(f"no Kafka {self.version} jars in {self.libs_dir}; run `inferlog kafka fetch`")
        for p in (self.port, self.controller_port):
            if _port_open(p):
                raise LocalKafkaError(f"port {p} on 127.0.0.1 is already in use by another process")
        java = self._java()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.sasl_users:
            self.data_dir.chmod(0o700)
        self._write_properties()
        self._format_storage(java)
        cmd = [java, *JVM_OPTS, f"-Dlog4j2.configurationFile={LOG4J2}",
               f"-Dkafka.logs.dir={self.data_dir}", "-cp", self._classpath(),
               "kafka.Kafka", str(self.properties_file)]
        t0 = time.monotonic()
        with open(self.log_file, "ab") as log:
            # Its own session: Ctrl-C in the shell that ran `inferlog kafka start` must not
            # reach the broker, and stop() can signal the whole group.
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          cwd=self.data_dir, start_new_session=True)
        self.pid_file.write_text(str(self._proc.pid))
        try:
            self._wait_ready(t0 + timeout)
            if self.sasl_users:
                self._ensure_users(t0 + timeout)
        except BaseException:
            self.stop(timeout=10)
            raise
        self.started_in = time.monotonic() - t0
        return self.bootstrap

    def _wait_ready(self, deadline: float) -> None:
        from confluent_kafka import KafkaError
        from confluent_kafka.admin import AdminClient

        from .clients import confluent_config

        admin, errors = None, []

        def on_error(err):  # librdkafka's own errors: the only place auth failures show
            if err.code() == KafkaError._AUTHENTICATION:
                errors.append(err)

        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise LocalKafkaError(f"the broker exited with code {self._proc.returncode}; "
                                      f"{self.log_file}:\n{self.log_tail()}")
            if errors:
                raise LocalKafkaError(f"{ADMIN} cannot log in to {self.bootstrap} ({errors[0].str()}): {self.data_dir} "
                                      "was formatted without SASL or with another admin password; "
                                      "use that password or a fresh data dir")
            # Probe the socket first: librdkafka would log every refused connection.
            if _port_open(self.port):
                admin = admin or AdminClient(confluent_config(self.client_settings(), log_level=3, error_cb=on_error))
                try:
                    if admin.list_topics(timeout=2).brokers:
                        return
                except Exception:
                    admin.poll(0)  # serves on_error
            time.sleep(0.2)
        raise LocalKafkaError(f"the broker did not answer on {self.bootstrap} in time; "
                              f"{self.log_file}:\n{self.log_tail()}")

    def _ensure_users(self, deadline: float) -> None:
        """SCRAM credentials for every user but admin (set at format), changed or not: the
        passwords given now are the ones that work. Returns once the broker accepts them."""
        from .security import scram_users, upsert_scram_users

        others = {u: p for u, p in self.sasl_users.items() if u != ADMIN}
        if not others:
            return
        admin = self.client_settings()
        upsert_scram_users(admin, others)
        # The controller acknowledges before the broker has applied the new metadata.
        while not set(others) <= scram_users(admin):
            if time.monotonic() > deadline:
                raise LocalKafkaError(f"SCRAM users {sorted(others)} not visible on {self.bootstrap} in time")
            time.sleep(0.1)

    def stop(self, timeout: float = 30) -> bool:
        """SIGTERM for a clean shutdown (data flushed, no log recovery next start); SIGKILL
        only after `timeout`. Returns whether a broker was running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        self._signal(pid, signal.SIGTERM)
        if not self._wait_exit(pid, timeout):
            self._signal(pid, signal.SIGKILL)
            self._wait_exit(pid, 10)
        self.pid_file.unlink(missing_ok=True)
        self._proc = None
        return True

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        try:
            os.killpg(pid, sig)  # its own group, see start()
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(pid, sig)

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        if self._proc is not None and self._proc.pid == pid:  # our child: reap it
            try:
                self._proc.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                return True
            time.sleep(0.1)
        return False

    def _running_bootstrap(self) -> str:
        # The running broker may have been started with other ports than this object's.
        try:
            for line in self.properties_file.read_text().splitlines():
                if line.startswith("advertised.listeners="):
                    return line.split("://", 1)[1]
        except OSError:
            pass
        return self.bootstrap

    def _running_security(self) -> str:
        try:
            for line in self.properties_file.read_text().splitlines():
                if line.startswith("listener.security.protocol.map=") and "CLIENT:" in line:
                    return line.split("CLIENT:", 1)[1].split(",")[0]
        except OSError:
            pass
        return "PLAINTEXT"

    def status(self) -> dict:
        pid = self.pid()
        return {"running": pid is not None, "pid": pid,
                "bootstrap": self._running_bootstrap() if pid else self.bootstrap,
                "security": self._running_security() if pid else self.security_protocol,
                "data_dir": str(self.data_dir), "log": str(self.log_file), "version": self.version,
                "libs_dir": str(self.libs_dir), "jars": self._jars_present()}


# -- credentials of a local SASL broker --------------------------------------------------------
def load_or_create_users(path: Path, users: tuple[str, ...] = STANDARD_USERS) -> dict[str, str]:
    """{user: password} from the JSON file at `path`; users it lacks get a random password,
    written back (mode 0600). A later start of the same data dir finds the same passwords."""
    try:
        known = json.loads(path.read_text())
    except FileNotFoundError:
        known = {}
    except (OSError, ValueError) as e:
        raise LocalKafkaError(f"cannot read SASL users from {path}: {e}") from e
    if not isinstance(known, dict) or not all(isinstance(v, str) for v in known.values()):
        raise LocalKafkaError(f"{path} must hold a JSON object {{user: password}}")
    missing = [u for u in users if u not in known]
    if missing:
        known.update({u: secrets.token_urlsafe(24) for u in missing})
        write_private(path, json.dumps(known, indent=2) + "\n")
    return known


def write_env_files(lk: LocalKafka, out_dir: Path) -> dict[str, Path]:
    """One `<user>.env` per user (INFERLOG_* connection settings, mode 0600), so that any
    inferlog command runs as that principal after `set -a; . <user>.env; set +a`."""
    files = {}
    for user in lk.sasl_users:
        s = lk.client_settings(user)
        env = {"INFERLOG_BOOTSTRAP_SERVERS": s.bootstrap_servers, "INFERLOG_SECURITY_PROTOCOL": s.security_protocol,
               "INFERLOG_SASL_MECHANISM": s.sasl_mechanism, "INFERLOG_SASL_USERNAME": user,
               "INFERLOG_SASL_PASSWORD": s.sasl_password.get_secret_value()}
        if s.ssl_cafile:
            env["INFERLOG_SSL_CAFILE"] = s.ssl_cafile
        files[user] = out_dir / f"{user}.env"
        write_private(files[user], "".join(f"{k}={v}\n" for k, v in env.items()))
    return files


# -- CLI -----------------------------------------------------------------------------------
def _default_port(settings: Settings) -> int:
    # A single local bootstrap address in the settings names the port to serve on.
    host, _, port = settings.bootstrap_servers.partition(",")[0].rpartition(":")
    return int(port) if host in ("127.0.0.1", "localhost") and port.isdigit() else 9092


def _settings(flags: dict) -> Settings:
    try:
        return settings_from(flags)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None


# the broker's own settings, under the flags they have always had
BROKER_FLAGS = {"kafka_version": ("--version",), "kafka_libs_dir": ("--libs-dir",), "kafka_data_dir": ("--data-dir",),
                "kafka_port": ("--port",), "kafka_controller_port": ("--controller-port",)}
SECURITY_FLAGS = {"kafka_sasl": ("--sasl",), "kafka_sasl_users_file": ("--sasl-users-file",),
                  "kafka_tls_certfile": ("--tls-certfile",), "kafka_tls_keyfile": ("--tls-keyfile",),
                  "kafka_tls_cafile": ("--tls-cafile",)}
broker_options = settings_options(*BROKER_FLAGS, flags=BROKER_FLAGS)


@click.group("kafka")
def kafka_cli() -> None:
    """Run a local Apache Kafka broker (KRaft, single node) and manage inferlog's topics.

    The broker runs from Apache Kafka's jars on Maven Central (fetched once into
    <kafka_home>/libs) with the JDK on this machine; its data survives stop/start.
    """


@kafka_cli.command()
@broker_options
def fetch(**flags) -> None:
    """Download the broker's jars once (needs mvn); no-op when they are cached."""
    lk = LocalKafka.from_settings(_settings(flags))
    had = lk._jars_present()
    lk.fetch()
    click.echo(f"Kafka {lk.version} jars {'already in' if had else 'fetched into'} {lk.libs_dir}")


@kafka_cli.command()
@broker_options
@click.option("--timeout", default=90.0, show_default=True, help="Seconds to wait for the broker to answer.")
@click.option("--no-fetch", is_flag=True, help="Fail instead of fetching missing jars.")
@settings_options(*SECURITY_FLAGS, flags=SECURITY_FLAGS)
def start(timeout: float, no_fetch: bool, **flags) -> None:
    """Start the broker in the background; no-op when it is already running.

    With --sasl the broker takes SASL/SCRAM-SHA-512 and ACLs; with the three --tls-* files as
    well it serves SASL_SSL (clients set INFERLOG_SSL_CAFILE to the CA)."""
    s = _settings(flags)
    tls = (s.kafka_tls_certfile, s.kafka_tls_keyfile, s.kafka_tls_cafile)
    if any(tls) and not (all(tls) and s.kafka_sasl):
        raise click.UsageError("TLS needs --tls-certfile, --tls-keyfile, --tls-cafile and --sasl")
    for flag, path in zip(("--tls-certfile", "--tls-keyfile", "--tls-cafile"), tls):
        if path is not None and not path.is_file():
            raise click.UsageError(f"{flag} {path}: no such file")
    lk = LocalKafka.from_settings(s)
    if (pid := lk.pid()) is not None:
        click.echo(f"already running: pid {pid}, bootstrap {lk.status()['bootstrap']}")
        return
    users_file = None
    if s.kafka_sasl:
        users_file = s.kafka_sasl_users_file or lk.data_dir / "sasl" / "users.json"
        lk = LocalKafka.from_settings(s, sasl_users=load_or_create_users(users_file), tls=tls if all(tls) else None)
    if not no_fetch:
        lk.fetch()
    bootstrap = lk.start(timeout=timeout)
    click.echo(f"Kafka {lk.version} started in {lk.started_in:.1f}s: pid {lk.pid()}, bootstrap {bootstrap}, "
               f"data {lk.data_dir}, log {lk.log_file}")
    if users_file is not None:
        envs = write_env_files(lk, users_file.parent)
        # Where the secrets are, never the secrets themselves.
        click.echo(f"{lk.security_protocol} with {SCRAM_MECHANISM}; users {', '.join(lk.sasl_users)}; "
                   f"passwords in {users_file} (mode 0600)")
        click.echo(f"connect as a user: set -a; . {users_file.parent}/<user>.env; set +a   ({len(envs)} env files)")
        click.echo("next, as admin: inferlog kafka topics && inferlog kafka acls --standard")


@kafka_cli.command()
@broker_options
@click.option("--timeout", default=30.0, show_default=True, help="Seconds for a clean shutdown before SIGKILL.")
def stop(timeout: float, **flags) -> None:
    """Stop the broker cleanly (SIGTERM, then SIGKILL after --timeout)."""
    lk = LocalKafka.from_settings(_settings(flags))
    click.echo("stopped" if lk.stop(timeout=timeout) else "not running")


@kafka_cli.command()
@broker_options
def status(**flags) -> None:
    """Show whether the broker runs; exit code 1 when it does not."""
    st = LocalKafka.from_settings(_settings(flags)).status()
    for k, v in st.items():
        click.echo(f"{k}: {v}")
    sys.exit(0 if st["running"] else 1)


@kafka_cli.command()
@click.option("--model", "models", multiple=True, metavar="NAME",
              help="Make this served model's topics: requests of both tiers, results and dead letters "
                   "(repeatable; default: the default model's). A worker makes its own model's at start as well.")
@settings_options("bootstrap_servers", "partitions", "replication_factor", "retention_ms")
def topics(models: tuple[str, ...], **flags) -> None:
    """Create a model's topics (each model has its own: requests of both tiers, results, dead
    letters) and the model registry's; existing ones are left as they are."""
    from .topics import ensure_topics, partition_counts

    settings = _settings(flags)
    created = ensure_topics(settings)
    for name in models:
        created |= ensure_topics(settings, [*settings.model_topics(name), *settings.model_outputs(name)])
    counts = partition_counts(settings, list(created))
    for name, new in created.items():
        click.echo(f"{name}: {'created' if new else 'exists'}, {counts.get(name)} partitions")


@kafka_cli.command()
@click.option("--principal", help="Who gets the role, e.g. User:producer.")
@click.option("--role", type=click.Choice(sorted(ROLES)), help="Its ACLs: SECURITY.md, inferlog/security.py.")
@click.option("--standard", is_flag=True, help="Each role for the user of its name: " +
              ", ".join(f"{r} -> {p}" for r, p in STANDARD_PRINCIPALS.items()) + ".")
@click.option("--dry-run", is_flag=True, help="Print the ACLs without connecting.")
@settings_options("bootstrap_servers")
def acls(principal, role, standard: bool, dry_run: bool, **flags) -> None:
    """Grant inferlog's roles as Kafka ACLs (idempotent). Connects with the INFERLOG_* security
    settings, which must name a principal allowed to alter ACLs (a super user); topic, group
    names come from the same settings (INFERLOG_REQUESTS_TOPIC, INFERLOG_GROUP_ID, ...)."""
    if standard == bool(principal or role) or (not standard and not (principal and role)):
        raise click.UsageError("give either --standard or both --principal and --role")
    settings = _settings(flags)
    pairs = STANDARD_PRINCIPALS.items() if standard else [(role, principal)]
    try:
        wanted = [a for r, p in pairs for a in role_acls(r, p, settings)]
    except SecurityError as e:
        raise click.UsageError(str(e)) from None
    for a in wanted:
        click.echo(f"{'would allow' if dry_run else 'allow'} {a.principal} {a.operation} on "
                   f"{a.resource} {a.name!r}{' (prefix)' if a.pattern == 'prefixed' else ''}")
    if not dry_run:
        click.echo(f"{apply_acls(settings, wanted)} ACLs in place on {settings.bootstrap_servers}")
