"""The HTTP server as clients use it: the real `openai` client against a live uvicorn server on
127.0.0.1, serving a tiny random checkpoint. Every answer is checked against `Omni.generate` on
the same conversation (greedy thinker, seeded talker), so the server adds no drift of its own."""

import base64
import http.client
import io
import json
import math
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import wave

import numpy as np
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from live_server import serve_in_thread

from qomni import Omni
from qomni.audio_out import encode_audio, pcm16
from qomni.server import Limits, create_app
from qomni.server.filters import OutputFilter, Reasoning, ReasoningSplitter, parse_tool_calls
from qomni.tiny import make_tiny

KEY = "test-key"
MODEL = "tiny-omni"
LIBRIVOX = ("/usr/share/pocketsphinx/test/data/librivox/"
            "sense_and_sensibility_01_austen_64kb-0880.wav")
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def _wav(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm16(samples).tobytes())
    return buf.getvalue()


def _tone(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return _wav(0.3 * np.sin(2 * np.pi * 440 * t), rate)


def _speech() -> bytes:
    """Real speech (a LibriVox sentence) when installed, else a synthetic tone."""
    if os.path.exists(LIBRIVOX):
        with open(LIBRIVOX, "rb") as f:
            return f.read()
    return _tone(3.0)


def _png() -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _fields(obj) -> dict:
    """`delta.audio` as a dict: a typed model in recent openai clients, a dict in older ones."""
    return obj if isinstance(obj, dict) else obj.model_dump()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Live:
    def __init__(self, url, ref, media_dir, root, served):
        self.url, self.ref, self.media_dir, self.root = url, ref, media_dir, root
        self.served = served
        self.client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0,
                                    timeout=120)

    def chat(self, messages, **kw):
        return self.client.chat.completions.create(model=MODEL, messages=messages, **kw)

    def expected(self, conversation, **kw):
        kw.setdefault("return_audio", False)
        return self.ref.generate(conversation, **kw)

    def raw(self, method, path, body=None, headers=None):
        """(status, parsed JSON or text) without the openai client."""
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Authorization": f"Bearer {KEY}",
                                              "Content-Type": "application/json",
                                              **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                status, data = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, data = e.code, e.read()
        try:
            return status, json.loads(data)
        except ValueError:
            return status, data.decode()


def _start(app):
    port, stop = serve_in_thread(app)
    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    tiny = make_tiny(root / "tiny")
    media = root / "media"
    media.mkdir()
    (media / "speech.wav").write_bytes(_speech())
    (root / "outside.wav").write_bytes(_speech())
    served = Omni.load(tiny, dtype="float32", device="cpu", progress=False)
    limits = Limits(max_request_bytes=2 * 1024 * 1024, max_media_items=3, max_media_seconds=20)
    app = create_app(served, model_name=MODEL, api_key=KEY, allowed_local_media_path=media,
                     limits=limits)
    url, stop = _start(app)
    # A second instance computes the expected answers: the server's one is not shared.
    ref = Omni.load(tiny, dtype="float32", device="cpu", progress=False)
    yield Live(url, ref, media, root, served)
    stop()


def _error(exc_info, status):
    """The OpenAI error JSON of a failed call, checked for shape and status."""
    e = exc_info.value
    assert e.status_code == status
    body = e.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


# ------------------------------------------------------------------------------ basics


def test_health_and_models(live):
    assert live.raw("GET", "/health") == (200, {"status": "ok"})
    assert [m.id for m in live.client.models.list()] == [MODEL]
    assert live.client.models.retrieve(MODEL).id == MODEL


def test_text_matches_engine(live):
    r = live.chat([{"role": "system", "content": "You are terse."},
                   {"role": "user", "content": [{"type": "text", "text": "Hello "},
                                                {"type": "text", "text": "there"}]}],
                  max_completion_tokens=8)
    want = live.expected([{"role": "system", "content": "You are terse."},
                          {"role": "user", "content": "Hello there"}], max_new_tokens=8)
    choice = r.choices[0]
    assert choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason == "length"
    assert choice.message.audio is None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
        want.usage.prompt_tokens, want.usage.completion_tokens)


