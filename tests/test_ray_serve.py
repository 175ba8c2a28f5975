"""qomni on Ray Serve, as clients use it: a local Ray instance on 2 CPUs, two engine replicas of
a tiny random checkpoint behind the ingress, the real openai and websocket clients over HTTP.
Every answer is checked against `Omni.generate` in this process on the same conversation, so
the replicas, the router and the streaming through Ray add no drift of their own."""

import asyncio
import base64
import json
import socket
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from ray import serve
from websockets.sync.client import connect

from qomni import Omni
from qomni.audio_out import pcm16
from qomni.serve_ray import ENGINE, TALKER, build_app
from qomni.serve_ray.ingress import ReplicaAware
from qomni.server.realtime_config import VOICE_ASSISTANT_PROMPT
from qomni.tiny import make_tiny

MODEL = "tiny-omni"
HEADER = "x-qomni-replica"


class Cluster:
    def __init__(self, url: str, ref: Omni, tiny):
        self.url, self.ref, self.tiny = url, ref, tiny
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                                    timeout=120)

    def stream(self, messages, client=None, **kw):
        """(replica header, the stream of chunks)."""
        raw = (client or self.client).chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, stream=True, **kw)
        return raw.headers[HEADER], raw.parse()

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def replicas(self) -> dict[str, dict]:
        """Each replica's stats by id. A replica busy streaming on its one CPU can miss the
        ingress's probe deadline (reported "busy", without stats): asked again until all
        answer, for a minute at most."""
        deadline = time.monotonic() + 60
        while True:
            _, body = self.get("/health")
            replicas = {r["replica"]: r for r in json.loads(body)["replicas"]}
            if all(r["state"] != "busy" for r in replicas.values()) or \
                    time.monotonic() > deadline:
                return replicas
            time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tiny = make_tiny(tmp_path_factory.mktemp("ray") / "tiny")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # One CPU per replica: the two fill the instance, and a replacement gets the CPU of
        # the replica it replaces.
        serve.run(build_app(str(tiny), replicas=2, replica_cpus=1, dtype="float32",
                            device="cpu", server={"model_name": MODEL}),
                  name="qomni", route_prefix="/")
        ref = Omni.load(tiny, dtype="float32", device="cpu", progress=False)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as a replica with one CPU: the same sums in the same order
        try:
            yield Cluster(f"http://127.0.0.1:{port}", ref, tiny)
        finally:
            torch.set_num_threads(threads)
    finally:
        serve.shutdown()
        ray.shutdown()


def _collect(chunks) -> tuple[str, bytes]:
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    audio = [getattr(d, "audio", None) or {} for d in deltas]
    audio = [a if isinstance(a, dict) else a.model_dump() for a in audio]
    pcm = b"".join(base64.b64decode(a["data"]) for a in audio if a.get("data"))
    return "".join(d.content or "" for d in deltas), pcm


def _speech_kw(frames: int) -> dict:
    return {"modalities": ["text", "audio"], "audio": {"voice": "Ethan", "format": "pcm16"},
            "extra_body": {"max_audio_frames": frames}}


