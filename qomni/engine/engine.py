"""The engine: requests join and leave at step boundaries; each step runs the thinker, the
talker (following the thinker token by token), the code predictor and the streaming vocoder.
Rows and queues are the scheduler's (`scheduler.py`), model calls the runner's (`runner.py`);
this file decides what each step does with them.

Legend: n requests in a call, S tokens, Dt thinker hidden, D talker hidden, V vocabulary.

Per step: (1) prefill, in one thinker forward of at most `max_prefill_tokens` tokens, what the
budget allows of: requests still being prefilled, waiting requests admitted into free cache
rows, and (while no request waits) prompt prefixes; a request whose prompt is then whole takes
its first token; (2) one thinker decode step for every request
still writing text, batched; (3) talker prefill for speaking requests that have their first
token, then one talker step, batched, for every request whose next text is known — code
predictor for all their frames at once; (4) vocode pending frames in chunks (a small first chunk
for latency, growing ones after; requests in step share one batched decode); (5) retire
finished requests and free their rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from qomni.engine.config import EngineConfig
from qomni.engine.prefill import shared_tokens
from qomni.engine.request import Prefix, Request
from qomni.engine.runner import Chunk, ModelRunner
from qomni.engine.scheduler import Scheduler
from qomni.engine.speech import (
    ASSISTANT_POSITIONS,
    Trailing,
    assistant_header,
    talker_prompt_ready,
    trailing_text,
)
from qomni.models.model import OmniModel
from qomni.multimodal.chat import PromptTooLong
from qomni.sampling import Sampler


class Engine:
    def __init__(self, model: OmniModel, stop_ids: Sequence[int],
                 config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.model, self.cfg = model, model.cfg
        self.runner = ModelRunner(model, config)
        self.device = self.runner.device
        self.sched = Scheduler(config.max_num_seqs,
                               config.max_num_seqs if model.audio_output else 0)
        self.stop = torch.tensor(sorted(stop_ids), device=self.device)
        # Called between the phases of a step, when requests may have new events to deliver.
        self.on_events: Callable[[], None] = lambda: None
        self.prefix_hits = 0  # requests that continued a prefix
        self.cached_tokens = 0  # prompt tokens those requests took from their prefixes

    # The scheduler's state, as the loop and the tests read it.
    waiting = property(lambda self: self.sched.waiting)
    running = property(lambda self: self.sched.running)
    prefixes = property(lambda self: self.sched.prefixes)

    def occupancy(self) -> dict[str, int]:
        """What the engine holds now: requests waiting and running, prompt prefixes, and cache
        rows in use (requests' and prefixes'), for /metrics. Read from another thread: a
        snapshot, each count exact when it was read."""
        sched, rows = self.sched, self.config.max_num_seqs
        return {"waiting": len(sched.waiting), "running": len(sched.running),
                "prefixes": len(sched.prefixes), "rows_in_use": rows - len(sched.free_rows)}
    free_rows = property(lambda self: self.sched.free_rows)
    free_talker_rows = property(lambda self: self.sched.free_talker_rows)
    cache = property(lambda self: self.runner.cache)

    # -- requests -------------------------------------------------------------------------------

    def add(self, req: Request) -> None:
        n, limit = len(req.inputs), self.config.max_model_len
        if n >= limit:
            raise PromptTooLong(n, limit)
        req.max_new_tokens = max(1, min(req.max_new_tokens, limit - n))
        if req.speech is not None:
            if not self.model.audio_output:
                raise ValueError("speech output is not loaded")
            room = self.config.talker_len - n - ASSISTANT_POSITIONS
            if room < 1:
                raise ValueError(f"the prompt has {n} tokens, too many for the talker cache "
                                 f"({self.config.talker_len}, max_talker_len)")
            req.speech.max_frames = min(req.speech.max_frames, room)
            req.speech.header = assistant_header(req.inputs.input_ids, self.cfg.tokens)
        self.sched.add(req)

    def abort(self, req: Request) -> None:
        if not req.finished:
            req.finish_reason = req.finish_reason or "abort"
            self._release(req, "abort")

    def add_prefix(self, prefix: Prefix) -> None:
        n = len(prefix.inputs)
        if not 0 < n < self.config.max_model_len:
            raise ValueError(f"a prefix of {n} tokens does not fit max_model_len "
                             f"{self.config.max_model_len}")
        self.sched.add_prefix(prefix)

    def release_prefix(self, prefix: Prefix) -> None:
        """Free what a prefix holds (nothing once a request took it over)."""
        self.sched.release_prefix(prefix)

    def has_work(self) -> bool:
        return self.sched.has_work()

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
        """Prefill, in one forward and up to `max_prefill_tokens` tokens: the requests still
        being prefilled, then newly admitted ones, then (while no request waits) prefixes.
        A prompt longer than what is left goes on at the next step."""
        budget = self.config.max_prefill_tokens
        owners: list[Request | Prefix] = []
        chunks: list[Chunk] = []

        def take(owner: Request | Prefix, capture: bool) -> None:
            nonlocal budget
            end = min(len(owner.prompt), owner.prefilled + budget)
            owners.append(owner)
            chunks.append(Chunk(owner.row, owner.prompt, owner.prefilled, end, capture))
            budget -= end - owner.prefilled

        for req in self.running:
            if budget and req.prompt is not None and req.prefilled < len(req.prompt):
                take(req, req.speaks)
        while budget and (admitted := self.sched.admit(1)):
            req = admitted[0]
            try:
                self._start(req)
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                self._release(req, "error")
                req.events.append(e)
                continue
            take(req, req.speaks)
        started: list[Prefix] = []
        while budget and (prefix := self.sched.next_prefix(started)) is not None:
            started.append(prefix)
            try:
                if prefix.prompt is None:
                    self._start_prefix(prefix)
            except Exception:  # noqa: BLE001 - a prefix is an optimisation: drop it
                self.sched.release_prefix(prefix)
                continue
            take(prefix, prefix.capture)
        if chunks:
            self._prefill(owners, chunks)

    def _start(self, req: Request) -> None:
        """Embed an admitted request's prompt; when its row holds its prefix, keep the tokens
        they share and prefill only the rest."""
        req.prompt = prompt = self.runner.embed(req.inputs)
        p, n = req.prefix, 0
        if (p is not None and p.row == req.row and p.embeds is not None
                and (p.captured is not None or not req.speaks)):
            n = shared_tokens(prompt, req.inputs, p.inputs, p.embeds)
        if n:
            req.cached_tokens = n
            self.prefix_hits += 1
            self.cached_tokens += n
            if req.speaks:
                req.captured = p.captured[:n]
        if p is not None:  # its row is the request's now, or was released
            p.row = None
            p.free()
        req.prefilled = n

    def _start_prefix(self, prefix: Prefix) -> None:
        """Embed a prefix and give it a row; one that replaces an earlier, prefilled prefix
        (the same turn with more of its audio) takes that one's row and keeps what they
        share."""
        prompt = self.runner.embed(prefix.inputs)
        base, n = self.sched.continuable_base(prefix), 0
        if base is not None and (base.captured is not None or not prefix.capture):
            n = shared_tokens(prompt, prefix.inputs, base.inputs, base.embeds)
        held = base.captured[:n] if n and prefix.capture else None
        self.sched.place_prefix(prefix, keep_base=n > 0)
        prefix.prompt, prefix.prefilled, prefix.continued, prefix.captured = prompt, n, n, held

    def _prefill(self, owners: list[Request | Prefix], chunks: list[Chunk]) -> None:
        """Prefill the chunks; requests whose prompt is then whole take their first token,
        prefixes are then ready. If the forward fails, the requests in it fail."""
        try:
            last, captured = self.runner.prefill(chunks)
        except Exception as e:  # noqa: BLE001 - these requests fail, the others go on
            for owner in owners:
                if isinstance(owner, Prefix):
                    self.sched.release_prefix(owner)
                else:
                    self._release(owner, "error")
                    owner.events.append(e)
            return
        done, rows = [], []
        for i, (owner, chunk, cap) in enumerate(zip(owners, chunks, captured)):
            owner.prefilled = chunk.end
            if cap is not None:  # the talker prompt reads these states (and the embeddings)
                owner.captured = cap if owner.captured is None else torch.cat([owner.captured,
                                                                               cap])
            if chunk.end < len(chunk.prompt):
                continue
            if isinstance(owner, Prefix):
                owner.embeds, owner.prompt, owner.ready = chunk.prompt.embeds, None, True
                continue
            if not owner.speaks:
                owner.prompt = None
            self._start_sampling(owner)
            done.append(owner)
            rows.append(i)
        if done:
            self._accept(done, self.runner.logits(last[rows]))

    def _start_sampling(self, req: Request) -> None:
        vocab = self.cfg.thinker.text.vocab_size
        if req.sampler.uses_penalty:  # the reference penalises prompt tokens too
            req.seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            req.seen[req.inputs.input_ids.to(self.device)] = True
        if req.sampler.uses_counts:  # frequency / presence penalties: generated tokens only
            req.counts = torch.zeros(vocab, device=self.device)

    def _decode(self) -> None:
        reqs = [r for r in self.running if r.tokens and not r.thinker_done]
        if reqs:
            logits = self.runner.decode([r.row for r in reqs], [r.tokens[-1] for r in reqs],
                                        [r.inputs.rope_delta for r in reqs])
            self._accept(reqs, logits)

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
                self.sched.free_row(req)  # the talker never reads the thinker cache

    # -- speech ---------------------------------------------------------------------------------

    def _talk(self) -> None:
        new = [r for r in self.running
               if r.speech and r.speech.hidden is None and not r.speech.done and r.tokens]
        for req in new:
            ready = talker_prompt_ready(req.speech.header, req.speech_text())
            if ready is False:
                req.speech.done = True  # an empty answer: nothing to say
            elif ready:
                self._talker_prefill(req)
        ready = []
        for req in self.running:
            sp = req.speech
            if sp is None or sp.done or sp.hidden is None or req in new:
                continue
            text = trailing_text(sp.header, req.speech_text(), sp.frames)
            if text is not None:
                ready.append((req, text))
        if not ready:
            return
        reqs = [r for r, _ in ready]
        go = [i for i, r in enumerate(reqs) if r.speech.frames + 1 < r.speech.max_frames]
        samplers = [r.speech.code_sampler for r in reqs]
        text = torch.stack([self._trailing_embed(*ready[i]) for i in go]) if go else None
        code0 = torch.stack([r.speech.code0 for r in reqs])
        codes, hidden, logits = self.runner.speak(
            torch.stack([r.speech.hidden for r in reqs]), code0, samplers,
            lambda logits: sample_rows(logits, samplers, [None] * len(samplers)),
            [r.speech.frames for r in reqs], go, [reqs[i].talker_row for i in go], text,
            [reqs[i].speech.rope_delta for i in go])
        for i, req in enumerate(reqs):
            sp = req.speech
            sp.pending.append(codes[i])
            sp.codes.append(codes[i])
            sp.frames += 1
            sp.seen[code0[i]] = True
            if sp.frames >= sp.max_frames:
                sp.done = True
        if go:
            self._choose_code0([reqs[i] for i in go], hidden, logits)

    def _talker_prefill(self, req: Request) -> None:
        sp = req.speech
        prompt = self.runner.talker_prompt(req.inputs, req.prompt.embeds, req.captured,
                                           req.tokens, sp.speaker_id)
        req.prompt = req.captured = None
        sp.rope_delta, sp.tail = prompt.rope_delta, prompt.tail
        sp.seen = torch.zeros(self.cfg.talker.text.vocab_size, dtype=torch.bool,
                              device=self.runner.talker_device)
        hidden = self.runner.talker_prefill(req.talker_row, prompt)
        self._choose_code0([req], hidden, self.runner.code0_logits(hidden))

    def _choose_code0(self, reqs: list[Request], hidden: torch.Tensor,
                      logits: torch.Tensor) -> None:
        """Sample codebook 0 of each request's next frame from logits [n, V] (of hidden
        [n, D])."""
        eos = self.cfg.talker.codec_eos_token_id
        params = [r.speech.sampler.params[0] for r in reqs]
        early = [i for i, (r, p) in enumerate(zip(reqs, params))
                 if p.ignore_eos or r.speech.frames < p.min_tokens]
        if early:  # speech that must go on: EOS is never a frame
            logits[torch.tensor(early, device=logits.device), eos] = float("-inf")
        code0 = sample_rows(logits, [r.speech.sampler for r in reqs],
                            [r.speech.seen for r in reqs])
        for i, req in enumerate(reqs):
            sp = req.speech
            sp.hidden, sp.code0 = hidden[i], code0[i]
            if int(code0[i]) == eos:
                sp.done = True

    def _trailing_embed(self, req: Request, text: int | Trailing) -> torch.Tensor:
        """Trailing text [D]: an entry of the assistant segment, tts_eos or tts_pad."""
        if isinstance(text, Trailing):
            return self.runner.trailing[text]
        header = req.speech.header
        if text < header:  # a prompt token after the first four of the segment
            return req.speech.tail[text - 4]
        return self.runner.text_embed(req.tokens[text - header])

    def _vocode(self) -> None:
        """Vocode each request's pending frames once a chunk is due. Chunks grow: the first has
        `first_chunk_frames` frames (latency), then each is as long as all audio sent before it,
        up to `chunk_frames`, so playback never waits on a chunk longer than the audio it has
        queued. Requests standing at the same frame with equal chunks share one decode."""
        first, most = self.config.first_chunk_frames, self.config.chunk_frames
        groups: dict[tuple[int, int], list[Request]] = {}
        for req in self.running:
            sp = req.speech
            if sp is None or not sp.pending:
                continue
            if sp.vocoder is None:
                sp.vocoder = self.runner.new_vocoder(req.talker_row)
            done = sp.vocoder.frames
            need = first if done == 0 else min(most, max(first, done))
            if len(sp.pending) >= need or sp.done:
                groups.setdefault((done, len(sp.pending)), []).append(req)
        sample_rate = self.cfg.code2wav.sample_rate
        for reqs in groups.values():
            codes = torch.stack([torch.stack(r.speech.pending, dim=1) for r in reqs])
            pcms = self.runner.vocode([r.speech.vocoder for r in reqs], codes)
            for req, pcm in zip(reqs, pcms):
                req.speech.pending.clear()
                req.emit_audio(pcm, sample_rate)

    # -- bookkeeping ----------------------------------------------------------------------------

    def _complete(self, req: Request) -> bool:
        sp = req.speech
        return req.thinker_done and (sp is None or (sp.done and not sp.pending))

    def _release(self, req: Request, reason: str) -> None:
        self.sched.release(req)
        if req.speech is not None:
            req.speech.done = True
        req.finished = True
        req.prompt = req.captured = None
        if reason != "error":
            req.emit_finished(reason)


def sample_rows(logits: torch.Tensor, samplers: Sequence[Sampler],
                seen: Sequence[torch.Tensor | None],
                counts: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Each row with its own request's sampler (own settings and generator): [n, V] -> [n].
    seen / counts: each row's context tokens / generated-token counts, or None."""
    if all(s.all_greedy and not s.uses_penalty and not s.uses_counts for s in samplers):
        return logits.float().argmax(-1)  # bf16 argmax runs 5x slower than fp32 on CPU
    counts = counts or [None] * len(samplers)

    def row(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[None]

    return torch.cat([s(logits[i: i + 1], row(seen[i]), row(counts[i]))
                      for i, s in enumerate(samplers)])