def test_text_streaming_matches_and_reports_usage(live):
    stream = live.chat([{"role": "user", "content": "Stream please"}], max_tokens=6, stream=True,
                       stream_options={"include_usage": True})
    chunks = list(stream)
    want = live.expected([{"role": "user", "content": "Stream please"}], max_new_tokens=6)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == want.usage.prompt_tokens


def test_stop_string_cuts_text_and_finishes_with_stop(live):
    conv = [{"role": "user", "content": "Count for me"}]
    full = live.expected(conv, max_new_tokens=10).text
    k = len(full) // 2
    stop = full[k:k + 2]
    cut = full[:full.find(stop)]
    r = live.chat(conv, max_tokens=10, stop=[stop, "\x00never"])
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 10
    chunks = list(live.chat(conv, max_tokens=10, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_string_with_speech_says_the_text_before_it(live):
    """The engine ends text and speech at the stop string: the reply finishes normally (usage
    included) and its audio is the engine's for the same stop, not a cut-off stream."""
    conv = [{"role": "user", "content": "Count for me"}]
    full = live.expected(conv, max_new_tokens=10).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    want = live.expected(conv, max_new_tokens=10, stop=[stop], seed=3, return_audio=True,
                         max_audio_frames=10)
    r = live.chat(conv, max_tokens=10, stop=stop, seed=3, modalities=["text", "audio"],
                  audio={"voice": "Ethan", "format": "pcm16"},
                  extra_body={"max_audio_frames": 10})
    msg = r.choices[0].message
    assert msg.content == want.text == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == want.usage.prompt_tokens
    assert r.usage.completion_tokens == want.usage.completion_tokens
    pcm = np.frombuffer(base64.b64decode(msg.audio.data), dtype="<i2")
    np.testing.assert_array_equal(pcm, pcm16(want.audio))


def test_sampling_is_seeded(live):
    conv = [{"role": "user", "content": "Surprise me"}]
    a = live.chat(conv, max_tokens=6, temperature=0.9, top_p=0.95, seed=5)
    b = live.chat(conv, max_tokens=6, temperature=0.9, top_p=0.95, seed=5)
    assert a.choices[0].message.content == b.choices[0].message.content
    from qomni import SamplingParams

    want = live.expected(conv, max_new_tokens=6, seed=5,
                         sampling=SamplingParams(temperature=0.9, top_p=0.95))
    assert a.choices[0].message.content == want.text


def test_sixteen_concurrent_streams_are_batched_and_all_correct(live):
    """16 streaming clients at once, every fourth one asking for speech: each gets exactly what
    it would get alone, the engine ran them side by side, and every cache row is free after."""
    convs = [[{"role": "user", "content": f"Question {i}"}] for i in range(16)]
    speak = set(range(0, 16, 4))
    results: list = [None] * 16
    engine = live.served._loop().engine
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], len(engine.running))
            time.sleep(0.002)

    def ask(i):
        kw = {"max_tokens": 4, "stream": True}
        if i in speak:
            kw |= {"modalities": ["text", "audio"], "audio": {"voice": "Ethan", "format": "pcm16"},
                   "extra_body": {"max_audio_frames": 6}}
        deltas = [c.choices[0].delta for c in live.chat(convs[i], **kw) if c.choices]
        pcm = b"".join(base64.b64decode(_fields(d.audio)["data"]) for d in deltas
                       if getattr(d, "audio", None) and _fields(d.audio).get("data"))
        results[i] = ("".join(d.content or "" for d in deltas), pcm)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    done.set()
    watcher.join()
    for i, conv in enumerate(convs):
        if i in speak:
            want = live.expected(conv, max_new_tokens=4, return_audio=True, max_audio_frames=6)
            assert results[i] == (want.text, pcm16(want.audio).tobytes()), i
        else:
            assert results[i] == (live.expected(conv, max_new_tokens=4).text, b""), i
    assert peak[0] > 1  # batched, not one after another
    assert not engine.running and not engine.waiting
    assert len(engine.free_rows) == len(engine.free_talker_rows) == engine.cache.k.shape[1]


