"""Property-based fuzzing (hypothesis) of what reads realtime client events: the event parser,
the session settings parser (`SessionParser`, for session.update and response.create), the
conversation item parser, and a session's event dispatch. Arbitrary JSON-ish events, text and
byte junk are refused with `RealtimeError` (an `error` event naming the problem), never anything
else; valid settings and items round-trip through the JSON the server sends back. Bounded for
CI: derandomized (the same examples every run), no example database, no shrinking."""

import asyncio
import json
import string

import pytest

pytest.importorskip("fastapi")

from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from qomni import Omni
from qomni.server import create_app
from qomni.server.realtime_config import (
    DIALECTS,
    RealtimeError,
    SessionParser,
    session_json,
    vad_available,
)
from qomni.server.realtime_conversation import Item, item_from_event, item_json
from qomni.server.realtime_session import Session, _parse_event
from qomni.tiny import make_tiny

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck))

# Names the parsers read, so generated events reach their checks (not only the unknown-key path).
KEYS = ["type", "event_id", "session", "response", "item", "item_id", "previous_item_id",
        "audio", "image", "input", "output", "format", "rate", "voice", "instructions",
        "modalities", "output_modalities", "input_audio_format", "output_audio_format",
        "input_audio_sample_rate", "turn_detection", "threshold", "prefix_padding_ms",
        "silence_duration_ms", "suffix_padding_ms", "create_response", "interrupt_response",
        "max_output_tokens", "max_response_output_tokens", "max_tokens",
        "max_output_audio_frames", "max_image_frames", "temperature", "top_p", "top_k",
        "repetition_penalty", "seed", "tools", "role", "content", "text", "transcript",
        "image_url", "id", "conversation", "response_id"]
WORDS = ["session.update", "response.create", "response.cancel", "conversation.item.create",
         "conversation.item.delete", "input_audio_buffer.commit", "input_audio_buffer.clear",
         "input_image_buffer.append", "message", "user", "assistant", "system", "input_text",
         "text", "output_text", "audio", "output_audio", "input_audio", "input_image",
         "server_vad", "semantic_vad", "audio/pcm", "pcm16", "pcm", "inf", "auto", "realtime",
         "chelsie", "AAAA", "data:image/png;base64,AAAA", "root", "\ud800"]
scalars = (st.none() | st.booleans() | st.integers(-2**65, 2**65)
           | st.floats(allow_nan=False)  # json.loads reads 1e999 as inf, never as NaN
           | st.sampled_from(WORDS) | st.text(max_size=12))
json_ish = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5), max_leaves=24)
objects = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), json_ish, max_size=6)


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    tiny = make_tiny(tmp_path_factory.mktemp("fuzz_rt") / "tiny")
    return Omni.load(tiny, dtype="float32", device="cpu", progress=False)


@pytest.fixture(scope="module")
def app_state(omni):
    return create_app(omni, model_name="tiny-omni").state.qomni


@pytest.fixture(scope="module")
def parser(app_state):
    return SessionParser(app_state.omni, app_state.limits)


def refused_or(fn, *args):
    """fn(*args), or None when it refuses with RealtimeError (any other exception fails)."""
    try:
        return fn(*args)
    except RealtimeError as e:
        assert e.message and isinstance(e.code, str), e
        return None


@FUZZ
@given(st.text(max_size=64) | json_ish.map(json.dumps)
       | st.binary(max_size=64).map(lambda b: b.decode("utf-8", "surrogateescape")))
def test_event_parser_reads_json_objects_or_refuses(text):
    ev = refused_or(lambda t: asyncio.run(_parse_event(t)), text)
    assert ev is None or isinstance(ev, dict)


@FUZZ
@example(session={"output_modalities": [{}]}, dialect="openai", prefix="response")  # was a 500
@given(session=objects, dialect=st.sampled_from(DIALECTS), prefix=st.sampled_from(
    ["session", "response"]))
def test_session_parser_refuses_with_its_own_error(parser, session, dialect, prefix):
    cfg = parser.default(dialect)
    new = refused_or(parser.parse, cfg, session, dialect, prefix)
    if new is not None:  # what it accepted, it can describe
        json.dumps(session_json(new, dialect, "sess_1", "tiny-omni"))


@FUZZ
@example(item={"role": "assistant", "content": [{"type": "audio", "transcript": 5}]})  # 500
@given(item=objects | json_ish)
def test_item_parser_refuses_with_its_own_error(app_state, item):
    got = refused_or(item_from_event, item, [], 24000, app_state.media)
    assert got is None or isinstance(got, Item)


# -- round trips ------------------------------------------------------------------------------

texts = st.text(string.ascii_letters + " .,!?é日", max_size=40)