def test_cli_checks_the_replica_counts(capsys):
    from qomni.cli import main

    assert main(["serve", "--replicas", "0"]) == 2
    assert "--replicas must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--replicas", "2", "--max-replicas", "1"]) == 2
    assert "--max-replicas 1 is below --replicas 2" in capsys.readouterr().err
    assert main(["serve", "--talker-replicas", "-1"]) == 2
    assert "--talker-replicas must be at least 0" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_eight_concurrent_streams_match_one_process_and_are_counted(cluster):
    """8 openai clients at once (two asking for speech, seeded: the talker samples): each gets
    exactly what one process gives alone, and the replicas that headers name counted them, as
    /metrics says. (Which replicas: the next test; short requests that do not overlap on the
    replicas are each a tie, which the router breaks at random.)"""
    before = cluster.replicas()
    assert len(before) == 2 and all(r["state"] == "up" for r in before.values())
    convs = [[{"role": "user", "content": f"Question {i}"}] for i in range(8)]
    speak = {0, 5}
    results: list = [None] * 8

    def ask(i):
        kw = {"max_tokens": 6, "seed": i} | (_speech_kw(6) if i in speak else {})
        replica, chunks = cluster.stream(convs[i], **kw)
        results[i] = (replica, *_collect(chunks))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for i, conv in enumerate(convs):
        want = cluster.ref.generate(conv, max_new_tokens=6, seed=i, return_audio=i in speak,
                                    max_audio_frames=6 if i in speak else None)
        expected_pcm = pcm16(want.audio).tobytes() if i in speak else b""
        assert results[i][1:] == (want.text, expected_pcm), i
    served = {r[0] for r in results}
    assert served <= set(before)
    after = cluster.replicas()
    for rid in served:
        n = sum(r[0] == rid for r in results)
        assert after[rid]["requests"] - before[rid]["requests"] == n
    status, text = cluster.get("/metrics")
    assert status == 200
    for rid in served:
        assert f'qomni_replica_up{{replica="{rid}"}} 1.0' in text.decode()
        assert f'qomni_replica_requests_total{{replica="{rid}"}}' in text.decode()
        assert f'qomni_engine_rows_in_use{{replica="{rid}"}}' in text.decode()
    assert b"qomni_requests_total" in text  # the ingress's own metrics are there too
    status, page = cluster.get("/")
    assert status == 200 and b"<html" in page.lower()  # the web demo


def test_requests_go_to_the_replica_without_a_stream_running(cluster):
    """The router's least-loaded choice, made certain: while a long stream runs on one replica,
    each short request in turn goes to the other one (a random choice would hit the busy one
    half the time), and gets what one process gives alone."""
    cluster.replicas()  # fresh queue lengths in the router for both replicas
    busy, long = cluster.stream([{"role": "user", "content": "Go on"}], max_tokens=3000)
    next(iter(long))
    try:
        for i in range(3):
            conv = [{"role": "user", "content": f"Meanwhile {i}"}]
            replica, chunks = cluster.stream(conv, max_tokens=4, seed=i)
            text = _collect(chunks)[0]
            assert replica != busy, i
            assert text == cluster.ref.generate(conv, max_new_tokens=4, seed=i).text, i
        more = next(iter(long))  # the long stream ran all along, and still streams
        assert more.choices and more.choices[0].finish_reason is None
        stats = cluster.replicas()[busy]
        # Its count where it answers the probe. On a loaded 2-core CI machine the probe of the
        # replica streaming on its one CPU has come back without stats (a /health issue still
        # open, docs/scaling.md), so the stream itself is the proof above.
        assert stats["state"] != "up" or stats["running"] == 1, stats
    finally:
        long.close()
    deadline = time.monotonic() + 30
    while cluster.replicas()[busy].get("running", 1):  # it aborts: the next tests find it idle
        assert time.monotonic() < deadline, "the long stream still runs"
        time.sleep(0.2)


def test_a_client_that_goes_away_aborts_its_request_on_the_replica(cluster):
    """Closing a stream after its first chunk stops the generation on its replica (the request
    would otherwise run to its 3000 tokens)."""
    before = cluster.replicas()
    replica, chunks = cluster.stream([{"role": "user", "content": "Go on"}], max_tokens=3000)
    next(iter(chunks))
    chunks.close()
    deadline = time.monotonic() + 30
    while True:
        now = cluster.replicas()[replica]
        if now["running"] == 0 and now["requests"] == before[replica]["requests"] + 1:
            break
        assert time.monotonic() < deadline, f"still generating: {now}"
        time.sleep(0.2)
    assert now["cancelled"] == before[replica]["cancelled"] + 1