def test_client_disconnect_cancels_the_request(live):
    """A stream abandoned after its first chunk must not keep the model busy: the next request
    is answered at once, not after thousands of tokens."""
    stream = live.chat([{"role": "user", "content": "Talk forever"}], max_tokens=4000,
                       stream=True)
    next(iter(stream))
    stream.close()
    t0 = time.monotonic()
    r = live.chat([{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].finish_reason == "length"
    assert time.monotonic() - t0 < 15  # the whole abandoned answer takes ~50 s
    deadline = time.monotonic() + 10
    while "qomni_requests_running 0.0" not in live.raw("GET", "/metrics")[1]:
        assert time.monotonic() < deadline, "the abandoned request is still running"
        time.sleep(0.1)
    engine = live.served._loop().engine
    while engine.running or len(engine.free_rows) < engine.cache.k.shape[1]:
        assert time.monotonic() < deadline, "the abandoned request still holds a cache row"
        time.sleep(0.1)


# ------------------------------------------------------------------------------ speech out


@pytest.fixture(scope="module")
def spoken(live):
    """One text+audio answer three ways: the engine, the server (wav), the server (stream)."""
    conv = [{"role": "user", "content": "Say something"}]
    kw = {"max_completion_tokens": 5, "seed": 11, "modalities": ["text", "audio"],
          "extra_body": {"max_audio_frames": 8}}
    want = live.expected(conv, max_new_tokens=5, seed=11, return_audio=True, speaker="Chelsie",
                         max_audio_frames=8)
    whole = live.chat(conv, audio={"voice": "chelsie", "format": "wav"}, **kw)
    chunks = list(live.chat(conv, audio={"voice": "CHELSIE", "format": "pcm16"}, stream=True,
                            stream_options={"include_usage": True}, **kw))
    return conv, want, whole, chunks


def test_audio_answer_matches_engine(live, spoken):
    _, want, r, _ = spoken
    msg = r.choices[0].message
    assert msg.content == want.text
    assert msg.audio.transcript == want.text and msg.audio.id.startswith("audio_")
    assert msg.audio.expires_at > time.time()
    with wave.open(io.BytesIO(base64.b64decode(msg.audio.data))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    frames = r.usage.completion_tokens_details.audio_tokens
    assert frames == want.usage.audio_frames > 0
    per_frame = live.ref.config.code2wav.samples_per_frame
    assert (frames - 1) * per_frame < pcm.size <= frames * per_frame
    np.testing.assert_array_equal(pcm, pcm16(want.audio))


def test_streamed_audio_reassembles_to_the_same_pcm(live, spoken):
    _, want, r, chunks = spoken
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    text = "".join(d.content or "" for d in deltas)
    audio = [_fields(d.audio) for d in deltas if getattr(d, "audio", None)]
    pcm = b"".join(base64.b64decode(a["data"]) for a in audio if a.get("data"))
    assert text == want.text == r.choices[0].message.content
    assert "".join(a.get("transcript") or "" for a in audio) == text
    assert len({a["id"] for a in audio}) == 1
    assert any(a.get("expires_at") for a in audio)
    with wave.open(io.BytesIO(base64.b64decode(r.choices[0].message.audio.data))) as w:
        assert pcm == w.readframes(w.getnframes())
    assert chunks[-1].usage.completion_tokens_details.audio_tokens == want.usage.audio_frames


def test_audio_history_by_id_uses_the_transcript(live, spoken):
    conv, want, r, _ = spoken
    follow = [*conv, {"role": "assistant", "audio": {"id": r.choices[0].message.audio.id}},
              {"role": "user", "content": "And then?"}]
    got = live.chat(follow, max_tokens=4)
    expected = live.expected([*conv, {"role": "assistant", "content": want.text},
                              {"role": "user", "content": "And then?"}], max_new_tokens=4)
    assert got.choices[0].message.content == expected.text
    unknown = [*conv, {"role": "assistant", "audio": {"id": "audio_unknown"}},
               {"role": "user", "content": "And then?"}]
    assert live.chat(unknown, max_tokens=2).choices[0].finish_reason == "length"


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac", "opus", "pcm16"])
def test_audio_encodings_decode_to_the_right_duration(fmt):
    import av

    pcm = (0.3 * np.sin(2 * np.pi * 440 * np.arange(12000) / 24000)).astype(np.float32)
    data = encode_audio(pcm, 24000, fmt)
    if fmt == "pcm16":
        assert data == pcm16(pcm).tobytes()
        return
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.audio[0]
        got = sum(f.samples for f in c.decode(stream)) / stream.rate
    assert abs(got - 0.5) < 0.06, (fmt, got)


# ------------------------------------------------------------------------------ media in


def test_image_data_uri_matches_engine(live):
    png = _png()
    r = live.chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(png)}},
        {"type": "text", "text": "What is this?"}]}], max_tokens=4)
    want = live.expected([{"role": "user", "content": [
        {"type": "image", "image": png}, {"type": "text", "text": "What is this?"}]}],
        max_new_tokens=4)
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == want.usage.prompt_tokens


