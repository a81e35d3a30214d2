#!/usr/bin/env python3
"""deploy/test-containers.py — the manifests' own configuration, run in containers.

Renders an overlay with `kubectl kustomize` (throwaway credentials from gen-secrets.sh, in a copy
of deploy/ as check.sh does), then starts every Deployment of the render — and every DaemonSet
whose nodeSelector matches the one fake node — from the image with exactly its pod spec,
translated the way the kubelet would apply it:

  command/args                 podman --entrypoint / arguments ($(VAR) expanded as the kubelet does)
  env, envFrom                 value; valueFrom secretKeyRef / configMapKeyRef / fieldRef
                               (spec.nodeName = the fake node's name, metadata.*, status.podIP, ...)
  Secret / ConfigMap volumes   files at their mountPath in the kubelet's layout (..data symlinks),
                               defaultMode / items / mode honoured, group = fsGroup
  emptyDir, hostPath           a fresh directory; hostPath from the fake node's filesystem
  securityContext              runAsUser/runAsGroup → --user, fsGroup + supplementalGroups →
                               --group-add, readOnlyRootFilesystem → --read-only (no tmpfs podman
                               would add but Kubernetes does not), capabilities → --cap-drop/add,
                               allowPrivilegeEscalation: false → no-new-privileges, runAsNonRoot
  resources.limits             --memory (swap = memory), --cpus
  service names                /etc/hosts of every container maps each Service (and its
                               .ns, .ns.svc, .ns.svc.cluster.local forms) to the pod it selects;
                               service-link env and a service-account token unless turned off
  /sys                         the node's: for iio a fake Raspberry Pi sysfs, bind-mounted
                               read-only where the runtime would mount sysfs
Anything else in a pod spec that changes how it runs (initContainers, host namespaces, postStart,
…) fails the test as "not modelled" rather than being ignored. Why not `podman kube play`: podman
4.3 crashes on Secret volumes, and podman pods need a pause image (catatonit) this machine lacks.

No host port is published. Each pod gets its own network namespace with an eth0 on a bridge in
a "node" namespace (veth pairs, like a CNI bridge), so every pod has its own IP, services reach
each other over a real interface (a component listening on 127.0.0.1 only fails, as in a
cluster), and this machine's ports 1883/8080 are never touched. The checks run from the node
namespace, as the kubelet and Traefik do: the script re-runs itself under
`nsenter --net=/run/netns/<node>` as a small client (HTTP probe, TCP probe, MQTT CONNECT,
WebSocket).

What it checks, per overlay (dev: simulated sensor; iio and multi-sensor: the kernel driver's
sysfs, faked; the gpio-* overlays need a Pi's /dev/gpiomem and are not run):
  - each container runs with the uid/gid/groups/capabilities/no_new_privs/read-only root asked for
  - every probe (startup, readiness, liveness; httpGet/tcpSocket/exec) as rendered, within the
    time the kubelet allows; every declared containerPort accepts TCP; prometheus.io/* scrapes
  - publisher and gateway are logged in to the broker with the generated credentials (broker and
    component metrics), the generated gateway password logs in and a wrong one is refused
  - a WebSocket client on the gateway's port (the Ingress → Service → targetPort chain) gets the
    snapshot, then a `reading` of the sensor named after the node (spec.nodeName), and for iio
    the values of the dht11 device's sysfs files (not those of the other IIO devices)
  - every container stops on SIGTERM within its terminationGracePeriodSeconds

Needs root, podman (runc), iproute2, nsenter, kubectl and PyYAML; the image the render names
(ghcr.io/k3sense/k3sense:<version>) must be in podman's store: build it with
deploy/build-image.sh. K3SENSE_TEST_IMAGE overrides the image (for development only).
Outside CI a missing tool skips the test; with CI=true it fails.

Usage: deploy/test-containers.py [--overlay dev|iio|multi-sensor]... [--keep]   (default: all three)
Prints one line per check and finally `containers: N passed, N failed`; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONTAINERS_CONF = Path("/etc/containers/containers.conf")
PODMAN = ["podman", "--runtime", "runc"]
NODE_NAME = "pi-1"  # the fake node the pods are "scheduled" on; spec.nodeName resolves to it
OTHER_NODE = "pi-3"  # a second sensor node in the generated credentials, whose account is not the fake node's
NODE_LABELS = {"kubernetes.io/hostname": NODE_NAME, "kubernetes.io/os": "linux", "k3sense.io/sensor": "dht11"}
NODE_IP = "10.244.0.1"  # the node's address on the pod bridge (status.hostIP)
SUBNET_PREFIX = "10.244.0."
MAX_LOG = 1500
# The overlays that run on a node without GPIO access (the gpio-* overlays need /dev/gpiomem and a Pi).
OVERLAYS = ["dev", "iio", "multi-sensor"]


# ----------------------------------------------------------------------------------------------
# Results


class Results:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, ok: bool, name: str, detail: str = "") -> bool:
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        return ok


def run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


class Skip(Exception):
    pass


class Abort(Exception):
    """Stop here; the reason is already a failed check."""


# ----------------------------------------------------------------------------------------------
# The client half: runs inside the node's network namespace (nsenter), prints one JSON object.


def client_http(host: str, port: int, path: str, timeout: float, headers: list[list[str]]) -> dict:
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    # What the kubelet sends (pkg/probe/http): its User-Agent and Accept, then the probe's headers.
    hdrs = {"User-Agent": "kube-probe/1.31", "Accept": "*/*"}
    for k, v in headers:
        hdrs[k] = v
    conn.request("GET", path, headers=hdrs)
    r = conn.getresponse()
    body = r.read(1 << 20).decode("utf-8", "replace")
    return {"status": r.status, "body": body}


def client_tcp(host: str, port: int, timeout: float) -> dict:
    with socket.create_connection((host, port), timeout=timeout):
        return {"connected": True}


def _mqtt_str(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def client_mqtt_connect(host: str, port: int, username: str, password: str, timeout: float) -> dict:
    """An MQTT 3.1.1 CONNECT (keepalive 30: rumqttd refuses 0) and its CONNACK return code."""
    var = _mqtt_str("MQTT") + bytes([4, 0xC2]) + (30).to_bytes(2, "big")
    payload = _mqtt_str(f"containers-test-{os.getpid()}") + _mqtt_str(username) + _mqtt_str(password)
    body = var + payload
    rem, n = b"", len(body)
    while True:
        d, n = n % 128, n // 128
        rem += bytes([d | (0x80 if n else 0)])
        if not n:
            break
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(b"\x10" + rem + body)
        data = b""
        try:
            while len(data) < 4:
                chunk = s.recv(4 - len(data))
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        if len(data) == 4 and data[0] == 0x20:
            if data[3] == 0:
                s.sendall(b"\xe0\x00")  # DISCONNECT
            return {"connack": data[3]}
        return {"connack": None, "closed": True}


def _ws_recv_exact(s: socket.socket, n: int, buf: bytearray) -> bytes:
    while len(buf) < n:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        buf.extend(chunk)
    out = bytes(buf[:n])
    del buf[:n]
    return out


def _ws_send(s: socket.socket, opcode: int, payload: bytes) -> None:
    mask = os.urandom(4)  # RFC 6455 5.3: a client masks every frame
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    s.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def client_ws(host: str, port: int, path: str, sensor_id: str, timeout: float) -> dict:
    """A minimal RFC 6455 client: handshake, then text messages until a `reading` of sensor_id."""
    key = base64.b64encode(os.urandom(16)).decode()
    s = socket.create_connection((host, port), timeout=timeout)
    deadline = time.monotonic() + timeout
    s.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            return {"error": f"closed during the handshake: {bytes(buf)[:200]!r}"}
        buf.extend(chunk)
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    buf = bytearray(rest)
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 101"):
        return {"error": f"handshake answered {lines[0]!r}"}
    accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if fields.get("sec-websocket-accept") != accept:
        return {"error": "wrong Sec-WebSocket-Accept"}
    messages: list = []
    fragments = b""
    while time.monotonic() < deadline:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            b0, b1 = _ws_recv_exact(s, 2, buf)
        except socket.timeout:
            break
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(_ws_recv_exact(s, 2, buf), "big")
        elif n == 127:
            n = int.from_bytes(_ws_recv_exact(s, 8, buf), "big")
        if b1 & 0x80:
            return {"error": "the server masked a frame (RFC 6455 5.1 forbids it)", "messages": messages}
        payload = _ws_recv_exact(s, n, buf)
        opcode = b0 & 0x0F
        if opcode == 0x9:
            _ws_send(s, 0xA, payload)
            continue
        if opcode == 0x8:
            return {"error": f"closed by the server: {payload[:2].hex()} {payload[2:].decode('utf-8', 'replace')}", "messages": messages}
        if opcode in (0x1, 0x0):
            fragments += payload
            if not b0 & 0x80:
                continue
            msg = json.loads(fragments.decode())
            fragments = b""
            messages.append(msg)
            if msg.get("type") == "reading" and msg.get("sensor_id") == sensor_id:
                with contextlib.suppress(OSError):
                    _ws_send(s, 0x8, (1000).to_bytes(2, "big"))
                return {"messages": messages}
    return {"error": f"no reading of {sensor_id} within {timeout:.0f} s", "messages": messages}


def client_main(argv: list[str]) -> int:
    kind, *rest = argv
    try:
        if kind == "http":
            host, port, path, timeout, headers = rest
            out = client_http(host, int(port), path, float(timeout), json.loads(headers))
        elif kind == "tcp":
            host, port, timeout = rest
            out = client_tcp(host, int(port), float(timeout))
        elif kind == "mqtt":
            host, port, user, password, timeout = rest
            out = client_mqtt_connect(host, int(port), user, password, float(timeout))
        elif kind == "ws":
            host, port, path, sensor_id, timeout = rest
            out = client_ws(host, int(port), path, sensor_id, float(timeout))
        else:
            out = {"error": f"unknown client {kind}"}
    except (OSError, ValueError) as e:
        out = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out))
    return 0


# ----------------------------------------------------------------------------------------------
# The fake node: network namespaces and, for iio, a sysfs laid out like a Raspberry Pi's.


def write_fake_pi_sysfs(root: Path) -> dict:
    """A /sys as a Raspberry Pi 4 with `dtoverlay=dht11,gpiopin=4` and two other IIO devices shows it.

    Shape and sources:
    - raspberrypi/linux arch/arm/boot/dts/overlays/dht11-overlay.dts: a root-level node
      `dht11: dht11@4 { compatible = "dht11"; gpios = <&gpio 4 0>; ... }` whose `gpiopin`
      override rewrites the pin and the unit address (`reg:0`), and an `iio-hwmon@4` consumer.
    - drivers/of/platform.c + drivers/of/device.c: a platform device created from that node is
      named after the node, `dht11@4` (a real Pi's dmesg: "dht11 dht11@4: Only 0 signal edges
      detected"), under /sys/devices/platform/.
    - drivers/iio/humidity/dht11.c, dht11_probe(): `iio->name = pdev->name;` so the IIO `name`
      attribute is `dht11@4`, not `dht11`; two channels, IIO_TEMP and IIO_HUMIDITYRELATIVE,
      IIO_CHAN_INFO_PROCESSED → `in_temp_input`, `in_humidityrelative_input`; no buffer and no
      events, so no `dev` character device.
    - Documentation/ABI/testing/sysfs-bus-iio: /sys/bus/iio/devices/iio:deviceX/name,
      in_temp_input (milli °C), in_humidityrelative_input (milli percent); the bus directory
      holds symlinks to the devices.
    - drivers/base/core.c device_add_class_symlinks(): `of_node` → /sys/firmware/devicetree/base/…
      (the IIO core gives the iio device its parent's node), `subsystem` → /sys/bus/iio.
      /sys/firmware/devicetree/base/<node>/compatible holds NUL-terminated strings.
    - Other IIO devices a Pi commonly has: an MCP3008 ADC on SPI0 (drivers/iio/adc/mcp320x.c,
      name `mcp3008`) and a BME280 on I2C1 (drivers/iio/pressure/bmp280-core.c, name `bme280`),
      which also has in_temp_input and in_humidityrelative_input — so a lookup that takes "any
      device with a temperature file" reads the wrong sensor and the values tell.
    Inside a container the runtime masks /sys/firmware with an empty read-only tmpfs (runc's and
    containerd's default masked paths; podman here does the same over this fake), so there the
    `of_node` links point nowhere, exactly as in a real pod: only `name` is left to go by.
    Returns the values the dht11 device holds.
    """
    dt = root / "firmware/devicetree/base"

    def node(path: str, props: dict[str, bytes]) -> None:
        d = dt / path
        d.mkdir(parents=True, exist_ok=True)
        for k, v in props.items():
            (d / k).write_bytes(v)

    node("", {"compatible": b"raspberrypi,4-model-b\0brcm,bcm2711\0", "model": b"Raspberry Pi 4 Model B Rev 1.4\0"})
    node("dht11@4", {"compatible": b"dht11\0", "name": b"dht11\0", "status": b"okay\0",
                     "pinctrl-names": b"default\0", "gpios": bytes.fromhex("00000011 00000004 00000000".replace(" ", "")),
                     "#io-channel-cells": (1).to_bytes(4, "big"), "phandle": (0x8C).to_bytes(4, "big")})
    node("iio-hwmon@4", {"compatible": b"iio-hwmon\0", "name": b"iio-hwmon\0", "status": b"okay\0"})
    node("soc/spi@7e204000/mcp3008@0", {"compatible": b"microchip,mcp3008\0", "name": b"mcp3008\0", "reg": (0).to_bytes(4, "big")})
    node("soc/i2c@7e804000/bme280@76", {"compatible": b"bosch,bme280\0", "name": b"bme280\0", "reg": (0x76).to_bytes(4, "big")})

    bus = root / "bus/iio/devices"
    bus.mkdir(parents=True)
    # The mount point every container runtime mounts the cgroup filesystem on (runc mkdirs it and
    # fails on a read-only /sys that lacks it).
    (root / "fs/cgroup").mkdir(parents=True)
    (root / "bus/platform/drivers/dht11").mkdir(parents=True)

    def iio_device(n: int, parent: str, of_node: str, name: str, attrs: dict[str, str]) -> None:
        d = root / "devices" / parent / f"iio:device{n}"
        (d / "power").mkdir(parents=True)
        (d / "name").write_text(name + "\n")
        (d / "uevent").write_text("DEVTYPE=iio_device\n" + f"OF_NAME={of_node.rsplit('/', 1)[-1].split('@')[0]}\n"
                                  f"OF_FULLNAME=/{of_node}\n")
        for k, v in attrs.items():
            (d / k).write_text(v + "\n")
        up = "../" * (parent.count("/") + 3)  # from /sys/devices/<parent>/iio:deviceN back to /sys
        (d / "of_node").symlink_to(f"{up}firmware/devicetree/base/{of_node}")
        (d / "subsystem").symlink_to(f"{up}bus/iio")
        (bus / f"iio:device{n}").symlink_to(f"../../../devices/{parent}/iio:device{n}")

    # Probe order decides the numbers; the dht11 is deliberately neither the first nor the last.
    iio_device(0, "platform/soc/fe204000.spi/spi_master/spi0/spi0.0", "soc/spi@7e204000/mcp3008@0", "mcp3008",
               {**{f"in_voltage{i}_raw": str(512 + i) for i in range(8)}, "in_voltage_scale": "3.222656250"})
    iio_device(1, "platform/dht11@4", "dht11@4", "dht11@4",
               {"in_temp_input": "22600", "in_humidityrelative_input": "41000"})
    iio_device(2, "platform/soc/fe804000.i2c/i2c-1/1-0076", "soc/i2c@7e804000/bme280@76", "bme280",
               {"in_temp_input": "19870", "in_humidityrelative_input": "55123", "in_pressure_input": "101.325",
                "in_temp_oversampling_ratio": "2", "in_humidityrelative_oversampling_ratio": "16"})
    plat = root / "devices/platform/dht11@4"
    (plat / "of_node").symlink_to("../../../firmware/devicetree/base/dht11@4")
    (plat / "driver").symlink_to("../../../bus/platform/drivers/dht11")
    (plat / "uevent").write_text("DRIVER=dht11\nOF_NAME=dht11\nOF_FULLNAME=/dht11@4\nOF_COMPATIBLE_0=dht11\n"
                                 "OF_COMPATIBLE_N=1\nMODALIAS=of:Ndht11T(null)Cdht11\n")
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            p = Path(dirpath) / f
            if not p.is_symlink():
                os.chmod(p, 0o444)  # IIO processed values are S_IRUGO
    return {"temperature_c": 22.6, "humidity_pct": 41.0}


class Network:
    """A node namespace with a bridge, and one namespace per pod with eth0 on that bridge."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.node_ns = f"k3st-{run_id}-node"
        self.namespaces: list[str] = []
        self.next_host = 10
        self._ns(self.node_ns)
        self.ip(self.node_ns, "link", "set", "lo", "up")
        self.ip(self.node_ns, "link", "add", "cni0", "type", "bridge")
        self.ip(self.node_ns, "addr", "add", f"{NODE_IP}/24", "dev", "cni0")
        self.ip(self.node_ns, "link", "set", "cni0", "up")

    def _ns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)

    @staticmethod
    def ip(ns: str, *args: str) -> None:
        run(["ip", "-n", ns, *args])

    def add_pod(self, label: str) -> tuple[str, str]:
        ns = f"k3st-{self.run_id}-{label}"
        ip = f"{SUBNET_PREFIX}{self.next_host}"
        veth = f"v{self.run_id[:6]}{self.next_host}"  # ≤ 15 characters
        self.next_host += 1
        self._ns(ns)
        self.ip(self.node_ns, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self.ip(self.node_ns, "link", "set", veth, "master", "cni0")
        self.ip(self.node_ns, "link", "set", veth, "up")
        self.ip(ns, "link", "set", "lo", "up")
        self.ip(ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        self.ip(ns, "link", "set", "eth0", "up")
        self.ip(ns, "route", "add", "default", "via", NODE_IP)
        return f"/run/netns/{ns}", ip

    def client(self, *args: str, timeout: float = 30) -> dict:
        """Runs this script's client half in the node namespace (where the kubelet probes from)."""
        cmd = ["nsenter", f"--net=/run/netns/{self.node_ns}", "--", sys.executable, str(Path(__file__).resolve()),
               "--client", *args]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10)
        except subprocess.TimeoutExpired:
            return {"error": "client timed out"}
        try:
            return json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            return {"error": f"client failed: {p.stderr.strip()[-500:]}"}

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            run(["ip", "netns", "delete", ns], check=False)


# ----------------------------------------------------------------------------------------------
# Reading the render as the API server and the kubelet would


def quantity_bytes(q: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGTE]i?|[kmgt])?", str(q))
    if not m:
        raise ValueError(f"unsupported memory quantity {q!r}")
    units = {None: 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20,
             "Gi": 2**30, "Ti": 2**40}
    return int(float(m.group(1)) * units[m.group(2)])


def quantity_cpus(q: str) -> float:
    q = str(q)
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


def expand(text: str, env: dict[str, str]) -> str:
    """$(VAR) as the kubelet expands it (third_party/forked/golang/expansion): $$ escapes, unknown stays."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and (j := text.find(")", i)) != -1:
            name = text[i + 2 : j]
            out.append(env[name] if name in env else text[i : j + 1])
            i = j + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


class Pod:
    def __init__(self, deploy: dict, objects: dict, namespace: str) -> None:
        self.deploy = deploy
        self.name_ = deploy["metadata"]["name"]
        self.template = deploy["spec"]["template"]
        self.spec = self.template["spec"]
        self.objects = objects
        self.namespace = namespace
        suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        self.pod_name = f"{self.name_}-{hashlib.sha1(self.name_.encode()).hexdigest()[:9]}-{suffix}"
        self.uid = str(uuid.uuid4())
        self.ip = ""
        self.netns = ""
        self.containers: list[dict] = []  # {"name", "podman", "spec", "started"}
        self.service_ip = lambda svc: ""  # set by the Cluster once every pod has its address

    @property
    def labels(self) -> dict:
        return self.template.get("metadata", {}).get("labels", {}) or {}

    def secret(self, name: str) -> dict[str, bytes]:
        obj = self.objects.get(("Secret", name))
        if obj is None:
            raise KeyError(f"Secret {name} is not in the render")
        data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
        return data

    def configmap(self, name: str) -> dict[str, bytes]:
        obj = self.objects.get(("ConfigMap", name))
        if obj is None:
            raise KeyError(f"ConfigMap {name} is not in the render")
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    def field(self, path: str) -> str:
        meta = self.template.get("metadata", {}) or {}
        if m := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
            return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
        values = {
            "metadata.name": self.pod_name, "metadata.namespace": self.namespace, "metadata.uid": self.uid,
            "spec.nodeName": NODE_NAME, "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
            "status.hostIP": NODE_IP, "status.hostIPs": NODE_IP, "status.podIP": self.ip, "status.podIPs": self.ip,
        }
        if path not in values:
            raise ValueError(f"fieldRef {path} is not modelled by this test")
        return values[path]

    def service_links(self) -> dict[str, str]:
        """The Docker-link variables the kubelet injects unless enableServiceLinks is false
        (pkg/kubelet/envvars): here each Service's address is its pod's, as /etc/hosts says."""
        env: dict[str, str] = {}
        if self.spec.get("enableServiceLinks") is False:
            return env
        for (kind, _), svc in self.objects.items():
            if kind != "Service" or not svc["spec"].get("ports"):
                continue
            ip = self.service_ip(svc)
            name = svc["metadata"]["name"].upper().replace("-", "_")
            first = svc["spec"]["ports"][0]
            env[f"{name}_SERVICE_HOST"] = ip
            env[f"{name}_SERVICE_PORT"] = str(first["port"])
            env[f"{name}_PORT"] = f"{first.get('protocol', 'TCP').lower()}://{ip}:{first['port']}"
            for sp in svc["spec"]["ports"]:
                proto = sp.get("protocol", "TCP")
                if sp.get("name"):
                    env[f"{name}_SERVICE_PORT_{sp['name'].upper().replace('-', '_')}"] = str(sp["port"])
                prefix = f"{name}_PORT_{sp['port']}_{proto}"
                env[prefix] = f"{proto.lower()}://{ip}:{sp['port']}"
                env[prefix + "_PROTO"] = proto.lower()
                env[prefix + "_PORT"] = str(sp["port"])
                env[prefix + "_ADDR"] = ip
        return env

    def env_for(self, c: dict) -> dict[str, str]:
        env: dict[str, str] = self.service_links()
        for src in c.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "secretRef" in src:
                data = self.secret(src["secretRef"]["name"])
            elif "configMapRef" in src:
                data = self.configmap(src["configMapRef"]["name"])
            else:
                raise ValueError(f"envFrom {src} is not modelled")
            env.update({prefix + k: v.decode() for k, v in data.items()})
        for e in c.get("env") or []:
            name = e["name"]
            if "value" in e or "valueFrom" not in e:
                env[name] = expand(str(e.get("value", "")), env)
                continue
            vf = e["valueFrom"]
            if "secretKeyRef" in vf:
                ref = vf["secretKeyRef"]
                data = self.secret(ref["name"])
                if ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise KeyError(f"Secret {ref['name']} has no key {ref['key']}")
                env[name] = data[ref["key"]].decode()
            elif "configMapKeyRef" in vf:
                ref = vf["configMapKeyRef"]
                data = self.configmap(ref["name"])
                if ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise KeyError(f"ConfigMap {ref['name']} has no key {ref['key']}")
                env[name] = data[ref["key"]].decode()
            elif "fieldRef" in vf:
                env[name] = self.field(vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                ref = vf["resourceFieldRef"]
                res, _, kind = ref["resource"].partition(".")
                value = ((c.get("resources") or {}).get(res) or {}).get(kind)
                if value is None:
                    raise ValueError(f"resourceFieldRef {ref['resource']} without that resource is not modelled")
                divisor = ref.get("divisor", "1")
                if kind == "cpu":
                    env[name] = str(int(-(-quantity_cpus(value) // quantity_cpus(divisor))))
                else:
                    env[name] = str(-(-quantity_bytes(value) // quantity_bytes(divisor)))
            else:
                raise ValueError(f"valueFrom {vf} is not modelled")
        return env


def write_projection(dest: Path, files: dict[str, bytes], modes: dict[str, int], gid: int | None) -> None:
    """The kubelet's atomic writer layout: ..<timestamp>/ files, ..data → it, each key → ..data/key.

    With an fsGroup the volume is chowned to it and read-only volumes get group read
    (pkg/volume/volume_linux.go SetVolumeOwnership), as the kubelet does for Secret/ConfigMap.
    """
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.000000000", time.gmtime())
    real = dest / stamp
    real.mkdir(parents=True)
    for rel, content in files.items():
        p = real / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
        mode = modes[rel]
        if gid is not None:
            os.chown(p, 0, gid)
            mode |= 0o440
        os.chmod(p, mode)
    (dest / "..data").symlink_to(stamp)
    for top in {rel.split("/", 1)[0] for rel in files}:
        (dest / top).symlink_to(f"..data/{top}")
    # The volume's root is a tmpfs the kubelet leaves world-writable and sticky; with an fsGroup
    # every directory also gets that group and the setgid bit.
    for d in [dest, real, *[p for p in real.rglob("*") if p.is_dir()]]:
        mode = 0o1777 if d == dest else 0o755
        if gid is not None:
            os.chown(d, 0, gid)
            mode |= 0o2000
        os.chmod(d, mode)


class Cluster:
    """One render, run as pods on the fake node."""

    def __init__(self, overlay: str, docs: list[dict], results: Results, run_id: str, work: Path,
                 node_paths: dict[str, Path], image_override: str | None) -> None:
        self.overlay = overlay
        self.results = results
        self.run_id = run_id
        self.work = work
        self.node_paths = node_paths
        self.image_override = image_override
        self.objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}
        ns = [d for d in docs if d["kind"] == "Namespace"]
        self.namespace = ns[0]["metadata"]["name"] if ns else "default"
        # Deployments run one pod here (the test has one node); a DaemonSet runs one only if the
        # fake node matches its nodeSelector, as the DaemonSet controller decides.
        self.pods = []
        for d in docs:
            if d["kind"] == "DaemonSet":
                sel = d["spec"]["template"]["spec"].get("nodeSelector") or {}
                if not all(NODE_LABELS.get(k) == v for k, v in sel.items()):
                    print(f"     ({overlay}: DaemonSet {d['metadata']['name']} has no pod on the node: nodeSelector {sel})")
                    continue
            if d["kind"] in ("Deployment", "DaemonSet"):
                self.pods.append(Pod(d, self.objects, self.namespace))
        self.services = [d for d in docs if d["kind"] == "Service"]
        self.net: Network | None = None
        self.started: list[str] = []

    def name(self, what: str) -> str:
        return f"{self.overlay}: {what}"

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        return self.results.check(ok, self.name(what), detail)

    # --- scheduling and networking -------------------------------------------------------------

    def pods_for(self, selector: dict) -> list[Pod]:
        return [p for p in self.pods if selector and all(p.labels.get(k) == v for k, v in selector.items())]

    def container_port(self, pod: Pod, port) -> int | None:
        if isinstance(port, int):
            return port
        if str(port).isdigit():
            return int(port)
        for c in pod.spec["containers"]:
            for p in c.get("ports") or []:
                if p.get("name") == port:
                    return int(p["containerPort"])
        return None

    def hosts(self) -> list[str]:
        """Service names → the one pod each selects, checking the Service maps port → same targetPort.

        Here a name resolves straight to the pod (no kube-proxy), so `svc:port` reaches the pod's
        `port`; that is the cluster's behaviour only when targetPort resolves to the same number.
        """
        entries = []
        for svc in self.services:
            name = svc["metadata"]["name"]
            targets = self.pods_for(svc["spec"].get("selector") or {})
            if len(targets) != 1:
                self.check(False, f"Service {name} selects one Deployment's pods", f"it selects {len(targets)}")
                continue
            pod = targets[0]
            for sp in svc["spec"].get("ports") or []:
                target = self.container_port(pod, sp.get("targetPort", sp["port"]))
                if target is None:
                    self.check(False, f"Service {name} port {sp['port']}",
                               f"targetPort {sp.get('targetPort')!r} names no port of {pod.name_}")
            for form in (name, f"{name}.{self.namespace}", f"{name}.{self.namespace}.svc",
                         f"{name}.{self.namespace}.svc.cluster.local"):
                entries.append(f"{form}:{pod.ip}")
        return entries

    def service_port_maps(self, host: str, port: int) -> bool:
        """Does `host:port` (a Service address) land on the same port number of its pod?"""
        for svc in self.services:
            if host.split(".")[0] != svc["metadata"]["name"]:
                continue
            targets = self.pods_for(svc["spec"].get("selector") or {})
            for sp in svc["spec"].get("ports") or []:
                if int(sp["port"]) == port and targets:
                    return self.container_port(targets[0], sp.get("targetPort", port)) == port
            return False  # a Service name, but not one of its ports (or no pod behind it)
        return True

    # --- starting the pods -----------------------------------------------------------------------

    def volume_sources(self, pod: Pod, vdir: Path) -> dict[str, Path]:
        psc = pod.spec.get("securityContext") or {}
        fs_group = psc.get("fsGroup")
        out: dict[str, Path] = {}
        for v in pod.spec.get("volumes") or []:
            dest = vdir / v["name"]
            if "secret" in v or "configMap" in v:
                kind, src = ("secret", v["secret"]) if "secret" in v else ("configMap", v["configMap"])
                obj_name = src["secretName"] if kind == "secret" else src["name"]
                try:
                    data = pod.secret(obj_name) if kind == "secret" else pod.configmap(obj_name)
                except KeyError:
                    if src.get("optional"):
                        data = {}
                    else:
                        raise
                default = int(src.get("defaultMode", 0o644))
                if src.get("items"):
                    files = {i["path"]: data[i["key"]] for i in src["items"]}
                    modes = {i["path"]: int(i.get("mode", default)) for i in src["items"]}
                else:
                    files, modes = data, {k: default for k in data}
                write_projection(dest, files, modes, fs_group)
            elif "emptyDir" in v:
                if (v["emptyDir"] or {}).get("medium") == "Memory":
                    out[v["name"]] = Path("tmpfs")
                    continue
                dest.mkdir(parents=True)
                os.chmod(dest, 0o777)  # pkg/volume/emptydir: 0777, then fsGroup ownership
                if fs_group is not None:
                    os.chown(dest, 0, fs_group)
                    os.chmod(dest, 0o2777)
            elif "hostPath" in v:
                path = v["hostPath"]["path"]
                dest = self.node_path(path)
            else:
                raise ValueError(f"volume {v['name']}: {sorted(v)} is not modelled by this test")
            out[v["name"]] = dest
        sa = self.objects.get(("ServiceAccount", pod.spec.get("serviceAccountName", "default"))) or {}
        automount = pod.spec.get("automountServiceAccountToken", sa.get("automountServiceAccountToken", True))
        if automount is not False:
            files = {"token": b"not-a-real-token", "ca.crt": b"", "namespace": pod.namespace.encode()}
            write_projection(vdir / "..serviceaccount", files, {k: 0o644 for k in files}, fs_group)
            out["..serviceaccount"] = vdir / "..serviceaccount"
        return out

    def node_path(self, path: str) -> Path:
        for prefix, local in sorted(self.node_paths.items(), key=lambda kv: -len(kv[0])):
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return local / path[len(prefix):].lstrip("/")
        raise ValueError(f"hostPath {path} is not on the fake node (it has {sorted(self.node_paths)})")

    def podman_args(self, pod: Pod, c: dict, volumes: dict[str, Path], hosts: list[str]) -> tuple[list[str], str]:
        psc = pod.spec.get("securityContext") or {}
        csc = c.get("securityContext") or {}
        sc = {**psc, **csc}
        cname = f"k3st-{self.run_id}-{self.overlay}-{pod.name_}-{c['name']}"
        image = self.image_override or c["image"]
        args = ["run", "-d", "--name", cname, "--label", f"k3sense-test={self.run_id}", "--pull", "never",
                "--network", f"ns:{pod.netns}", "--hostname", pod.pod_name, "--http-proxy=false",
                "--stop-timeout", str(pod.spec.get("terminationGracePeriodSeconds", 30))]
        for h in hosts:
            args += ["--add-host", h]
        # Security context (pod level, overridden per container).
        uid, gid = sc.get("runAsUser"), sc.get("runAsGroup")
        if uid is not None:
            args += ["--user", f"{uid}:{gid}" if gid is not None else str(uid)]
        elif gid is not None:
            raise ValueError("runAsGroup without runAsUser is not modelled")
        if sc.get("runAsNonRoot"):
            effective = uid
            if effective is None:
                user = run(PODMAN + ["image", "inspect", "--format", "{{.User}}", image]).stdout.strip()
                effective = int(user.split(":")[0]) if user.split(":")[0].isdigit() else None
            if not effective:
                raise ValueError(f"runAsNonRoot, but the container would run as {effective!r}: the kubelet refuses it")
        groups = list(psc.get("supplementalGroups") or [])
        if psc.get("fsGroup") is not None:
            groups.append(psc["fsGroup"])  # the kubelet adds fsGroup to the supplemental groups
        for g in dict.fromkeys(groups):
            args += ["--group-add", str(g)]
        if sc.get("privileged"):
            args += ["--privileged"]
        if csc.get("readOnlyRootFilesystem"):
            # Kubernetes mounts no tmpfs on /tmp, /run, /var/tmp; podman would.
            args += ["--read-only", "--read-only-tmpfs=false"]
        caps = csc.get("capabilities") or {}
        for cap in caps.get("drop") or []:
            args += ["--cap-drop", cap]
        for cap in caps.get("add") or []:
            args += ["--cap-add", cap]
        if csc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        if seccomp == "Unconfined":
            args += ["--security-opt", "seccomp=unconfined"]
        elif seccomp not in (None, "RuntimeDefault"):
            raise ValueError(f"seccompProfile {seccomp} is not modelled")
        limits = (c.get("resources") or {}).get("limits") or {}
        if "memory" in limits:
            mem = quantity_bytes(limits["memory"])
            args += ["--memory", str(mem), "--memory-swap", str(mem)]
        if "cpu" in limits:
            args += ["--cpus", str(quantity_cpus(limits["cpu"]))]
        if c.get("workingDir"):
            args += ["--workdir", c["workingDir"]]
        # Environment, then volumes.
        env = pod.env_for(c)
        for k, v in env.items():
            args += ["--env", f"{k}={v}"]
        for m in c.get("volumeMounts") or []:
            src = volumes[m["name"]]
            if src == Path("tmpfs"):
                args += ["--mount", f"type=tmpfs,destination={m['mountPath']}"]
                continue
            if m.get("subPath"):
                src = src / m["subPath"]
            vol = next(v for v in pod.spec.get("volumes") or [] if v["name"] == m["name"])
            ro = m.get("readOnly") or "secret" in vol or "configMap" in vol  # the kubelet mounts these read-only
            args += ["--mount", f"type=bind,source={src},destination={m['mountPath']}" + (",ro=true" if ro else "")]
        # The service account token the kubelet mounts unless automountServiceAccountToken is false
        # (on the pod, else on its ServiceAccount); a fake one, since there is no API server.
        if "..serviceaccount" in volumes:
            args += ["--mount", f"type=bind,source={volumes['..serviceaccount']},"
                     "destination=/var/run/secrets/kubernetes.io/serviceaccount,ro=true"]
        # The fake node's own /sys replaces the runtime's sysfs (read-only, as for any unprivileged pod).
        if "/sys" in self.node_paths and not any(m["mountPath"] == "/sys" for m in c.get("volumeMounts") or []):
            args += ["--mount", f"type=bind,source={self.node_paths['/sys']},destination=/sys,ro=true"]
        # Command and args: command replaces ENTRYPOINT (and drops CMD), args replace CMD.
        command = [expand(str(x), env) for x in c.get("command") or []]
        cargs = [expand(str(x), env) for x in c.get("args") or []]
        if command:
            args += ["--entrypoint", json.dumps(command)]
        args += [image, *cargs]
        return args, cname

    @staticmethod
    def unmodelled(pod: Pod) -> list[str]:
        """Pod spec fields that would change how the pod runs but that this test does not apply.

        Knowingly ignored, as they only steer scheduling or the API: resources.requests,
        tolerations, affinity, topologySpreadConstraints, priorityClassName, imagePullPolicy,
        dnsPolicy, replicas (one pod per workload here).
        """
        out = [f for f in ("initContainers", "ephemeralContainers", "hostNetwork", "hostPID", "hostIPC",
                           "shareProcessNamespace", "hostAliases", "dnsConfig", "runtimeClassName", "os")
               if pod.spec.get(f)]
        for c in pod.spec["containers"]:
            life = c.get("lifecycle") or {}
            if life.get("postStart"):
                out.append(f"{c['name']}: lifecycle.postStart")
            if set(life.get("preStop") or {}) - {"sleep"}:
                out.append(f"{c['name']}: a preStop other than sleep")
            if any(m.get("subPathExpr") or m.get("mountPropagation") for m in c.get("volumeMounts") or []):
                out.append(f"{c['name']}: subPathExpr/mountPropagation")
            if c.get("stdin") or c.get("tty"):
                out.append(f"{c['name']}: stdin/tty")
        return out

    def start(self) -> None:
        for pod in self.pods:
            missing = self.unmodelled(pod)
            if missing:
                raise ValueError(f"{pod.name_} uses what this test does not model: {', '.join(missing)}")
        self.net = Network(f"{self.run_id}{self.overlay[:3]}")
        for pod in self.pods:
            pod.netns, pod.ip = self.net.add_pod(pod.name_[:10])
            sel = pod.spec.get("nodeSelector") or {}
            self.check(all(NODE_LABELS.get(k) == v for k, v in sel.items()),
                       f"{pod.name_} is schedulable on the sensor node", f"nodeSelector {sel or '{}'}")
        hosts = self.hosts()

        def service_ip(svc: dict) -> str:
            targets = self.pods_for(svc["spec"].get("selector") or {})
            return targets[0].ip if targets else ""

        for pod in self.pods:
            pod.service_ip = service_ip
        for pod in self.pods:
            vdir = self.work / f"volumes-{self.overlay}-{pod.name_}"
            volumes = self.volume_sources(pod, vdir)
            for c in pod.spec["containers"]:
                args, cname = self.podman_args(pod, c, volumes, hosts)
                env = pod.env_for(c)
                words = [f"{k}={v}" for k, v in env.items()] + [expand(str(a), env) for a in c.get("args") or []]
                for word in words:
                    m = re.search(r"(?:^|[=/@])([a-z0-9][a-z0-9.-]*):(\d+)$", word)
                    if m and any(m.group(1).split(".")[0] == svc["metadata"]["name"] for svc in self.services):
                        self.check(self.service_port_maps(m.group(1), int(m.group(2))),
                                   f"{pod.name_} {word} is a Service port that reaches the same container port")
                self.started.append(cname)  # before: a failed run can leave a created container
                p = run(PODMAN + args, check=False)
                if p.returncode != 0:
                    raise RuntimeError(f"podman run for {pod.name_}/{c['name']} failed: {p.stderr.strip()}")
                pod.containers.append({"name": c["name"], "podman": cname, "spec": c, "started": time.monotonic()})
        if self.image_override:
            print(f"     ({self.overlay}: image overridden by K3SENSE_TEST_IMAGE={self.image_override})")

    # --- inspecting --------------------------------------------------------------------------------

    def logs(self, cname: str) -> str:
        p = run(PODMAN + ["logs", cname], check=False)
        return (p.stdout + p.stderr)

    def log_errors(self, cname: str) -> list[str]:
        """ERROR lines of a container's JSON log (K3SENSE_LOG_FORMAT=json), or of a text log."""
        out = []
        for line in self.logs(cname).splitlines():
            try:
                if json.loads(line).get("level") == "ERROR":
                    out.append(line)
            except ValueError:
                if " ERROR " in line:
                    out.append(line)
        return out

    def state(self, cname: str) -> dict:
        p = run(PODMAN + ["inspect", "--format", "{{json .State}}", cname], check=False)
        try:
            return json.loads(p.stdout)
        except ValueError:
            return {}

    def running_or_report(self, pod: Pod, c: dict) -> bool:
        st = self.state(c["podman"])
        if st.get("Running"):
            return True
        self.check(False, f"{pod.name_}/{c['name']} keeps running",
                   f"exited with {st.get('ExitCode')}; log tail:\n{self.logs(c['podman'])[-MAX_LOG:]}")
        return False

    def process_matches(self, pod: Pod, c: dict) -> None:
        """The process runs with what the securityContext asks for (read from /proc on the host)."""
        st = self.state(c["podman"])
        pid = st.get("Pid")
        if not pid:
            return
        status = Path(f"/proc/{pid}/status").read_text()
        f = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        sc = {**(pod.spec.get("securityContext") or {}), **(c["spec"].get("securityContext") or {})}
        problems = []
        if sc.get("runAsUser") is not None and f["Uid"].split()[1] != str(sc["runAsUser"]):
            problems.append(f"uid {f['Uid'].split()[1]}")
        if sc.get("runAsGroup") is not None and f["Gid"].split()[1] != str(sc["runAsGroup"]):
            problems.append(f"gid {f['Gid'].split()[1]}")
        want_groups = set(map(str, (pod.spec.get("securityContext") or {}).get("supplementalGroups") or []))
        if (pod.spec.get("securityContext") or {}).get("fsGroup") is not None:
            want_groups.add(str(pod.spec["securityContext"]["fsGroup"]))
        if not want_groups <= set(f.get("Groups", "").split()):
            problems.append(f"groups {f.get('Groups')!r}, want {sorted(want_groups)}")
        csc = c["spec"].get("securityContext") or {}
        if "ALL" in ((csc.get("capabilities") or {}).get("drop") or []) and int(f["CapEff"], 16) != 0:
            problems.append(f"CapEff {f['CapEff']}")
        if csc.get("allowPrivilegeEscalation") is False and f.get("NoNewPrivs") != "1":
            problems.append("no_new_privs is off")
        if csc.get("readOnlyRootFilesystem"):
            root = [line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
                    if line.split()[4] == "/"]
            if not root or "ro" not in root[-1][5].split(","):
                problems.append("the root filesystem is writable")
        self.check(not problems, f"{pod.name_}/{c['name']} runs as its securityContext says",
                   "; ".join(problems) or f"uid {f['Uid'].split()[1]} gid {f['Gid'].split()[1]} groups {f.get('Groups', '').strip()}, "
                   f"CapEff {f['CapEff']}, NoNewPrivs {f.get('NoNewPrivs')}, read-only root {bool(csc.get('readOnlyRootFilesystem'))}")

    def probe_once(self, pod: Pod, c: dict, probe: dict) -> tuple[bool, str]:
        timeout = float(probe.get("timeoutSeconds", 1))
        if "httpGet" in probe:
            h = probe["httpGet"]
            port = self.container_port(pod, h["port"])
            if port is None:
                return False, f"port {h['port']!r} names no containerPort"
            if h.get("scheme", "HTTP") != "HTTP":
                return False, "HTTPS probes are not modelled"
            host = h.get("host", pod.ip)
            headers = [[x["name"], x["value"]] for x in h.get("httpHeaders") or []]
            r = self.net.client("http", host, str(port), h.get("path", "/"), str(timeout), json.dumps(headers),
                                timeout=timeout)
            ok = 200 <= r.get("status", 0) < 400  # pkg/probe/http: 2xx and 3xx succeed
            return ok, f"GET http://{host}:{port}{h.get('path', '/')} → {r.get('status', r.get('error'))}"
        if "tcpSocket" in probe:
            t = probe["tcpSocket"]
            port = self.container_port(pod, t["port"])
            if port is None:
                return False, f"port {t['port']!r} names no containerPort"
            host = t.get("host", pod.ip)
            r = self.net.client("tcp", host, str(port), str(timeout), timeout=timeout)
            return bool(r.get("connected")), f"TCP {host}:{port} → {'connected' if r.get('connected') else r.get('error')}"
        if "exec" in probe:
            cmd = probe["exec"]["command"]
            p = run(PODMAN + ["exec", c["podman"], *cmd], check=False)
            return p.returncode == 0, f"exec {cmd} → exit {p.returncode}"
        return False, f"probe kind {sorted(probe)} is not modelled"

    def probe(self, pod: Pod, c: dict, kind: str, deadline_floor: float = 0) -> None:
        probe = c["spec"].get(kind)
        if not probe:
            return
        period = float(probe.get("periodSeconds", 10))
        failures = int(probe.get("failureThreshold", 3))
        # How long the kubelet would wait, counted from the container's start: a startup probe
        # fails the container after initialDelay + period × failureThreshold; liveness restarts it
        # after as long; readiness has no limit, so it gets a minute.
        budget = float(probe.get("initialDelaySeconds", 0)) + period * failures
        budget = max(budget, deadline_floor)
        while True:
            ok, detail = self.probe_once(pod, c, probe)
            if ok or time.monotonic() - c["started"] > budget or not self.state(c["podman"]).get("Running"):
                break
            time.sleep(min(period, 0.5))
        took = time.monotonic() - c["started"]
        self.check(ok, f"{pod.name_}/{c['name']} {kind}", f"{detail} ({took:.1f} s after the start, kubelet allows {budget:.0f} s)")

    def metrics(self, pod: Pod, port: int, path: str = "/metrics") -> dict[str, float]:
        r = self.net.client("http", pod.ip, str(port), path, "5", "[]", timeout=5)
        out = {}
        for line in r.get("body", "").splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[key] = float(value)
                    # Also under the bare name: the publisher labels every series with its sensor_id.
                    out.setdefault(key.split("{", 1)[0], float(value))
        return out

    def pod(self, component: str) -> Pod | None:
        for p in self.pods:
            if p.labels.get("app.kubernetes.io/component") == component:
                return p
        return None

    # --- the checks ----------------------------------------------------------------------------

    def verify(self, expected_values: dict | None) -> None:
        assert self.net
        # Startup first (the kubelet holds the others until it passes), then readiness, liveness.
        for pod in self.pods:
            for c in pod.containers:
                self.probe(pod, c, "startupProbe")
        for pod in self.pods:
            for c in pod.containers:
                self.probe(pod, c, "readinessProbe", deadline_floor=60)
                self.probe(pod, c, "livenessProbe")
        for pod in self.pods:
            for c in pod.containers:
                if self.running_or_report(pod, c):
                    self.process_matches(pod, c)
                for p in c["spec"].get("ports") or []:
                    r = self.net.client("tcp", pod.ip, str(p["containerPort"]), "2", timeout=2)
                    self.check(bool(r.get("connected")), f"{pod.name_}/{c['name']} listens on containerPort "
                               f"{p.get('name', '')} {p['containerPort']}", r.get("error", f"{pod.ip}:{p['containerPort']}"))
            ann = (pod.template.get("metadata") or {}).get("annotations") or {}
            if ann.get("prometheus.io/scrape") == "true":
                port, path = ann.get("prometheus.io/port"), ann.get("prometheus.io/path", "/metrics")
                r = self.net.client("http", pod.ip, str(port), path, "5", "[]", timeout=5)
                self.check(r.get("status") == 200 and "# TYPE" in r.get("body", ""),
                           f"{pod.name_} serves Prometheus metrics where its annotations say",
                           f"GET {pod.ip}:{port}{path} → {r.get('status', r.get('error'))}")

        broker, publisher, gateway = self.pod("broker"), self.pod("publisher"), self.pod("gateway")
        if not (broker and publisher and gateway):
            self.check(False, "the render has broker, publisher and gateway Deployments")
            return
        bport = self.container_port(broker, "mqtt") or 1883
        penv = publisher.env_for(publisher.containers[0]["spec"])
        genv = gateway.env_for(gateway.containers[0]["spec"])
        sensor_id = penv.get("K3SENSE_SENSOR_ID", "")
        self.check(sensor_id == NODE_NAME, "the publisher's sensor id is the node's name (downward API)",
                   f"K3SENSE_SENSOR_ID={sensor_id!r}")

        # Logged in with the generated credentials: the components' and the broker's own metrics.
        pport = self.container_port(publisher, "metrics")
        deadline = time.monotonic() + 30
        while True:
            bm = self.metrics(broker, self.container_port(broker, "metrics") or 9102)
            pm = self.metrics(publisher, pport) if pport else {}
            gm = self.metrics(gateway, self.container_port(gateway, "http") or 8080)
            logged_in = (bm.get("k3sense_broker_clients_connected", 0) >= 2
                         and pm.get("k3sense_publisher_broker_connected") == 1
                         and gm.get("k3sense_gateway_broker_connected") == 1)
            if logged_in or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        # Credentials refusals only: the kubelet's tcpSocket probes on the MQTT port connect and
        # close without a CONNECT, which the broker may count under another reason.
        refused = {k: v for k, v in bm.items() if k.startswith("k3sense_broker_connections_refused_total{")
                   and ('"bad_credentials"' in k or '"not_authorised"' in k) and v}
        self.check(pm.get("k3sense_publisher_broker_connected") == 1,
                   f"the publisher is logged in to {penv.get('K3SENSE_BROKER')} with its generated password",
                   f"k3sense_publisher_broker_connected {pm.get('k3sense_publisher_broker_connected')}")
        self.check(gm.get("k3sense_gateway_broker_connected") == 1,
                   "the gateway is logged in and subscribed with its generated password",
                   f"k3sense_gateway_broker_connected {gm.get('k3sense_gateway_broker_connected')}")
        self.check(bm.get("k3sense_broker_clients_connected", 0) >= 2 and not refused,
                   "the broker counts both clients and refused no credentials",
                   f"clients_connected {bm.get('k3sense_broker_clients_connected')}, refused {refused or 'none'}")

        # The users file the broker reads is the generated one: the gateway's password from its
        # Secret logs in; a wrong one is refused (so authentication is on at all).
        gsecret = self.read_mounted_password(gateway, genv.get("K3SENSE_PASSWORD_FILE", ""))
        r_ok = self.net.client("mqtt", broker.ip, str(bport), genv.get("K3SENSE_USERNAME", ""), gsecret, "5", timeout=5)
        r_bad = self.net.client("mqtt", broker.ip, str(bport), genv.get("K3SENSE_USERNAME", ""), gsecret + "x", "5", timeout=5)
        self.check(r_ok.get("connack") == 0, "the generated gateway credentials log in to the broker",
                   f"CONNACK {r_ok.get('connack', r_ok)}")
        self.check(r_bad.get("connack") not in (0,) and "error" not in r_bad, "a wrong password is refused",
                   f"CONNACK {r_bad.get('connack', r_bad)}")

        self.publisher_account(broker, publisher, penv, bport)

        # A reading reaches a WebSocket client through the Ingress → Service → pod chain.
        self.websocket(gateway, publisher, sensor_id, penv, expected_values)

    def publisher_account(self, broker: Pod, publisher: Pod, penv: dict, bport: int) -> None:
        """The publisher's own node account (issue 14): `publisher-<node>`, its password the Secret key
        named after the node, bound in the users file to the node's sensor id; no `publisher:*`."""
        user = penv.get("K3SENSE_USERNAME", "")
        path = penv.get("K3SENSE_PASSWORD_FILE", "")
        self.check(user == f"publisher-{NODE_NAME}" and path.endswith(f"/{NODE_NAME}"),
                   "the publisher logs in with its node's account and the password file named after its node",
                   f"K3SENSE_USERNAME={user!r} K3SENSE_PASSWORD_FILE={path!r}")
        benv = broker.env_for(broker.containers[0]["spec"])
        users = self.read_mounted_password(broker, benv.get("K3SENSE_USERS_FILE", ""), whole=True)
        lines = [line for line in users.splitlines() if line and not line.startswith("#")]
        wildcard = [line.split(":")[0] for line in lines if line.rstrip().endswith(":publisher:*")]
        own = [line for line in lines if line.startswith(f"{user}:") and line.endswith(f":publisher:{NODE_NAME}")]
        self.check(not wildcard and len(own) == 1,
                   "the broker's users file binds the node's account to its sensor id, and has no publisher:*",
                   f"{user} lines {len(own)}, publisher:* accounts {wildcard or 'none'}")
        mine = self.read_mounted_password(publisher, path)
        other = self.read_mounted_password(publisher, path.rsplit("/", 1)[0] + f"/{OTHER_NODE}")
        r_ok = self.net.client("mqtt", broker.ip, str(bport), user, mine, "5", timeout=5)
        r_other = self.net.client("mqtt", broker.ip, str(bport), user, other, "5", timeout=5)
        self.check(r_ok.get("connack") == 0 and r_other.get("connack") not in (0,) and "error" not in r_other,
                   f"{user} logs in with its node's password, not with {OTHER_NODE}'s",
                   f"CONNACK {r_ok.get('connack', r_ok)} / {r_other.get('connack', r_other)}")

    def read_mounted_password(self, pod: Pod, path: str, whole: bool = False) -> str:
        """The content of the Secret file a container sees at `path` (its first line unless `whole`)."""
        for m in pod.containers[0]["spec"].get("volumeMounts") or []:
            if path.startswith(m["mountPath"].rstrip("/") + "/"):
                vol = next(v for v in pod.spec["volumes"] if v["name"] == m["name"])
                src = vol.get("secret") or {}
                key = path[len(m["mountPath"].rstrip("/")) + 1:]
                for item in src.get("items") or []:
                    if item["path"] == key:
                        key = item["key"]
                text = pod.secret(src["secretName"]).get(key, b"").decode()
                return text if whole else (text.splitlines() or [""])[0]
        return ""

    def websocket(self, gateway: Pod, publisher: Pod, sensor_id: str, penv: dict, expected: dict | None) -> None:
        port = None
        for ing in (d for (k, _), d in self.objects.items() if k == "Ingress"):
            for rule in ing["spec"].get("rules") or []:
                for p in (rule.get("http") or {}).get("paths") or []:
                    svc = self.objects.get(("Service", p["backend"]["service"]["name"]))
                    want = p["backend"]["service"]["port"]
                    for sp in (svc or {}).get("spec", {}).get("ports") or []:
                        if sp.get("name") == want.get("name") or sp["port"] == want.get("number"):
                            port = self.container_port(gateway, sp.get("targetPort", sp["port"]))
        self.check(port is not None, "the Ingress reaches the gateway through its Service", f"container port {port}")
        if port is None:
            return
        interval = penv.get("K3SENSE_INTERVAL", "10s")
        seconds = float(re.sub(r"[^0-9.]", "", interval) or 10) * (60 if interval.endswith("m") else 1)
        wait = 3 * seconds + 15
        # Whether a reading is coming shows early: the publisher's metrics count one, or its log
        # has an ERROR (a sensor it cannot open); then only the snapshot is awaited.
        pport = self.container_port(publisher, "metrics")
        deadline = time.monotonic() + wait
        unavailable = False
        while pport and time.monotonic() < deadline:
            pm = self.metrics(publisher, pport)
            if pm.get("k3sense_publisher_readings_total", 0) > 0:
                break
            errors = self.log_errors(publisher.containers[0]["podman"])
            if errors:
                unavailable = True
                break
            time.sleep(0.5)
        wait = 5 if unavailable else max(5, deadline - time.monotonic() + seconds)
        r = self.net.client("ws", gateway.ip, str(port), "/ws", sensor_id, str(wait), timeout=wait)
        msgs = r.get("messages") or []
        self.check(bool(msgs) and msgs[0].get("type") == "snapshot", "GET /ws: the first message is the snapshot",
                   f"first message {json.dumps(msgs[0])[:200] if msgs else r.get('error')}")
        reading = next((m for m in msgs if m.get("type") == "reading" and m.get("sensor_id") == sensor_id), None)
        if reading is None:
            detail = r.get("error", "no reading")
            if unavailable:
                detail = "the publisher logged an ERROR instead of producing a reading"
            plogs = self.logs(publisher.containers[0]["podman"])
            sensor_errors = self.log_errors(publisher.containers[0]["podman"])
            if penv.get("K3SENSE_SENSOR") == "iio" and any("no IIO device" in line for line in plogs.splitlines()):
                detail += ("; the publisher did not find the dht11 among the fake Pi's IIO devices (its name is "
                           "`dht11@4`, as on a real Pi): the IIO lookup still wants name == \"dht11\" — fixed on "
                           "branch `pisensor` (issue 12 item 4)")
            detail += "\n     publisher log tail:\n" + "\n".join(sensor_errors[-5:] or plogs.splitlines()[-5:])
            self.check(False, f"GET /ws: a reading of {sensor_id} arrives", detail)
            return
        fields = {"sensor_id", "model", "temperature_c", "humidity_pct", "read_at", "seq"}
        self.check(fields <= set(reading), f"GET /ws: a reading of {sensor_id} arrives",
                   json.dumps(reading))
        if expected:
            got = {k: reading.get(k) for k in expected}
            self.check(got == expected and reading.get("model") == penv.get("K3SENSE_MODEL"),
                       "the reading holds the dht11 device's sysfs values (not another IIO device's)",
                       f"got {got} model {reading.get('model')}, want {expected} model {penv.get('K3SENSE_MODEL')}")

    def stop_all(self) -> None:
        """SIGTERM, as the kubelet sends it after preStop; each must exit by itself within the grace period.

        Clients first, the broker last, so the publisher's goodbye (`offline`, acknowledged) has a
        broker to go to.
        """
        for pod in sorted(self.pods, key=lambda p: p.labels.get("app.kubernetes.io/component") == "broker"):
            grace = int(pod.spec.get("terminationGracePeriodSeconds", 30))
            for c in pod.containers:
                pre = (((c["spec"].get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
                start = time.monotonic()
                run(PODMAN + ["stop", "-t", str(max(1, grace - int(pre))), c["podman"]], check=False)
                took = time.monotonic() - start
                code = self.state(c["podman"]).get("ExitCode")
                self.check(code == 0, f"{pod.name_}/{c['name']} exits on SIGTERM within its grace period",
                           f"exit code {code} after {took:.1f} s (grace {grace} s, preStop sleep {pre} s)"
                           + ("" if code == 0 else "\n" + self.logs(c["podman"])[-MAX_LOG:]))

    def cleanup(self) -> None:
        for cname in reversed(self.started):
            run(PODMAN + ["rm", "-f", "-t", "0", cname], check=False)
        if self.net:
            self.net.close()


# ----------------------------------------------------------------------------------------------
# Setup


def ensure_containers_conf() -> None:
    """Podman here must not raise RLIMIT_NOFILE (refused): `[containers] default_ulimits = []`."""
    text = CONTAINERS_CONF.read_text() if CONTAINERS_CONF.exists() else ""
    if re.search(r"^\s*default_ulimits\s*=", text, re.M):
        return
    if re.search(r"^\s*\[containers\]\s*$", text, re.M):
        text = re.sub(r"^(\s*\[containers\]\s*)$", r"\1\ndefault_ulimits = []", text, count=1, flags=re.M)
    else:
        text += ("\n" if text and not text.endswith("\n") else "") + "[containers]\ndefault_ulimits = []\n"
    CONTAINERS_CONF.parent.mkdir(parents=True, exist_ok=True)
    CONTAINERS_CONF.write_text(text)
    print(f"     wrote default_ulimits = [] to {CONTAINERS_CONF}")


def preflight() -> None:
    missing = [t for t in ("podman", "runc", "ip", "nsenter", "kubectl") if not shutil.which(t)]
    try:
        import yaml  # noqa: F401
    except ImportError:
        missing.append("python3-yaml (PyYAML)")
    if missing:
        raise Skip(f"missing: {', '.join(missing)}")
    if os.geteuid() != 0:
        raise Skip("needs root (network namespaces, rootful podman, Secret file ownership)")


def render(work: Path, overlay: str) -> list[dict]:
    import yaml

    copy = work / "deploy"
    if not copy.exists():
        shutil.copytree(HERE, copy, ignore=shutil.ignore_patterns("target", "*.tar"))
        secrets = copy / "base/secrets"
        for f in ("users.txt", "publisher.password", "gateway.password", "publisher-passwords.env"):
            with contextlib.suppress(FileNotFoundError):
                (secrets / f).unlink()
        # One account per sensor node: the fake node, and another whose account the pods must not use.
        run(["bash", str(HERE / "gen-secrets.sh"), "--dir", str(secrets), NODE_NAME, OTHER_NODE])
    out = run(["kubectl", "kustomize", str(copy / "overlays" / overlay)]).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        return client_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--overlay", action="append", choices=OVERLAYS, help=f"default: all of {', '.join(OVERLAYS)}")
    ap.add_argument("--keep", action="store_true", help="leave containers, namespaces and files for inspection")
    opts = ap.parse_args()
    overlays = opts.overlay or OVERLAYS
    ci = os.environ.get("CI") == "true"
    try:
        preflight()
    except Skip as e:
        # A missing tool skips outside CI; in CI (CI=true) it is a failure.
        print(f"{'FAIL' if ci else 'skip'} the test can run here: {e}")
        print(f"containers: 0 passed, {1 if ci else 0} failed")
        return 1 if ci else 0

    results = Results()
    run_id = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
    work = Path(tempfile.mkdtemp(prefix="k3sense-containers-"))
    os.chmod(work, 0o755)
    clusters: list[Cluster] = []

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    try:
        ensure_containers_conf()
        image_override = os.environ.get("K3SENSE_TEST_IMAGE")
        for overlay in overlays:
            docs = render(work, overlay)
            images = {c["image"] for d in docs if d["kind"] in ("Deployment", "DaemonSet")
                      for c in d["spec"]["template"]["spec"]["containers"]}
            for image in sorted({image_override} if image_override else images):
                ok = run(PODMAN + ["image", "exists", image], check=False).returncode == 0
                results.check(ok, f"{overlay}: image {image} is in podman's store",
                              "" if ok else "build and load it first: deploy/build-image.sh")
                if not ok:
                    raise Abort()
            node_paths = {}
            expected = None
            if overlay in ("iio", "multi-sensor"):
                sysfs = work / f"node-sys-{overlay}"
                expected = write_fake_pi_sysfs(sysfs)
                node_paths["/sys"] = sysfs
            cluster = Cluster(overlay, docs, results, run_id, work, node_paths, image_override)
            clusters.append(cluster)
            cluster.start()
            cluster.verify(expected)
            cluster.stop_all()
            if not opts.keep:
                cluster.cleanup()
    except Abort:
        pass  # already reported as a failed check
    except KeyboardInterrupt as e:
        results.check(False, "interrupted", str(e))
    except Exception as e:  # a broken render or harness is a failure with its reason, not a traceback
        results.check(False, "the test ran to the end", f"{type(e).__name__}: {e}")
    finally:
        if not opts.keep:
            for c in clusters:
                c.cleanup()
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"     kept: {work}, containers labelled k3sense-test={run_id}")
    print(f"     ({time.monotonic() - started:.0f} s)")
    print(f"containers: {results.passed} passed, {results.failed} failed")
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())
