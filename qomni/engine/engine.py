"""The engine: requests join and leave at step boundaries; each step runs the thinker, the
talker (following the thinker token by token), the code predictor and the streaming vocoder.

Legend: R rows (max_num_seqs), S tokens, D hidden, G codebooks, V vocabulary.

Per step: (1) admit waiting requests into free cache rows and prefill them (their first token);
(2) one thinker decode step for every request still writing text, batched; (3) talker prefill for
speaking requests that have their first token, then one talker step, batched, for every request
whose next text is known — code predictor for all their frames at once; (4) vocode pending
frames in chunks (a small first chunk for latency, growing ones after; requests in step share
one batched decode); (5) retire finished requests and free their rows. Rows are reused: the
caches are allocated once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import torch

from qomni.engine.generate import embed_batch
from qomni.engine.request import Prefix, Request
from qomni.engine.speech import build_talker_prompt, special_embeds, trailing_token
from qomni.models.code2wav_stream import StreamingCode2Wav, push_together
from qomni.models.omni import OmniModel
from qomni.models.rope import decode_positions
from qomni.models.thinker import Deepstack
from qomni.multimodal.chat import PromptTooLong
from qomni.multimodal.processor import ProcessedInputs
from qomni.sampling import Sampler


class Engine:
    def __init__(self, model: OmniModel, stop_ids: Sequence[int], *, max_num_seqs: int = 8,
                 max_model_len: int = 4096, max_talker_len: int = 4096 + 512,
                 first_chunk_frames: int = 1, chunk_frames: int = 25,
                 audio_cache_windows: int = 64):
        self.model, self.cfg = model, model.cfg
        # A conversation's audio is embedded once, not again at every turn and every prefix.
        model.thinker.audio_tower.cache_windows(audio_cache_windows)
        self.device = model.thinker.lm_head.weight.device
        self.stop = torch.tensor(sorted(stop_ids), device=self.device)
        self.max_model_len = max_model_len
        self.first_chunk, self.chunk = first_chunk_frames, chunk_frames
        self.cache = model.thinker.model.new_cache(max_num_seqs, max_model_len)
        self.free_rows = list(range(max_num_seqs))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Called between the phases of a step, when requests may have new events to deliver.
        self.on_events: Callable[[], None] = lambda: None
        self.prefixes: list[Prefix] = []  # waiting for a row, or prefilled and holding one
        self.prefix_hits = 0  # requests that continued a prefix
        self.cached_tokens = 0  # prompt tokens those requests took from their prefixes
        if model.audio_output:
            self.talker_cache = model.talker.new_cache(max_num_seqs, max_talker_len)
            self.max_talker_len = max_talker_len
            self.free_talker_rows = list(range(max_num_seqs))
            tok = self.cfg.tokens
            with torch.inference_mode():
                self.tts_pad, self.tts_eos = special_embeds(model, (tok.tts_pad, tok.tts_eos))

    # -- requests -------------------------------------------------------------------------------

    def add(self, req: Request) -> None:
        n = len(req.inputs)
        if n >= self.max_model_len:
            raise PromptTooLong(n, self.max_model_len)
        req.max_new_tokens = max(1, min(req.max_new_tokens, self.max_model_len - n))
        if req.speech is not None:
            if not self.model.audio_output:
                raise ValueError("speech output is not loaded")
            room = self.max_talker_len - n - 9
            if room < 1:
                raise ValueError(f"the prompt has {n} tokens, too many for the talker cache "
                                 f"({self.max_talker_len})")
            req.speech.max_frames = min(req.speech.max_frames, room)
        self.waiting.append(req)

    def abort(self, req: Request) -> None:
        if req in self.waiting:
            self.waiting.remove(req)
        if not req.finished:
            req.finish_reason = req.finish_reason or "abort"
            self._release(req, "abort")

    def add_prefix(self, prefix: Prefix) -> None:
        n = len(prefix.inputs)
        if not 0 < n < self.max_model_len:
            raise ValueError(f"a prefix of {n} tokens does not fit max_model_len "
                             f"{self.max_model_len}")
        # A base not prefilled yet has nothing to continue: continue the prefilled one it
        # replaces, if any (the prefixes between are of no use any more).
        while prefix.base is not None and not prefix.base.ready:
            stale = prefix.base
            prefix.base, stale.base = stale.base, None
            self.release_prefix(stale)
        self.prefixes.append(prefix)

    def release_prefix(self, prefix: Prefix) -> None:
        """Free what a prefix holds (nothing once a request took it over), and the earlier
        prefix it was to replace: that one is closed either way."""
        base, prefix.base = prefix.base, None
        if base is not None:
            self.release_prefix(base)
        if prefix in self.prefixes:
            self.prefixes.remove(prefix)
        if prefix.row is not None and not prefix.closed:
            self.free_rows.append(prefix.row)
        prefix.row, prefix.closed, prefix.ready = None, True, False
        prefix.embeds = prefix.captured = None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running
                    or any(self._can_prefill(p) for p in self.prefixes))

    def _can_prefill(self, p: Prefix) -> bool:
        """A prefix waits for a free row, unless it may continue its base's."""
        base = p.base
        return not p.ready and bool(self.free_rows or (base is not None and base.ready
                                                      and not base.closed))

    # -- one step -------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        self._admit()
        self.on_events()  # first tokens go out now, not after the talker's share of the step
        self._decode()
        self.on_events()
        if self.model.audio_output:
            self._talk()
            self._vocode()
        for req in [r for r in self.running if self._complete(r)]:
            self._release(req, req.finish_reason)

    def _admit(self) -> None:
        # Requests come first: a prefix still waiting gives way, and prefilled ones give their
        # rows back when requests wait for rows (a request never waits on a prefix).
        while self.waiting and not self.free_rows:
            idle = [p for p in self.prefixes if p.row is not None
                    and all(r.prefix is not p for r in self.waiting)]
            if not idle:
                break
            self.release_prefix(idle[0])
        self._admit_requests()
        for prefix in [p for p in self.prefixes if not p.ready]:
            if self.waiting:
                break
            if not self._can_prefill(prefix):
                continue
            try:
                self._prefill_prefix(prefix)
            except Exception:  # noqa: BLE001 - a prefix is an optimisation: drop it
                self.release_prefix(prefix)

    def _prefill_prefix(self, prefix: Prefix) -> None:
        """Prefill a prefix into a row; one that replaces an earlier, prefilled prefix (the same
        turn with more of its audio) takes that one's row and keeps what they share."""
        thinker = self.model.thinker
        embeds, pos, _, lengths, deepstack = embed_batch(thinker, [prefix.inputs], self.device)
        base, prefix.base = prefix.base, None
        n, held = 0, None
        if base is not None and base.ready and not base.closed:
            n = _common(base, prefix.inputs, embeds[0], prefix.capture)
            if n:  # the base's row is this prefix's now
                prefix.row, base.row, held = base.row, None, base.captured
        if base is not None:
            self.release_prefix(base)  # frees its row unless taken over just above
        if prefix.row is None:
            prefix.row = self.free_rows.pop(0)
        capture = self.cfg.talker.accept_hidden_layer if prefix.capture else None
        captured = self._extend(prefix.row, n, embeds, pos, lengths, deepstack, capture,
                                held)[1]
        prefix.continued = n
        prefix.embeds = embeds[0]
        prefix.captured = captured[0] if captured is not None else None
        prefix.ready = True

    def _admit_requests(self) -> None:
        while self.waiting:
            req = self.waiting[0]
            p = req.prefix
            if p is not None and not p.ready and p.base is not None and p.base.ready:
                # Its newest prefix is not prefilled yet; the one that it replaces is.
                req.prefix, p.base = p.base, None
                self.release_prefix(p)
            if not (self.free_rows or self._prefix_row(req)):
                return
            if req.speech is not None and not self.free_talker_rows:
                return
            self.waiting.popleft()
            if self._prefix_row(req):
                req.row = req.prefix.row  # the prefix's row, continued or reset by _prefill
                self.prefixes.remove(req.prefix)
                req.prefix.closed = True
            else:
                req.row = self.free_rows.pop(0)
                if req.prefix is not None:  # not prefilled yet: no use any more
                    self.release_prefix(req.prefix)
            if req.speech is not None:
                req.speech.row = self.free_talker_rows.pop(0)
            self.running.append(req)
            try:
                self._prefill(req)
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                self._release(req, "error")
                req.events.append(e)

    def _prefix_row(self, req: Request) -> bool:
        p = req.prefix
        return p is not None and p.ready and p.row is not None and not p.closed

    def _prefill(self, req: Request) -> None:
        thinker = self.model.thinker
        embeds, pos, _, lengths, deepstack = embed_batch(thinker, [req.inputs], self.device)
        capture = self.cfg.talker.accept_hidden_layer if req.speech else None
        p = req.prefix
        n = 0
        if p is not None and p.row is not None and p.row == req.row and p.embeds is not None:
            n = _common(p, req.inputs, embeds[0], req.speech is not None)
        if n:  # the row holds the first n tokens: prefill only the rest
            req.cached_tokens = n
            self.prefix_hits += 1
            self.cached_tokens += n
        hidden, captured = self._extend(req.row, n, embeds, pos, lengths, deepstack, capture,
                                        p.captured if n else None)
        if p is not None:
            p.embeds = p.captured = None
            p.row = None
        if req.speech is not None:
            req.embeds, req.captured = embeds[0], captured[0]
        if req.sampler.uses_penalty:  # the reference penalises prompt tokens too
            req.seen = torch.zeros(self.cfg.thinker.text.vocab_size, dtype=torch.bool,
                                   device=self.device)
            req.seen[req.inputs.input_ids.to(self.device)] = True
        if req.sampler.uses_counts:  # frequency / presence penalties: generated tokens only
            req.counts = torch.zeros(self.cfg.thinker.text.vocab_size, device=self.device)
        self._accept([req], thinker.logits(hidden[:, -1]))

    def _extend(self, row: int, n: int, embeds: torch.Tensor, pos: torch.Tensor,
                lengths: torch.Tensor, deepstack: Deepstack | None, capture: int | None,
                held: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prefill one prompt [1, S] into `row`, whose cache holds its first n tokens (maybe more,
        which are dropped; `held` [>= n, D]: their captured hidden states); n = 0 starts the row
        afresh. Returns the hidden states of the new tokens and the captured states of all S."""
        thinker = self.model.thinker
        self.cache.reset([row], n)
        if n and deepstack is not None:
            seen = int(deepstack.mask[0, :n].sum())
            deepstack = Deepstack(deepstack.mask[:, n:], [f[seen:] for f in deepstack.features])
        hidden, captured = thinker(embeds[:, n:], pos[:, :, n:], self.cache.rows([row]),
                                   lengths - n, deepstack, capture)
        if n and captured is not None:
            captured = torch.cat([held[None, :n], captured], dim=1)
        return hidden, captured

    def _decode(self) -> None:
        reqs = [r for r in self.running if r.tokens and not r.thinker_done]
        if not reqs:
            return
        rows = [r.row for r in reqs]
        view = self.cache.rows(rows)
        delta = torch.tensor([r.inputs.rope_delta for r in reqs], device=self.device)
        pos = decode_positions(view.lengths, delta)
        last = torch.tensor([r.tokens[-1] for r in reqs], device=self.device)[:, None]
        thinker = self.model.thinker
        hidden, _ = thinker(thinker.embed(last), pos, view,
                            torch.ones(len(reqs), dtype=torch.long, device=self.device))
        self._accept(reqs, thinker.logits(hidden[:, 0]))

    def _accept(self, reqs: list[Request], logits: torch.Tensor) -> None:
        """Sample each request's next token from logits [n, V] and record it."""
        early = [i for i, r in enumerate(reqs) if len(r.tokens) < r.params.min_tokens]
        if early:  # min_tokens: no stop token yet
            logits = logits.clone()
            logits[torch.tensor(early, device=logits.device)[:, None], self.stop] = float("-inf")
        tokens = sample_rows(logits, [r.sampler for r in reqs], [r.seen for r in reqs],
                             [r.counts for r in reqs])
        stops = torch.isin(tokens, self.stop).tolist()
        for req, tok, stop in zip(reqs, tokens.tolist(), stops):
            if req.seen is not None:
                req.seen[tok] = True
            if req.counts is not None:
                req.counts[tok] += 1
            stop = stop and not req.params.ignore_eos
            stop = req.emit_token(tok, stop) or stop  # a stop token, or a stop string
            if stop or len(req.tokens) >= req.max_new_tokens:
                req.finish_reason = "stop" if stop else "length"
                req.emit_text_end()
                self._free_thinker_row(req)  # the talker never reads the thinker cache

    # -- speech ---------------------------------------------------------------------------------

    def _talk(self) -> None:
        talker = self.model.talker
        new = [r for r in self.running
               if r.speech and r.speech.hidden is None and not r.speech.done
               and r.speech_text()[0]]
        for req in new:
            tokens, done = req.speech_text()
            if done and len(tokens) == 1 and (req.finish_reason == "stop"
                                              or req.speech_end is not None):
                req.speech.done = True  # an empty answer: nothing to say
            else:
                self._talker_prefill(req)
        ready = []
        for req in self.running:
            sp = req.speech
            if sp is None or sp.done or sp.hidden is None or req in new:
                continue
            text = trailing_token(*req.speech_text(), sp.frames)
            if text is not None:
                ready.append((req, text))
        if not ready:
            return
        reqs = [r for r, _ in ready]
        hidden = torch.stack([r.speech.hidden for r in reqs])
        code0 = torch.stack([r.speech.code0 for r in reqs])
        samplers = [r.speech.code_sampler for r in reqs]
        codes, codec_next = talker.predict_residuals(
            hidden, code0, lambda logits: sample_rows(logits, samplers, [None] * len(samplers)))
        go = []
        for i, req in enumerate(reqs):
            sp = req.speech
            sp.pending.append(codes[i])
            sp.codes.append(codes[i])
            sp.frames += 1
            sp.seen[code0[i]] = True
            if sp.frames >= sp.max_frames:
                sp.done = True
            else:
                go.append(i)
        if not go:
            return
        text = torch.stack([self._text_embed(ready[i][1]) for i in go])
        step_reqs = [reqs[i] for i in go]
        view = self.talker_cache.rows([r.speech.row for r in step_reqs])
        delta = torch.tensor([r.speech.rope_delta for r in step_reqs], device=self.device)
        pos = decode_positions(view.lengths, delta)
        out = talker((codec_next[go] + text)[:, None], pos, view,
                     torch.ones(len(go), dtype=torch.long, device=self.device))
        self._choose_code0(step_reqs, out[:, 0])

    def _talker_prefill(self, req: Request) -> None:
        sp = req.speech
        prompt = build_talker_prompt(self.model, req.inputs, req.embeds, req.captured,
                                     req.tokens[0], sp.speaker_id)
        req.embeds = req.captured = None
        self.talker_cache.reset([sp.row])
        sp.rope_delta = prompt.rope_delta
        sp.seen = torch.zeros(self.cfg.talker.text.vocab_size, dtype=torch.bool,
                              device=self.device)
        n = prompt.embeds.shape[0]
        hidden = self.model.talker(prompt.embeds[None], prompt.positions[:, None],
                                   self.talker_cache.rows([sp.row]),
                                   torch.tensor([n], device=self.device))
        self._choose_code0([req], hidden[:, -1])

    def _choose_code0(self, reqs: list[Request], hidden: torch.Tensor) -> None:
        logits = self.model.talker.code0_logits(hidden)
        eos = self.cfg.talker.codec_eos_token_id
        early = [i for i, r in enumerate(reqs) if r.speech.sampler.params[0].ignore_eos
                 or r.speech.frames < r.speech.sampler.params[0].min_tokens]
        if early:  # speech that must go on: EOS is never a frame
            logits[torch.tensor(early, device=logits.device), eos] = float("-inf")
        code0 = sample_rows(logits, [r.speech.sampler for r in reqs],
                            [r.speech.seen for r in reqs])
        for i, req in enumerate(reqs):
            sp = req.speech
            sp.hidden, sp.code0 = hidden[i], code0[i]
            if int(code0[i]) == eos:
                sp.done = True

    def _text_embed(self, text: int | str) -> torch.Tensor:
        if text == "eos":
            return self.tts_eos
        if text == "pad":
            return self.tts_pad
        ids = torch.tensor([text], device=self.device)
        return self.model.talker.text_projection(self.model.thinker.embed(ids))[0]

    def _vocode(self) -> None:
        """Vocode each request's pending frames once a chunk is due. Chunks grow: the first has
        `first_chunk` frames (latency), then each is as long as all audio sent before it, up to
        `chunk` frames, so playback never waits on a chunk longer than the audio it has queued.
        Requests standing at the same frame with equal chunks share one batched decode."""
        groups: dict[tuple[int, int], list[Request]] = {}
        for req in self.running:
            sp = req.speech
            if sp is None or not sp.pending:
                continue
            if sp.vocoder is None:
                sp.vocoder = StreamingCode2Wav(self.model.code2wav)
            done = sp.vocoder.frames
            need = self.first_chunk if done == 0 else min(self.chunk, max(self.first_chunk, done))
            if len(sp.pending) >= need or sp.done:
                groups.setdefault((done, len(sp.pending)), []).append(req)
        sample_rate = self.cfg.code2wav.sample_rate
        for reqs in groups.values():
            codes = torch.stack([torch.stack(r.speech.pending, dim=1) for r in reqs])
            pcms = push_together([r.speech.vocoder for r in reqs], codes)
            for req, pcm in zip(reqs, pcms):
                req.speech.pending.clear()
                req.emit_audio(pcm, sample_rate)

    # -- bookkeeping ----------------------------------------------------------------------------

    def _complete(self, req: Request) -> bool:
        sp = req.speech
        return req.thinker_done and (sp is None or (sp.done and not sp.pending))

    def _free_thinker_row(self, req: Request) -> None:
        if req.row is not None:
            self.free_rows.append(req.row)
            req.row = None

    def _release(self, req: Request, reason: str) -> None:
        self._free_thinker_row(req)
        if req.speech is not None and req.speech.row is not None:
            self.free_talker_rows.append(req.speech.row)
            req.speech.row = None
            req.speech.done = True
        req.finished = True
        req.embeds = req.captured = None
        if req in self.running:
            self.running.remove(req)
        if reason != "error":
            req.emit_finished(reason)


def sample_rows(logits: torch.Tensor, samplers: Sequence[Sampler],
                seen: Sequence[torch.Tensor | None],
                counts: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Each row with its own request's sampler (own settings and generator): [n, V] -> [n].
    seen / counts: each row's context tokens / generated-token counts, or None."""
    if all(s.all_greedy and not s.uses_penalty and not s.uses_counts for s in samplers):
        return logits.argmax(-1)
    counts = counts or [None] * len(samplers)

    def row(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[None]

    return torch.cat([s(logits[i: i + 1], row(seen[i]), row(counts[i]))
                      for i, s in enumerate(samplers)])


def _common(p: Prefix, inputs: ProcessedInputs, embeds: torch.Tensor, capture: bool) -> int:
    """How many first tokens of a prompt a prefilled prefix already holds: those it shares with
    the prompt's start (same ids, positions and input embeddings, media included), leaving at
    least one token to prefill. The cache entries of a token depend on the tokens before it
    only, so these are exactly what prefilling the prompt would write."""
    n = min(len(p.inputs), len(inputs) - 1)
    if n <= 0 or (capture and p.captured is None):
        return 0
    same = ((inputs.input_ids[:n] == p.inputs.input_ids[:n])
            & (inputs.positions[:, :n] == p.inputs.positions[:, :n]).all(0))
    same = same.to(embeds.device) & (embeds[:n] == p.embeds[:n]).all(-1)
    return int(same.long().cumprod(0).sum())