def test_input_audio_and_allowed_local_file_match_engine(live):
    speech = _speech()
    want = live.expected([{"role": "user", "content": [
        {"type": "audio", "audio": speech}, {"type": "text", "text": "Transcribe."}]}],
        max_new_tokens=4)
    inline = live.chat([{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": _b64(speech), "format": "wav"}},
        {"type": "text", "text": "Transcribe."}]}], max_tokens=4)
    local = live.chat([{"role": "user", "content": [
        {"type": "audio_url", "audio_url": {"url": f"file://{live.media_dir / 'speech.wav'}"}},
        {"type": "text", "text": "Transcribe."}]}], max_tokens=4)
    assert inline.choices[0].message.content == want.text
    assert local.choices[0].message.content == want.text
    assert inline.usage.prompt_tokens == want.usage.prompt_tokens > 20


def _mp4(seconds: float, fps: int = 2, with_sound: bool = True) -> bytes:
    """A small H.264 video (moving colour blocks) with an AAC sine track."""
    import av

    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        sound = out.add_stream("aac", rate=16000) if with_sound else None
        for _ in range(int(seconds * fps)):
            frame = np.repeat(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), 8, 0).repeat(8, 1)
            out.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(video.encode())
        if sound is not None:
            t = np.arange(int(seconds * 16000)) / 16000
            wav = av.AudioFrame.from_ndarray((0.3 * np.sin(2 * np.pi * 330 * t))[None]
                                             .astype(np.float32), format="fltp", layout="mono")
            wav.sample_rate = 16000
            out.mux(sound.encode(wav))
            out.mux(sound.encode())
    return buf.getvalue()


def test_video_url_with_and_without_its_sound_matches_engine(live):
    clip = _mp4(2.0)
    url = "data:video/mp4;base64," + _b64(clip)
    for use_audio in (False, True):
        r = live.chat([{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": url}},
            {"type": "text", "text": "What happens?"}]}], max_tokens=4,
            extra_body={"mm_processor_kwargs": {"use_audio_in_video": use_audio}})
        want = live.expected([{"role": "user", "content": [
            {"type": "video", "video": clip}, {"type": "text", "text": "What happens?"}]}],
            max_new_tokens=4, use_audio_in_video=use_audio)
        assert r.choices[0].message.content == want.text
        assert r.usage.prompt_tokens == want.usage.prompt_tokens


def test_video_longer_than_the_limit_is_a_400(live):
    too_long = _mp4(21.0, fps=1, with_sound=False)  # the live server allows 20 s per item
    with pytest.raises(openai.BadRequestError) as e:
        live.chat([{"role": "user", "content": [
            {"type": "video_url",
             "video_url": {"url": "data:video/mp4;base64," + _b64(too_long)}}]}], max_tokens=2)
    assert "20 s limit" in _error(e, 400)["message"]
    assert live.chat([{"role": "user", "content": "still there?"}], max_tokens=2).choices


# ------------------------------------------------------------------------------ tools


def test_tools_go_through_the_template_and_the_parser(live):
    """The real path: whatever the random model writes, the answer is what the parser makes of
    the engine's output for the same tools."""
    conv = [{"role": "user", "content": "What's the weather in Paris?"}]
    r = live.chat(conv, tools=[WEATHER_TOOL], max_tokens=12)
    want = live.expected(conv, tools=[WEATHER_TOOL], max_new_tokens=12)
    content, calls = parse_tool_calls(want.text)
    msg = r.choices[0].message
    assert (msg.content or "") == content
    assert [(c.function.name, c.function.arguments) for c in msg.tool_calls or []] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in calls]
    assert r.choices[0].finish_reason == ("tool_calls" if calls else want.finish_reason)
    # The tools block must have reached the prompt: it is far longer than without tools.
    plain = live.expected(conv, max_new_tokens=1)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 50


