"""A real single-node Apache Kafka broker (KRaft) from Maven Central's jars and the local JDK.

`inferlog kafka fetch|start|stop|status|topics`. The broker is the one in Apache Kafka's
distribution (kafka.Kafka), only resolved by Maven instead of unpacked from a tarball, so
tests and the demo run against the same code as production.
"""
from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import click

from .errors import InferlogError
from .settings import Settings, load_settings

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
    "num.network.threads": "2",
    "num.io.threads": "4",
    "num.recovery.threads.per.data.dir": "1",
    "log.cleaner.threads": "1",
}
JVM_OPTS = ["-Xms256m", "-Xmx512m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true"]


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
                 version: str = "4.1.1", extra: dict[str, str] | None = None):
        # Absolute from here on: the broker runs with its data dir as cwd, mvn from the pom's.
        self.libs_dir = Path(libs_dir).resolve()
        self.data_dir = Path(data_dir).resolve()
        self.port, self.controller_port, self.version = port, controller_port, version
        self.extra = dict(extra or {})
        self._proc: subprocess.Popen | None = None
        self.started_in: float | None = None  # seconds the last start() took

    @classmethod
    def from_settings(cls, settings: Settings, **kw) -> "LocalKafka":
        """The broker that settings.bootstrap_servers points at, when that is 127.0.0.1:<port>."""
        home = Path(settings.kafka_home)
        kw.setdefault("port", _default_port(settings))
        kw.setdefault("controller_port", kw["port"] + 1)
        kw.setdefault("libs_dir", home / "libs" / settings.kafka_version)
        kw.setdefault("data_dir", home / "data")
        kw.setdefault("version", settings.kafka_version)
        return cls(**kw)

    # -- paths ---------------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

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
            **self.extra,
        }
        self.properties_file.write_text("".join(f"{k}={v}\n" for k, v in props.items()))

    def _format_storage(self, java: str) -> None:
        if (self.data_dir / "logs" / "meta.properties").exists():
            return  # formatted on an earlier start: the data stays
        cmd = [java, "-Xmx256m", f"-Dlog4j2.configurationFile={LOG4J2}", "-cp", self._classpath(),
               "kafka.tools.StorageTool", "format", "--config", str(self.properties_file),
               "--cluster-id", _cluster_id(), "--ignore-formatted"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise LocalKafkaError(f"formatting {self.data_dir / 'logs'} failed:\n{(res.stdout + res.stderr)[-3000:]}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
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
        except BaseException:
            self.stop(timeout=10)
            raise
        self.started_in = time.monotonic() - t0
        return self.bootstrap

    def _wait_ready(self, deadline: float) -> None:
        from confluent_kafka.admin import AdminClient

        admin = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise LocalKafkaError(f"the broker exited with code {self._proc.returncode}; "
                                      f"{self.log_file}:\n{self.log_tail()}")
            # Probe the socket first: librdkafka would log every refused connection.
            if _port_open(self.port):
                admin = admin or AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 3})
                try:
                    if admin.list_topics(timeout=2).brokers:
                        return
                except Exception:
                    pass
            time.sleep(0.2)
        raise LocalKafkaError(f"the broker did not answer on {self.bootstrap} in time; "
                              f"{self.log_file}:\n{self.log_tail()}")

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

    def status(self) -> dict:
        pid = self.pid()
        return {"running": pid is not None, "pid": pid,
                "bootstrap": self._running_bootstrap() if pid else self.bootstrap,
                "data_dir": str(self.data_dir), "log": str(self.log_file), "version": self.version,
                "libs_dir": str(self.libs_dir), "jars": self._jars_present()}


# -- CLI -----------------------------------------------------------------------------------
def _default_port(settings: Settings) -> int:
    # A single local bootstrap address in the settings names the port to serve on.
    host, _, port = settings.bootstrap_servers.partition(",")[0].rpartition(":")
    return int(port) if host in ("127.0.0.1", "localhost") and port.isdigit() else 9092


def _local(data_dir, libs_dir, port, controller_port, version) -> LocalKafka:
    settings = load_settings(kafka_version=version)
    kw = {k: v for k, v in (("port", port), ("controller_port", controller_port)) if v}
    if data_dir:
        kw["data_dir"] = Path(data_dir)
    if libs_dir:
        kw["libs_dir"] = Path(libs_dir)
    return LocalKafka.from_settings(settings, **kw)