def valid_updates(parser):
    voices = sorted(parser.omni.config.talker.speaker_id)
    td = st.none() | st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["server_vad", "semantic_vad"]),
        "threshold": st.floats(0, 1), "prefix_padding_ms": st.integers(0, 5000),
        "silence_duration_ms": st.integers(0, 10000), "suffix_padding_ms": st.integers(0, 2000),
        "create_response": st.booleans(), "interrupt_response": st.booleans()})
    if not vad_available():
        td = st.none()
    return st.fixed_dictionaries({}, optional={
        "instructions": texts, "modalities": st.sampled_from([["text"], ["text", "audio"]]),
        "voice": st.sampled_from(voices), "input_audio_sample_rate": st.sampled_from(
            [16000, 24000]), "turn_detection": td,
        "max_response_output_tokens": st.integers(1, parser.limits.max_tokens),
        "max_output_audio_frames": st.none() | st.integers(1, parser.limits.max_audio_frames),
        "temperature": st.none() | st.floats(0, 2), "top_p": st.none() | st.floats(1e-9, 1),
        "top_k": st.none() | st.integers(0, 100), "seed": st.none() | st.integers(0, 2**64 - 1),
        "repetition_penalty": st.none() | st.floats(1e-9, 10)})


@FUZZ
@given(data=st.data(), dialect=st.sampled_from(DIALECTS))
def test_session_settings_round_trip(parser, data, dialect):
    """A valid session.update, then the session the server describes sent back as an update,
    describes the same session (through JSON, as on the wire)."""
    update = data.draw(valid_updates(parser))
    cfg = parser.parse(parser.default(dialect), json.loads(json.dumps(update)), dialect)
    described = session_json(cfg, dialect, "sess_1", "tiny-omni")
    again = parser.parse(parser.default(dialect), json.loads(json.dumps(described)), dialect)
    assert session_json(again, dialect, "sess_1", "tiny-omni") == described


@FUZZ
@given(role=st.sampled_from(["user", "assistant"]), parts=st.lists(texts, min_size=1, max_size=3),
       item_id=st.text(string.ascii_letters + "_", min_size=1, max_size=12), ga=st.booleans(),
       spoken=st.booleans())
def test_text_items_round_trip(app_state, role, parts, item_id, ga, spoken):
    """A text item, sent back as the server describes it, is the same item."""
    if role == "user":
        item = Item(item_id, "user", [{"type": "text", "text": t} for t in parts])
    else:
        item = Item(item_id, "assistant", text="".join(parts), output_audio=spoken)
    back = item_from_event(json.loads(json.dumps(item_json(item, ga))), [], 24000, app_state.media)
    assert (back.id, back.role, back.parts, back.text) == (item.id, item.role, item.parts,
                                                           item.text)


# -- a session's dispatch -----------------------------------------------------------------------


class Socket:
    """What a Session sends to: records the events."""

    def __init__(self):
        self.sent = []

    async def send_text(self, text):
        self.sent.append(json.loads(text))


# Events that start model work (audio into the VAD and prefill, a response) are left out: the
# parsers they use are fuzzed above, and a session that answers is the live tests' business.
SAFE_TYPES = ["session.update", "response.cancel", "conversation.item.create",
              "conversation.item.delete", "input_audio_buffer.commit",
              "input_audio_buffer.clear", "input_image_buffer.append", "response.create"]
events = st.one_of(
    st.builds(lambda t, rest: {**rest, "type": t}, st.sampled_from(SAFE_TYPES), objects),
    objects.filter(lambda ev: ev.get("type") not in ("input_audio_buffer.append",)),
    json_ish)
messages = st.one_of(
    events.map(lambda ev: {"type": "websocket.receive", "text": json.dumps(ev)}),
    st.text(max_size=40).map(lambda t: {"type": "websocket.receive", "text": t}),
    st.binary(max_size=40).map(lambda b: {"type": "websocket.receive", "bytes": b}))


@FUZZ
@given(batch=st.lists(messages, min_size=1, max_size=4))
def test_session_answers_junk_with_error_events(app_state, batch):
    """Every message is handled (an `error` event where it is wrong) and none is an internal
    error; no response is ever started by a session without a user turn."""

    async def run():
        socket = Socket()
        session = Session(socket, app_state, None)
        for msg in batch:
            n = len(socket.sent)
            await session.handle(msg)
            assert session.response is None or any(
                it.role == "user" for it in session.conversation.items)
            for ev in socket.sent[n:]:
                if ev["type"] == "error":
                    assert ev["error"]["code"] != "internal_error", ev
                    assert ev["error"]["message"], ev
            if session.response is not None:  # a user item, then response.create: stop it
                await session.cancel_response("client_cancelled")
        await session.prefill.close()

    asyncio.run(run())