def test_tool_call_history_is_accepted(live):
    conv = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    r = live.chat(conv, tools=[WEATHER_TOOL], max_tokens=4)
    want = live.expected([
        conv[0], {"role": "assistant", "content": "", "tool_calls": conv[1]["tool_calls"],},
        {"role": "tool", "content": "18 C, sunny"}], tools=[WEATHER_TOOL], max_new_tokens=4)
    assert r.choices[0].message.content == parse_tool_calls(want.text)[0]
    assert r.usage.prompt_tokens == want.usage.prompt_tokens


def test_tool_call_parser():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert parse_tool_calls("no tools here") == ("no tools here", [])
    bad = "x <tool_call>\nnot json\n</tool_call>"
    assert parse_tool_calls(bad) == (bad, [])
    # Cut off before the closing tag (max_tokens): still a call when its JSON is complete.
    _, calls = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n')
    assert calls[0]["function"]["arguments"] == '{"a": 1}'
    # Streamed in random pieces: the same result, and no tag ever leaks into the content.
    rng = random.Random(0)
    for _ in range(20):
        f, pieces, i = OutputFilter(parse_tools=True), [], 0
        while i < len(text):
            n = rng.randint(1, 5)
            pieces += f.push(text[i:i + n])
            i += n
        pieces += f.finish()
        assert "".join(p for p in pieces if isinstance(p, str)) == "Let me check."
        assert [p["function"]["name"] for p in pieces if isinstance(p, dict)] == [
            "get_weather", "get_time"]
        assert f.in_tools


class _Scripted:
    """The served Omni with a scripted stream: the random model never calls a tool, so this
    checks the wire format of a tool call, and that the server asks the engine to end the
    speech where the call starts (`speech_stop`)."""

    def __init__(self, omni):
        self._omni = omni
        self.calls = []

    def __getattr__(self, name):
        return getattr(self._omni, name)

    async def astream(self, messages, **kwargs):
        from qomni import AudioChunk, Finished, TextDelta, Usage

        self.calls.append(kwargs)
        yield TextDelta("Let me check.", [1, 2])
        yield AudioChunk(np.full(1920, 0.25, np.float32), 24000)
        yield TextDelta('\n<tool_call>\n{"name": "get_weather", ', [3])
        yield TextDelta('"arguments": {"city": "Paris"}}\n</tool_call>', [4])
        yield Finished("stop", Usage(10, 5, 2))


def test_tool_call_wire_format(live):
    scripted = _Scripted(live.served)
    url, stop = _start(create_app(scripted, model_name=MODEL))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        kw = {"model": MODEL, "messages": [{"role": "user", "content": "Weather in Paris?"}],
              "tools": [WEATHER_TOOL], "modalities": ["text", "audio"],
              "audio": {"voice": "Ethan", "format": "pcm16"}}
        r = client.chat.completions.create(**kw)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls"
        assert msg.content == "Let me check." == msg.audio.transcript
        (call,) = msg.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert (call.function.name, json.loads(call.function.arguments)) == (
            "get_weather", {"city": "Paris"})
        assert base64.b64decode(msg.audio.data) == pcm16(np.full(1920, 0.25)).tobytes()

        chunks = list(client.chat.completions.create(stream=True, **kw))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.content or "" for d in deltas) == "Let me check."
        calls = [tc for d in deltas for tc in d.tool_calls or []]
        assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] \
            == [(0, "get_weather", {"city": "Paris"})]
        pcm = b"".join(base64.b64decode(_fields(d.audio)["data"]) for d in deltas
                       if getattr(d, "audio", None) and _fields(d.audio).get("data"))
        assert pcm == pcm16(np.full(1920, 0.25)).tobytes()
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert [c["options"].speech_stop for c in scripted.calls] == [("<tool_call>",)] * 2
    finally:
        stop()