class RT:
    def __init__(self, url: str):
        self._conn = connect(url.replace("http", "ws") + f"/v1/realtime?model={MODEL}",
                             max_size=None, open_timeout=60)
        self.ws = self._conn.__enter__()
        assert self.recv()["type"] == "session.created"

    def send(self, **event) -> None:
        self.ws.send(json.dumps(event))

    def recv(self) -> dict:
        return json.loads(self.ws.recv(timeout=120))

    def until(self, kind: str) -> list[dict]:
        out = []
        while True:
            ev = self.recv()
            assert ev["type"] != "error", ev
            out.append(ev)
            if ev["type"] == kind:
                return out

    def close(self) -> None:
        self._conn.__exit__(None, None, None)


def test_a_realtime_session_stays_on_its_replica(cluster):
    """Three spoken turns (the audio prefilled while it arrives, on a replica): every call of
    the session goes to one replica, each reply equals one process's, and a later turn
    continues the prefix that replica prefilled."""
    rt = RT(cluster.url)
    rt.send(type="session.update", session={"modalities": ["text"], "turn_detection": None,
                                            "max_tokens": 4, "input_audio_sample_rate": 16000})
    rt.until("session.updated")
    before = cluster.replicas()
    rng = np.random.default_rng(0)
    conv = [{"role": "system", "content": VOICE_ASSISTANT_PROMPT}]
    cached = []
    for turn in range(3):
        pcm = (rng.standard_normal(16000 * 3) * 3000).astype("<i2")
        for i in range(0, len(pcm), 1600):
            rt.send(type="input_audio_buffer.append",
                    audio=base64.b64encode(pcm[i:i + 1600].tobytes()).decode())
        rt.send(type="input_audio_buffer.commit")
        rt.until("conversation.item.created")
        rt.send(type="response.create")
        events = rt.until("response.done")
        text = "".join(e["delta"] for e in events if e["type"].endswith("text.delta"))
        conv.append({"role": "user", "content": [{"type": "audio",
                                                  "audio": pcm.astype(np.float32) / 32768.0}]})
        want = cluster.ref.generate(conv, max_new_tokens=4, return_audio=False)
        assert text == want.text, turn
        conv.append({"role": "assistant", "content": text})
        usage = events[-1]["response"]["usage"]
        cached.append(usage["input_token_details"]["cached_tokens"])
    rt.close()
    after = cluster.replicas()
    grew = {rid: after[rid]["pinned_calls"] - before[rid]["pinned_calls"] for rid in after}
    home = max(grew, key=grew.get)
    # Each turn: a prefix opened when its audio starts (grown per finished window), then a
    # response; the session's first call picks its replica, every later one is pinned there.
    assert grew[home] >= 5
    assert all(after[r]["requests"] == before[r]["requests"] for r in after if r != home)
    assert after[home]["requests"] - before[home]["requests"] == 3
    assert cached[-1] > 0  # the prefix prefilled on that replica was continued
    deadline = time.monotonic() + 30
    while cluster.replicas()[home]["prefixes"]:  # every prefix taken over or closed
        assert time.monotonic() < deadline, "the session left prefixes on its replica"
        time.sleep(0.2)


def _find_actor(replica: str, deployment: str = ENGINE):
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].endswith(f"#{deployment}#{replica}"):
            return ray.get_actor(a["name"], namespace=a["namespace"])
    raise AssertionError(f"no actor for replica {replica}")


def _text_turn(rt: RT, text: str) -> str:
    rt.send(type="conversation.item.create", item={
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]})
    rt.until("conversation.item.created")
    rt.send(type="response.create")
    events = rt.until("response.done")
    return "".join(e["delta"] for e in events if e["type"].endswith("text.delta"))


