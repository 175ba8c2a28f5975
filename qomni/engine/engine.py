"""The engine: requests join and leave at step boundaries; each step runs the thinker, then the
talker stage (`talker_stage.py`: talker, code predictor, streaming vocoder), which follows the
thinker token by token through each speaking request's thinker states (`thinker_states.py`).
Rows and queues are the scheduler's (`scheduler.py`), thinker calls the runner's
(`runner.py`); this file decides what each step does with them. A request whose talker runs
elsewhere (`Request.states_out`) gets its thinker states sent there instead.

Legend: n requests in a call, S tokens, Dt thinker hidden, D talker hidden, V vocabulary.

Per step: (1) prefill, in one thinker forward of at most `max_prefill_tokens` tokens, what the
budget allows of: requests still being prefilled, waiting requests admitted into free cache
rows, and (while no request waits) prompt prefixes; a request whose prompt is then whole takes
its first token; (2) one thinker decode step for every request
still writing text, batched, and the thinker states that made speakable; (3) the talker stage:
talker prefill for speaking requests that have their first token, one talker step, batched,
for every request whose next text is known, and the vocoder chunks due; (4) retire finished
requests and free their rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from qomni.engine.config import EngineConfig
from qomni.engine.prefill import shared_tokens
from qomni.engine.request import Prefix, Request
from qomni.engine.runner import Chunk, ModelRunner
from qomni.engine.scheduler import Scheduler
from qomni.engine.speech import thinker_embeds
from qomni.engine.talker_stage import TalkerStage
from qomni.engine.thinker_states import (
    PromptStates,
    SpeechParams,
    StatesSender,
    StatesUpdate,
    ThinkerStates,
    talker_inputs,
)
from qomni.models.model import OmniModel
from qomni.multimodal.chat import PromptTooLong
from qomni.sampling import sample_rows


class Engine:
    def __init__(self, model: OmniModel, stop_ids: Sequence[int],
                 config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.model, self.cfg = model, model.cfg
        self.runner = ModelRunner(model, config)
        self.device = self.runner.device
        self.talker: TalkerStage | None = None
        if model.audio_output:
            tok = self.cfg.tokens
            with torch.inference_mode():
                specials = thinker_embeds(model, (tok.tts_pad, tok.tts_bos, tok.tts_eos))
            self.talker = TalkerStage(self.cfg, model.talker, model.code2wav, specials, config)
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
            if req.talks:
                if self.talker is None:
                    raise ValueError("speech output is not loaded")
                self.talker.prepare(req.speech, req.inputs)
                req.states = ThinkerStates()
            req.sender = StatesSender()
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
        if self.talker is not None:
            self.talker.step([r for r in self.running if r.talks])
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
            if owner.speaks:
                self._send_prompt_states(owner)
            owner.prompt = owner.captured = None
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
        self._send_token_states([r for r in reqs if r.speaks])

    # -- thinker states -------------------------------------------------------------------------

    def _send_prompt_states(self, req: Request) -> None:
        sp = req.speech
        params = SpeechParams(sp.speaker_id, sp.sampler.params[0], sp.code_sampler.params[0],
                              sp.max_frames)
        req.send_states(StatesUpdate(PromptStates(talker_inputs(req.inputs), req.prompt.embeds,
                                                  req.captured, params)))

    def _send_token_states(self, reqs: list[Request]) -> None:
        """The tokens that became speakable, with their input embeddings (one lookup for all)."""
        updates = [(r, u) for r in reqs if (u := r.sender.update(r.speech_text())) is not None]
        ids = [t for _, u in updates for t in u.tokens if t >= 0]  # -1: a stop string's mark
        if ids:
            embeds = self.model.thinker.embed(torch.tensor(ids, device=self.device))
        at = 0
        for req, update in updates:
            n = sum(t >= 0 for t in update.tokens)
            if n:
                update.embeds, at = embeds[at: at + n], at + n
            req.send_states(update)

    # -- bookkeeping ----------------------------------------------------------------------------

    def _complete(self, req: Request) -> bool:
        return req.thinker_done and (not req.talks or self.talker.finished(req))

    def _release(self, req: Request, reason: str) -> None:
        self.sched.release(req)
        if req.speech is not None:
            req.speech.done = True
        req.finished = True
        req.prompt = req.captured = None
        if reason != "error":
            req.emit_finished(reason)