class _Thinking:
    """The served Omni writing like a Thinking checkpoint, its tags split across deltas."""

    PIECES = ("<thi", "nk>\nThe user", " greets me.\n</th", "ink>\n", "\nHello", " there!")

    def __init__(self, omni):
        self._omni = omni

    def __getattr__(self, name):
        return getattr(self._omni, name)

    async def astream(self, messages, **kwargs):
        from qomni import Finished, TextDelta, Usage

        for i, piece in enumerate(self.PIECES):
            yield TextDelta(piece, [i])
        yield Finished("stop", Usage(7, len(self.PIECES), 0))


def test_thinking_reasoning_comes_apart_from_the_answer(live):
    served = _Thinking(live.served)
    served.path = "/models/Qwen3-Omni-30B-A3B-Thinking"  # auto: on for a Thinking checkpoint
    url, stop = _start(create_app(served, model_name=MODEL))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        conv = [{"role": "user", "content": "Hi"}]
        msg = client.chat.completions.create(model=MODEL, messages=conv).choices[0].message
        assert (msg.reasoning_content, msg.content) == ("The user greets me.", "Hello there!")
        deltas = [c.choices[0].delta for c in client.chat.completions.create(
            model=MODEL, messages=conv, stream=True) if c.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == \
            "The user greets me."
        assert "".join(d.content or "" for d in deltas) == "Hello there!"
        # enable_thinking=false: the template closes the think block itself, nothing to split
        msg = client.chat.completions.create(
            model=MODEL, messages=conv,
            extra_body={"chat_template_kwargs": {"enable_thinking": False}}).choices[0].message
        assert msg.content == "".join(_Thinking.PIECES) and msg.reasoning_content is None
    finally:
        stop()


def test_reasoning_splitter_does_not_depend_on_chunking():
    text = "<think>\nStep one.\n\nStep two.  \n</think>\n\nDone. "
    rng = random.Random(1)
    for _ in range(30):
        f, out, i = ReasoningSplitter(), [], 0
        while i < len(text):
            n = rng.randint(1, 4)
            out += f.push(text[i:i + n])
            i += n
        out += f.finish()
        assert "".join(p.text for p in out if isinstance(p, Reasoning)) == \
            "Step one.\n\nStep two."
        assert "".join(p for p in out if isinstance(p, str)) == "Done. "
    f = ReasoningSplitter()  # cut before </think>: all reasoning
    assert f.push("<think>\nhalf a thou") + f.finish() == [Reasoning("half a thou")]


# ------------------------------------------------------------------------------ errors


def test_errors_are_openai_json_and_the_server_keeps_serving(live):
    user = {"role": "user", "content": "hi"}

    def audio_part(url):
        return {"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": url}}]}

    with pytest.raises(openai.BadRequestError) as e:  # bad base64
        live.chat([{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "@@not base64@@", "format": "wav"}}]}])
    assert "base64" in _error(e, 400)["message"]
    assert "input_audio" in e.value.response.json()["error"]["param"]

    with pytest.raises(openai.BadRequestError) as e:  # unknown voice, also when streaming
        live.chat([user], modalities=["text", "audio"], audio={"voice": "Nobody",
                                                                "format": "wav"}, stream=True)
    err = _error(e, 400)
    assert "Aiden, Chelsie, Ethan" in err["message"] and err["param"] == "audio.voice"

    with pytest.raises(openai.BadRequestError) as e:  # unknown audio format
        live.chat([user], modalities=["text", "audio"], audio={"voice": "Ethan", "format": "ogg"})
    assert _error(e, 400)["param"] == "audio.format"

    status, body = live.raw("POST", "/v1/chat/completions", json.dumps({"model": MODEL}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        live.chat([])
    assert _error(e, 400)["param"] == "messages"
    status, body = live.raw("POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:  # unknown content part
        live.chat([{"role": "user", "content": [{"type": "hologram", "hologram": "x"}]}])
    assert _error(e, 400)["param"] == "messages[0].content[0]"

    bad_key = openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad_key.chat.completions.create(model=MODEL, messages=[user])
    assert _error(e, 401)["code"] == "invalid_api_key"
    status, _ = live.raw("GET", "/v1/models", headers={"Authorization": ""})
    assert status == 401

    with pytest.raises(openai.NotFoundError) as e:
        live.client.chat.completions.create(model="gpt-4o", messages=[user])
    assert _error(e, 404)["code"] == "model_not_found"
    status, body = live.raw("GET", "/v1/nowhere")
    assert status == 404 and "error" in body

    with pytest.raises(openai.BadRequestError) as e:  # local file outside the allowed folder
        live.chat([audio_part(str(live.root / "outside.wav"))])
    assert "outside the allowed media folder" in _error(e, 400)["message"]
    with pytest.raises(openai.BadRequestError) as e:  # ... also via ../
        live.chat([audio_part(f"file://{live.media_dir}/../outside.wav")])
    assert "outside the allowed media folder" in _error(e, 400)["message"]
    with pytest.raises(openai.BadRequestError) as e:  # remote URLs are off by default
        live.chat([audio_part("https://example.com/a.wav")])
    assert "remote URLs are disabled" in _error(e, 400)["message"]

    with pytest.raises(openai.BadRequestError) as e:  # audio longer than max_media_seconds
        live.chat([{"role": "user", "content": [{"type": "input_audio", "input_audio": {
            "data": _b64(_tone(21.0, rate=8000)), "format": "wav"}}]}])
    assert "longer than the 20 s limit" in _error(e, 400)["message"]
    with pytest.raises(openai.BadRequestError) as e:  # too many media items
        live.chat([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}] * 4}])
    assert "at most 3" in _error(e, 400)["message"]
    with pytest.raises(openai.BadRequestError) as e:  # not an image
        live.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + _b64(b"definitely not a png" * 10)}}]}])
    _error(e, 400)
    with pytest.raises(openai.BadRequestError) as e:
        live.chat([user], n=2)
    assert _error(e, 400)["param"] == "n"

    with pytest.raises(openai.APIStatusError) as e:  # oversized body, with Content-Length
        live.chat([{"role": "user", "content": "x" * (3 * 1024 * 1024)}])
    assert _error(e, 413)["code"] == "request_too_large"
    conn = http.client.HTTPConnection("127.0.0.1", int(live.url.rsplit(":", 1)[1]), timeout=60)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "y" * 3_000_000}]})
    conn.request("POST", "/v1/chat/completions", body=(body[i:i + 65536].encode() for i in range(
        0, len(body), 65536)), headers={"Authorization": f"Bearer {KEY}",
                                         "Content-Type": "application/json"},
        encode_chunked=True)
    resp = conn.getresponse()  # ... and streamed without a length
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
    conn.close()

    # Still serving, correctly.
    assert live.raw("GET", "/health")[0] == 200
    r = live.chat([user], max_tokens=3)
    assert r.choices[0].message.content == live.expected([user], max_new_tokens=3).text