def broker_options(f):
    opts = [
        click.option("--version", "version", envvar="INFERLOG_KAFKA_VERSION",
                     help="Apache Kafka version (default: settings.kafka_version)."),
        click.option("--libs-dir", type=click.Path(file_okay=False), envvar="INFERLOG_KAFKA_LIBS_DIR",
                     help="Folder of the broker's jars (default: <kafka_home>/libs/<version>)."),
        click.option("--data-dir", type=click.Path(file_okay=False), envvar="INFERLOG_KAFKA_DATA_DIR",
                     help="Broker data, config, log and pid file (default: <kafka_home>/data)."),
        click.option("--port", type=int, envvar="INFERLOG_KAFKA_PORT",
                     help="Client port on 127.0.0.1 (default: from bootstrap_servers, else 9092)."),
        click.option("--controller-port", type=int, envvar="INFERLOG_KAFKA_CONTROLLER_PORT",
                     help="KRaft controller port on 127.0.0.1 (default: port + 1)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@click.group("kafka")
def kafka_cli() -> None:
    """Run a local Apache Kafka broker (KRaft, single node) and manage inferlog's topics.

    The broker runs from Apache Kafka's jars on Maven Central (fetched once into
    <kafka_home>/libs) with the JDK on this machine; its data survives stop/start.
    """


@kafka_cli.command()
@broker_options
def fetch(**kw) -> None:
    """Download the broker's jars once (needs mvn); no-op when they are cached."""
    lk = _local(**kw)
    had = lk._jars_present()
    lk.fetch()
    click.echo(f"Kafka {lk.version} jars {'already in' if had else 'fetched into'} {lk.libs_dir}")


@kafka_cli.command()
@broker_options
@click.option("--timeout", default=90.0, show_default=True, help="Seconds to wait for the broker to answer.")
@click.option("--no-fetch", is_flag=True, help="Fail instead of fetching missing jars.")
def start(timeout: float, no_fetch: bool, **kw) -> None:
    """Start the broker in the background; no-op when it is already running."""
    lk = _local(**kw)
    if (pid := lk.pid()) is not None:
        click.echo(f"already running: pid {pid}, bootstrap {lk.status()['bootstrap']}")
        return
    if not no_fetch:
        lk.fetch()
    bootstrap = lk.start(timeout=timeout)
    click.echo(f"Kafka {lk.version} started in {lk.started_in:.1f}s: pid {lk.pid()}, bootstrap {bootstrap}, "
               f"data {lk.data_dir}, log {lk.log_file}")


@kafka_cli.command()
@broker_options
@click.option("--timeout", default=30.0, show_default=True, help="Seconds for a clean shutdown before SIGKILL.")
def stop(timeout: float, **kw) -> None:
    """Stop the broker cleanly (SIGTERM, then SIGKILL after --timeout)."""
    lk = _local(**kw)
    click.echo("stopped" if lk.stop(timeout=timeout) else "not running")


@kafka_cli.command()
@broker_options
def status(**kw) -> None:
    """Show whether the broker runs; exit code 1 when it does not."""
    st = _local(**kw).status()
    for k, v in st.items():
        click.echo(f"{k}: {v}")
    sys.exit(0 if st["running"] else 1)


@kafka_cli.command()
@click.option("--bootstrap-servers", envvar=["INFERLOG_BOOTSTRAP_SERVERS", "KAFKA_BOOTSTRAP_SERVERS"],
              help="Cluster to create the topics on (default: settings.bootstrap_servers).")
@click.option("--partitions", type=click.IntRange(min=1), help="Partitions per topic (default: settings.partitions).")
@click.option("--replication-factor", type=click.IntRange(min=1),
              help="Replicas per partition (default: settings.replication_factor).")
@click.option("--retention-ms", type=click.IntRange(min=-1), help="retention.ms; -1 keeps forever (default: settings).")
def topics(bootstrap_servers, partitions, replication_factor, retention_ms) -> None:
    """Create the requests, results and deadletter topics; existing ones are left as they are."""
    from .topics import ensure_topics, partition_counts

    settings = load_settings(bootstrap_servers=bootstrap_servers)
    created = ensure_topics(settings, partitions=partitions, replication_factor=replication_factor,
                            retention_ms=retention_ms)
    counts = partition_counts(settings, list(created))
    for name, new in created.items():
        click.echo(f"{name}: {'created' if new else 'exists'}, {counts.get(name)} partitions")
