#!/usr/bin/env python3
"""MQTT fidelity scenarios with paho-mqtt (2.x), run by tests/mqtt_fidelity.rs against a broker.

Each scenario talks to the broker at --port on 127.0.0.1 and prints one JSON object: what it
*observed* (granted codes, delivered QoS, DUP flags, wills). The Rust test asserts the values the
MQTT specification (and Mosquitto) give, for our broker and for Mosquitto alike, so the script
itself judges nothing and a broker that misbehaves shows up in the test's assertion message.

Every client is made with reconnect_on_failure=False: a client taken over must stay down.
"""

import argparse
import json
import queue
import random
import socket
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

WAIT = 5.0
V311 = mqtt.MQTTv311
V31 = mqtt.MQTTv31
V5 = mqtt.MQTTv5


def code(rc):
    """A paho ReasonCode (or int) as an int."""
    return rc.value if hasattr(rc, "value") else int(rc)


class Client:
    """One paho client with its callbacks turned into queues and events."""

    def __init__(self, args, client_id, protocol=V311, clean=True, manual_ack=False, login=None):
        self.args = args
        self.protocol = protocol
        self.clean = clean
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=None if protocol == V5 else clean,
            protocol=protocol,
            reconnect_on_failure=False,
            manual_ack=manual_ack,
        )
        login = login or (args.user and (args.user, args.password))
        if login:
            self.c.username_pw_set(login[0], login[1])
        self.messages = queue.Queue()
        self.connack = queue.Queue()
        self.subacks = {}
        self.pubacks = {}
        self.acked = threading.Condition()
        self.gone = threading.Event()
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_publish = self._on_publish
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_disconnect = lambda c, u, f, rc, p: self.gone.set()

    def _on_connect(self, c, u, flags, rc, props):
        self.connack.put((code(rc), bool(flags.session_present)))

    def _on_subscribe(self, c, u, mid, rcs, props):
        with self.acked:
            self.subacks[mid] = [code(rc) for rc in rcs]
            self.acked.notify_all()

    def _on_publish(self, c, u, mid, rc, props):
        with self.acked:
            self.pubacks[mid] = code(rc)
            self.acked.notify_all()

    def will(self, topic, payload, qos=1, retain=False):
        self.c.will_set(topic, payload, qos=qos, retain=retain)
        return self

    def connect(self, keepalive=30, session_expiry=None):
        """Connects and returns (CONNACK code, session present)."""
        kwargs = {}
        if self.protocol == V5:
            kwargs["clean_start"] = self.clean
            if session_expiry is not None:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = session_expiry
                kwargs["properties"] = props
        self.gone.clear()
        self.c.connect("127.0.0.1", self.args.port, keepalive, **kwargs)
        self.c.loop_start()
        try:
            return self.connack.get(timeout=WAIT)
        except queue.Empty:
            return (None, None)

    def _wait(self, table, mid):
        with self.acked:
            self.acked.wait_for(lambda: mid in table, timeout=WAIT)
            return table.get(mid)

    def subscribe(self, *filters):
        """SUBSCRIBE (filter, qos) pairs in one packet; returns the SUBACK codes."""
        rc, mid = self.c.subscribe(list(filters))
        return self._wait(self.subacks, mid)

    def publish(self, topic, payload, qos=0, retain=False):
        """PUBLISH; for QoS > 0 returns the acknowledgement's reason code (0 for MQTT 3)."""
        info = self.c.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            info.wait_for_publish(WAIT)
            return None
        return self._wait(self.pubacks, info.mid)

    def receive(self, count, timeout=WAIT):
        """Up to `count` messages, each as a dict of what the broker sent."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                m = self.messages.get(timeout=left)
            except queue.Empty:
                break
            out.append(
                {
                    "topic": m.topic,
                    "payload": m.payload.decode("utf-8", "replace"),
                    "qos": m.qos,
                    "retain": bool(m.retain),
                    "dup": bool(m.dup),
                    "mid": m.mid,
                }
            )
        return out

    def disconnect(self):
        self.c.disconnect()
        self.gone.wait(WAIT)
        self.c.loop_stop()

    def kill(self):
        """Closes the socket without DISCONNECT (the will must fire)."""
        self.c.loop_stop()
        sock = self.c.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def unique(args, name):
    return f"fid-{name}-{args.tag}"


def scenario_qos_min(args):
    """A QoS 2 and a QoS 1 subscription; QoS 0, 1 and 2 published to each."""
    base = unique(args, "qos")
    sub = Client(args, base + "-sub")
    sub.connect()
    granted = sub.subscribe((base + "/two", 2), (base + "/one", 1))
    pub = Client(args, base + "-pub")
    pub.connect()
    for topic in ("two", "one"):
        for qos in (0, 1, 2):
            pub.publish(f"{base}/{topic}", f"{topic}-{qos}", qos=qos)
    got = sub.receive(6)
    pub.disconnect()
    sub.disconnect()
    return {
        "granted": granted,
        "delivered": {m["payload"]: m["qos"] for m in got},
    }


def scenario_retained_resubscribe(args):
    """A retained message; SUBSCRIBE to its filter, then the same filter again (at another QoS)."""
    topic = unique(args, "retained") + "/state"
    pub = Client(args, unique(args, "retained-pub"))
    pub.connect()
    pub.publish(topic, "kept", qos=1, retain=True)
    sub = Client(args, unique(args, "retained-sub"))
    sub.connect()
    first = sub.subscribe((topic, 1))
    got_first = sub.receive(1)
    again = sub.subscribe((topic, 0))
    got_again = sub.receive(1)
    # The replaced subscription is QoS 0 now: a live QoS 1 message arrives at QoS 0.
    pub.publish(topic, "live", qos=1)
    live = sub.receive(1)
    pub.publish(topic, "", qos=1, retain=True)
    pub.disconnect()
    sub.disconnect()
    return {
        "granted": [first, again],
        "first": [(m["payload"], m["retain"]) for m in got_first],
        "again": [(m["payload"], m["retain"], m["qos"]) for m in got_again],
        "live": [(m["payload"], m["retain"], m["qos"]) for m in live],
    }


def scenario_dup_redelivery(args):
    """A persistent session receives a QoS 1 message, does not acknowledge it, goes away."""
    topic = unique(args, "dup") + "/t"
    cid = unique(args, "dup-sub")
    sub = Client(args, cid, clean=False, manual_ack=True)
    sub.connect()
    sub.subscribe((topic, 1))
    pub = Client(args, unique(args, "dup-pub"))
    pub.connect()
    pub.publish(topic, "once", qos=1)
    first = sub.receive(1)
    sub.kill()
    again = Client(args, cid, clean=False)
    rc, present = again.connect()
    redelivered = again.receive(1)
    again.disconnect()
    # Leave no session behind.
    clean = Client(args, cid, clean=True)
    clean.connect()
    clean.disconnect()
    pub.disconnect()
    return {
        "first": [(m["payload"], m["dup"]) for m in first],
        "resumed": [rc, present],
        "redelivered": [(m["payload"], m["dup"], m["qos"]) for m in redelivered],
    }


def scenario_takeover_will(args):
    """A connection with a will is taken over by a new one with the same client id."""
    base = unique(args, "takeover")
    watcher = Client(args, base + "-watcher")
    watcher.connect()
    watcher.subscribe((base + "/will", 1))
    old = Client(args, base).will(base + "/will", "old-gone", qos=1)
    old_connack = old.connect()
    new = Client(args, base)
    new_connack = new.connect()
    old_closed = old.gone.wait(WAIT)
    wills = watcher.receive(1)
    new.disconnect()
    watcher.disconnect()
    return {
        "connacks": [old_connack[0], new_connack[0]],
        "old_closed": old_closed,
        "wills": [m["payload"] for m in wills],
    }


def scenario_resumed_session(args):
    """What a persistent session gets back: only what its subscriptions matched, at their QoS;
    nothing at all once a clean session with the same client id has discarded it."""
    base = unique(args, "resume")
    cid = base + "-sub"
    sub = Client(args, cid, clean=False)
    sub.connect()
    sub.subscribe((base + "/one", 1))
    sub.disconnect()
    pub = Client(args, base + "-pub")
    pub.connect()
    pub.publish(base + "/one", "matched-2", qos=2)
    pub.publish(base + "/one", "matched-1", qos=1)
    pub.publish(base + "/other", "unmatched", qos=1)
    back = Client(args, cid, clean=False)
    resumed = back.connect()
    queued = back.receive(3, timeout=2.0)
    back.disconnect()
    # A clean session discards the stored one: a later persistent connect starts afresh.
    clean = Client(args, cid, clean=True)
    clean.connect()
    clean.disconnect()
    pub.publish(base + "/one", "after-clean", qos=1)
    fresh = Client(args, cid, clean=False)
    afresh = fresh.connect()
    leftovers = fresh.receive(1, timeout=1.5)
    fresh.disconnect()
    wipe = Client(args, cid, clean=True)
    wipe.connect()
    wipe.disconnect()
    pub.disconnect()
    return {
        "resumed": list(resumed),
        "queued": sorted((m["payload"], m["qos"]) for m in queued),
        "afresh": list(afresh),
        "leftovers": [m["payload"] for m in leftovers],
    }


def scenario_v5(args):
    """An MQTT 5 client: CONNECT, SUBSCRIBE, PUBLISH to itself at QoS 1, a will, DISCONNECT."""
    base = unique(args, "v5")
    c = Client(args, base, protocol=V5)
    connack = c.connect(session_expiry=0)
    granted = c.subscribe((base + "/t", 1))
    puback = c.publish(base + "/t", "five", qos=1)
    got = c.receive(1)
    c.disconnect()
    return {
        "connack": list(connack),
        "granted": granted,
        "puback": puback,
        "got": [(m["payload"], m["qos"]) for m in got],
    }


def scenario_v31(args):
    """An MQTT 3.1 (`MQIsdp`) client: CONNECT, SUBSCRIBE, PUBLISH to itself at QoS 1."""
    base = unique(args, "v31")
    c = Client(args, base[:23], protocol=V31)
    connack = c.connect()
    granted = c.subscribe((base + "/t", 1))
    c.publish(base + "/t", "three-one", qos=1)
    got = c.receive(1)
    c.disconnect()
    return {
        "connack": list(connack),
        "granted": granted,
        "got": [(m["payload"], m["qos"]) for m in got],
    }


def scenario_acceptance(args):
    """Issue 16's acceptance, under a users file: an MQTT 5 reader of `k3sense/#` gets the retained
    reading and live ones, 0x87 for a forbidden SUBSCRIBE and PUBLISH; an MQTT 5 client's will fires.
    --sensor names the sensor a running publisher publishes; --user is a gateway-like account,
    --will-user a publisher account whose sensor is --will-sensor."""
    watch = Client(args, unique(args, "v5-watch"), protocol=V5)
    connack = watch.connect(session_expiry=0)
    granted = watch.subscribe(("k3sense/#", 1))
    state = f"k3sense/{args.sensor}/state"
    readings = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        live = [m for m in readings if not m["retain"]]
        if any(m["retain"] for m in readings) and len(live) >= 2:
            break
        readings += [m for m in watch.receive(1, timeout=1.0) if m["topic"] == state]
    forbidden_sub = watch.subscribe(("secret/#", 1))
    forbidden_pub = watch.publish(state, "{}", qos=1)
    will_user = (args.will_user, args.will_password)
    availability = f"k3sense/{args.will_sensor}/availability"
    probe = Client(args, unique(args, "v5-probe"), protocol=V5, login=will_user)
    probe.will(availability, "offline", qos=1)
    probe_connack = probe.connect(session_expiry=0)
    probe.publish(availability, "online", qos=1)
    probe.kill()
    wills = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and "offline" not in wills:
        wills += [m["payload"] for m in watch.receive(1, timeout=1.0) if m["topic"] == availability]
    watch.disconnect()
    seqs = []
    for m in readings:
        try:
            seqs.append((m["retain"], json.loads(m["payload"])["seq"]))
        except (ValueError, KeyError):
            seqs.append((m["retain"], None))
    return {
        "connack": list(connack),
        "granted": granted,
        "readings": seqs,
        "forbidden_subscribe": forbidden_sub,
        "forbidden_publish": forbidden_pub,
        "probe_connack": list(probe_connack),
        "availability": wills,
    }


SYS_TOPICS = [
    "$SYS/broker/version",
    "$SYS/broker/uptime",
    "$SYS/broker/clients/connected",
    "$SYS/broker/messages/received",
    "$SYS/broker/messages/sent",
]


def scenario_sys(args):
    """`$SYS/broker/...` with MQTT 3.1.1 and 5: a subscription gets each value at once (retained),
    then the values that change every sys_interval (the test starts both brokers with 1 s); a `#`
    subscription gets no `$SYS` topic [MQTT-4.7.2-1]."""
    base = unique(args, "sys")
    everything = Client(args, base + "-all")
    everything.connect()
    everything.subscribe(("#", 0))
    out = {}
    for name, protocol in (("v311", V311), ("v5", V5)):
        c = Client(args, f"{base}-{name}", protocol=protocol)
        c.connect()
        granted = c.subscribe(*[(t, 0) for t in SYS_TOPICS])
        first, later = {}, None
        deadline = time.monotonic() + 2 * WAIT
        while time.monotonic() < deadline and (len(first) < len(SYS_TOPICS) or later is None):
            for m in c.receive(1, timeout=max(0.0, deadline - time.monotonic())):
                seen = [m["payload"], m["retain"], m["qos"]]
                if m["topic"] not in first:
                    first[m["topic"]] = seen
                elif m["topic"] == "$SYS/broker/uptime" and not m["retain"]:
                    later = seen
        c.disconnect()
        out[name] = {"granted": granted, "first": first, "later_uptime": later}
    out["hash_got"] = sorted(
        {m["topic"] for m in everything.receive(10_000, timeout=0.5) if m["topic"].startswith("$")}
    )
    everything.disconnect()
    return out


SCENARIOS = {name[len("scenario_"):]: f for name, f in globals().items() if name.startswith("scenario_")}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--sensor")
    p.add_argument("--will-user")
    p.add_argument("--will-password")
    p.add_argument("--will-sensor")
    args = p.parse_args()
    args.tag = f"{random.randrange(1 << 30):x}"
    print(json.dumps(SCENARIOS[args.scenario](args)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