def test_a_replica_killed_mid_stream_errors_its_clients_and_comes_back(cluster):
    """A realtime session's replica is killed while four long streams run. Its streams end
    with an error event (no hang), the others finish with one process's answer, Serve starts a
    replacement, new requests are served, and the session's next turn re-homes."""
    rt = RT(cluster.url)
    rt.send(type="session.update", session={"modalities": ["text"], "turn_detection": None,
                                            "max_tokens": 4})
    rt.until("session.updated")
    before = cluster.replicas()
    conv = [{"role": "system", "content": VOICE_ASSISTANT_PROMPT},
            {"role": "user", "content": "First"}]
    reply = _text_turn(rt, "First")
    assert reply == cluster.ref.generate(conv, max_new_tokens=4).text
    after = cluster.replicas()
    victim = max(after, key=lambda r: after[r]["pinned_calls"] - before[r]["pinned_calls"])

    convs = [[{"role": "user", "content": f"Tell a long story {i}"}] for i in range(4)]
    started = [threading.Event() for _ in convs]
    results: list = [None] * 4
    n_tokens = 200

    def ask(i):
        replica, chunks = cluster.stream(convs[i], max_tokens=n_tokens)
        text, error = [], None
        try:
            for c in chunks:
                if c.choices and c.choices[0].delta.content:
                    text.append(c.choices[0].delta.content)
                started[i].set()
        except openai.APIError as e:
            error = e
        results[i] = (replica, "".join(text), error)
        started[i].set()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for ev in started:
        assert ev.wait(120)
    assert cluster.replicas()[victim]["running"] > 0
    ray.kill(_find_actor(victim), no_restart=True)
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a stream hung after its replica died"
    for i, (replica, text, error) in enumerate(results):
        if replica == victim:
            assert error is not None and "replica" in str(error), (i, error)
        else:
            want = cluster.ref.generate(convs[i], max_new_tokens=n_tokens)
            assert error is None and text == want.text, (i, error)
    deadline = time.monotonic() + 120
    while True:
        now = cluster.replicas()
        if victim not in now and sum(r["state"] == "up" for r in now.values()) == 2:
            break
        assert time.monotonic() < deadline, f"no replacement replica: {now}"
        time.sleep(1)
    one = [{"role": "user", "content": "After"}]
    _, chunks = cluster.stream(one, max_tokens=4)
    assert _collect(chunks)[0] == cluster.ref.generate(one, max_new_tokens=4).text
    conv += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Second"}]
    assert _text_turn(rt, "Second") == cluster.ref.generate(conv, max_new_tokens=4).text
    rt.close()