def test_cli_serve_without_model_serves_the_demo_checkpoint(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "qomni", "serve", "--port", str(port), "--api-key", "k"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "serving" in line and "http://" in line:
                break
        text = "".join(lines)
        assert "tiny random demo checkpoint" in text, text
        assert f"http://127.0.0.1:{port}/v1" in text, text
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k",
                               max_retries=0, timeout=60)
        deadline = time.monotonic() + 60
        while True:
            try:
                assert [m.id for m in client.models.list()] == ["qomni-tiny-demo"]
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
        r = client.chat.completions.create(model="qomni-tiny-demo", max_tokens=2,
                                           messages=[{"role": "user", "content": "hi"}])
        assert r.usage.completion_tokens == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_metrics(live):
    live.chat([{"role": "user", "content": "count me"}], max_tokens=2)
    status, text = live.raw("GET", "/metrics")
    assert status == 200
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    assert values['qomni_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert values["qomni_prompt_tokens_total"] > 0
    assert values["qomni_completion_tokens_total"] >= 2
    assert values["qomni_time_to_first_token_seconds_count"] >= 1
    assert "qomni_time_to_first_audio_seconds_count" in values
    assert "qomni_audio_frames_total" in values
    assert not math.isnan(values["qomni_request_duration_seconds_sum"])