def test_talker_replicas_speak_as_one_process(cluster):
    """Thinker and talker apart, as a second application on the instance: one engine replica
    holding the thinker alone, one talker replica (no CPU of their own: the instance's two are
    taken; one thread each, as Ray gives them). Two speaking streams at once (seeded: the
    talker samples) and a text one each get what one process gives alone. Then the talker
    replica is killed mid-speech: that stream ends with an error naming it, at once."""
    serve.run(build_app(str(cluster.tiny), replicas=1, talker_replicas=1, replica_cpus=0,
                        dtype="float32", device="cpu", server={"model_name": MODEL}),
              name="apart", route_prefix="/apart")
    try:
        client = openai.OpenAI(base_url=cluster.url + "/apart/v1", api_key="none",
                               max_retries=0, timeout=120)
        convs = [[{"role": "user", "content": f"Speak apart {i}"}] for i in range(3)]
        speak = {0, 1}
        results: list = [None] * 3

        def ask(i):
            kw = {"max_tokens": 6, "seed": i} | (_speech_kw(8) if i in speak else {})
            results[i] = _collect(cluster.stream(convs[i], client=client, **kw)[1])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        frames = 0  # the codec frames the talker replica spoke
        for i, conv in enumerate(convs):
            want = cluster.ref.generate(conv, max_new_tokens=6, seed=i, return_audio=i in speak,
                                        max_audio_frames=8 if i in speak else None)
            assert want.audio is None or want.audio.size  # (it did speak)
            frames += want.usage.audio_frames
            expected_pcm = pcm16(want.audio).tobytes() if i in speak else b""
            assert results[i] == (want.text, expected_pcm), i
        deadline = time.monotonic() + 30
        while True:  # a job's stream closes just after its last chunk went out
            status, body = cluster.get("/apart/health")
            talkers = [r for r in json.loads(body)["replicas"] if r["role"] == "talker"]
            assert status == 200 and len(talkers) == 1, body
            talker = talkers[0]
            if talker["requests"] == len(speak) and not talker["jobs"]:  # spoken there
                break
            assert time.monotonic() < deadline, talker
            time.sleep(0.1)
        assert talker["state"] == "up" and talker["errors"] == 0
        assert talker["audio_frames"] == frames and talker["running"] == talker["waiting"] == 0
        status, text = cluster.get("/apart/metrics")
        rid = talker["replica"]
        assert status == 200
        for line in (f'qomni_talker_replica_up{{replica="{rid}"}} 1.0',
                     f'qomni_talker_replica_requests_total{{replica="{rid}"}} {len(speak)}.0',
                     f'qomni_talker_replica_audio_frames_total{{replica="{rid}"}} {frames}.0',
                     f'qomni_talker_replica_jobs{{replica="{rid}"}} 0.0'):
            assert line in text.decode().splitlines(), line
        assert "qomni_replica_up{" in text.decode()  # and its engine replica's

        long = {**_speech_kw(60), "max_tokens": 400}
        _, chunks = cluster.stream([{"role": "user", "content": "Speak long"}], client=client,
                                   **long)
        chunks = iter(chunks)
        while not _collect([next(chunks)])[1]:  # its first audio
            pass
        ray.kill(_find_actor(talker["replica"], TALKER), no_restart=True)
        with pytest.raises(openai.APIError, match="talker replica stopped"):
            list(chunks)
    finally:
        serve.delete("apart")


@pytest.mark.parametrize("talker, status", [(None, 200), ("up", 200), ("busy", 200),
                                            ("gone", 503), ("error", 503), ("none", 503)])
def test_health_needs_a_talker_replica_where_they_speak(talker, status):
    """In a thinker-only application, /health is 503 while no talker replica serves."""
    engine = [{"replica": "e1", "role": "engine", "state": "up"}]
    talkers = [] if talker in (None, "none") else [
        {"replica": "t1", "role": "talker", "state": talker}]
    aware = ReplicaAware(None, None, None if talker is None else object())

    async def replicas():
        return engine + talkers

    sent = []

    async def send(message):
        sent.append(message)

    aware.replicas = replicas
    asyncio.run(aware(({"type": "http", "method": "GET", "path": "/health"}), None, send))
    assert sent[0]["status"] == status
    assert json.loads(sent[1]["body"])["replicas"] == engine + talkers


def test_shutdown_lets_in_flight_streams_finish(cluster):
    """Deleting the application (what `qomni serve --replicas` does on Ctrl-C) while two
    streams run: both finish with their whole answer before the replicas stop. Last test: the
    application is gone after it."""
    convs = [[{"role": "user", "content": f"Last words {i}"}] for i in range(2)]
    started = [threading.Event() for _ in convs]
    results: list = [None] * 2

    def ask(i):
        _, chunks = cluster.stream(convs[i], max_tokens=120)
        text = []
        try:
            for c in chunks:
                if c.choices and c.choices[0].delta.content:
                    text.append(c.choices[0].delta.content)
                    started[i].set()
            results[i] = "".join(text)
        except openai.APIError as e:
            results[i] = e
        started[i].set()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for ev in started:
        assert ev.wait(120)
    serve.delete("qomni")
    for t in threads:
        t.join(120)
    for i, conv in enumerate(convs):
        assert results[i] == cluster.ref.generate(conv, max_new_tokens=120).text, i
    assert cluster.get("/health")[0] == 404  # the application is gone
