// qomni web demo: a chat page for the server's OpenAI API (POST v1/chat/completions, SSE).
// Plain browser JavaScript: no build step, no libraries, nothing loaded from outside this server.
// Media goes to the server inline as data URIs (image_url / audio_url / video_url parts); the
// microphone is recorded with WebAudio and sent as a 16 kHz WAV `input_audio` part. Spoken replies
// arrive as base64 PCM16 24 kHz chunks in `delta.audio.data` and are played back to back.
"use strict";

(() => {
  const VOICES = ["Ethan", "Chelsie", "Aiden"]; // the voices of the Qwen3-Omni checkpoints
  const PCM_RATE = 24000; // streamed speech: PCM16 mono at 24 kHz
  const MIC_RATE = 16000; // what the audio encoder consumes
  const LEAD_S = 0.08; // head start for the first chunk (and after an underrun)
  const store = {
    get: (k, d) => { try { return localStorage.getItem("qomni." + k) ?? d; } catch { return d; } },
    set: (k, v) => { try { localStorage.setItem("qomni." + k, v); } catch { /* private mode */ } },
  };

  const $ = (id) => document.getElementById(id);
  const el = {
    log: $("log"), empty: $("empty"), model: $("model"), voice: $("voice"), speak: $("speak"),
    maxTokens: $("max-tokens"), apiKey: $("api-key"), clear: $("clear"), error: $("error"),
    errorText: $("error-text"), errorClose: $("error-close"), attachments: $("attachments"),
    form: $("form"), file: $("file"), attach: $("attach"), mic: $("mic"), input: $("input"),
    send: $("send"), stop: $("stop"), status: $("status"),
  };

  // What tests (and curious users, in the console) can read.
  const demo = (window.qomniDemo = {
    ready: false, model: null, busy: false, requests: 0, replies: 0, textChunks: 0,
    audioChunks: 0, audioSamples: 0, scheduledSeconds: 0, recordings: 0, attachments: 0,
    finishReason: null, usage: null, lastError: null, errors: 0,
  });

  const history = []; // the conversation as OpenAI messages (what the next request sends)
  let pending = []; // attachments for the next message: {kind, name, part, preview}
  let controller = null; // AbortController of the running request
  let player = null; // {ctx, next, sources}
  let recorder = null;
  let modelFor = null; // the API key the model id was fetched with

  // ------------------------------------------------------------------ small helpers

  function make(tag, cls, text) {
    const n = document.createElement(tag);
    if (cls) n.className = cls;
    if (text != null) n.textContent = text;
    return n;
  }

  function setStatus(text) { el.status.textContent = text || ""; }

  function showError(message) {
    demo.lastError = message;
    demo.errors += 1;
    el.errorText.textContent = message;
    el.error.hidden = false;
  }

  function hideError() { el.error.hidden = true; }

  function nearBottom() {
    return el.log.scrollHeight - el.log.scrollTop - el.log.clientHeight < 80;
  }
  function toBottom() { el.log.scrollTop = el.log.scrollHeight; }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = el.apiKey.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  // An OpenAI error JSON ({"error": {message, type, param, code}}) as one readable line.
  function describe(status, body) {
    const e = body && typeof body === "object" ? body.error || body : null;
    if (e && e.message) {
      const what = [status, e.code || e.type].filter(Boolean).join(" ");
      return (what ? `Error ${what}: ` : "Error: ") + e.message + (e.param ? ` (${e.param})` : "");
    }
    const text = typeof body === "string" && body ? body.slice(0, 300) : "request failed";
    return `Error ${status}: ${text}`;
  }

  async function readError(resp) {
    const text = await resp.text().catch(() => "");
    try {
      return describe(resp.status, JSON.parse(text));
    } catch {
      return describe(resp.status, text);
    }
  }

  function bytesToBase64(bytes) {
    let s = "";
    for (let i = 0; i < bytes.length; i += 0x8000) {
      s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    }
    return btoa(s);
  }

  function base64ToFloat(b64) {
    const bin = atob(b64);
    const n = bin.length >> 1;
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      let v = bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8); // little-endian int16
      if (v >= 0x8000) v -= 0x10000;
      out[i] = v / 32768;
    }
    return out;
  }

  function concat(chunks) {
    const out = new Float32Array(chunks.reduce((n, c) => n + c.length, 0));
    let o = 0;
    for (const c of chunks) { out.set(c, o); o += c.length; }
    return out;
  }

  // Box-filter resampling: averages the input over each output sample (enough for speech).
  function resample(x, from, to) {
    if (from === to) return x;
    const n = Math.floor((x.length * to) / from);
    const out = new Float32Array(n);
    const r = from / to;
    for (let i = 0; i < n; i++) {
      const a = Math.floor(i * r);
      const b = Math.max(a + 1, Math.min(x.length, Math.floor((i + 1) * r)));
      let s = 0;
      for (let j = a; j < b; j++) s += x[j];
      out[i] = s / (b - a);
    }
    return out;
  }

  function encodeWav(samples, rate) {
    const buf = new ArrayBuffer(44 + samples.length * 2);
    const v = new DataView(buf);
    const str = (o, s) => {
      for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i));
    };
    str(0, "RIFF"); v.setUint32(4, 36 + samples.length * 2, true); str(8, "WAVE");
    str(12, "fmt "); v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
    v.setUint32(24, rate, true); v.setUint32(28, rate * 2, true); v.setUint16(32, 2, true);
    v.setUint16(34, 16, true); str(36, "data"); v.setUint32(40, samples.length * 2, true);
    for (let i = 0; i < samples.length; i++) {
      const s = Math.max(-1, Math.min(1, samples[i]));
      v.setInt16(44 + 2 * i, s < 0 ? s * 32768 : s * 32767, true);
    }
    return new Uint8Array(buf);
  }
  demo.encodeWav = encodeWav; // for tests

  // ------------------------------------------------------------------ settings

  function initSettings() {
    for (const v of VOICES) el.voice.append(new Option(v, v));
    el.voice.value = store.get("voice", VOICES[0]);
    if (!el.voice.value) el.voice.value = VOICES[0];
    el.speak.checked = store.get("speak", "0") === "1";
    el.maxTokens.value = store.get("maxTokens", "");
    el.apiKey.value = store.get("apiKey", "");
    el.voice.addEventListener("change", () => store.set("voice", el.voice.value));
    el.speak.addEventListener("change", () => store.set("speak", el.speak.checked ? "1" : "0"));
    el.maxTokens.addEventListener("change", () => store.set("maxTokens", el.maxTokens.value));
    let timer = null;
    el.apiKey.addEventListener("input", () => {
      store.set("apiKey", el.apiKey.value.trim());
      clearTimeout(timer);
      timer = setTimeout(loadModel, 400);
    });
  }

  // The model id every request names: the first (only) model of GET v1/models.
  async function loadModel() {
    const key = el.apiKey.value.trim();
    modelFor = key;
    try {
      const resp = await fetch("v1/models", { headers: headers() });
      if (key !== el.apiKey.value.trim()) return; // the key changed meanwhile
      if (!resp.ok) {
        const msg = await readError(resp);
        demo.model = null;
        el.model.textContent = resp.status === 401 ? "API key needed" : "unavailable";
        el.model.classList.add("bad");
        showError(resp.status === 401 ? msg + "\nEnter the server's API key above." : msg);
        return;
      }
      const data = await resp.json();
      demo.model = (data.data && data.data[0] && data.data[0].id) || null;
      el.model.textContent = demo.model || "no model";
      el.model.classList.toggle("bad", !demo.model);
      if (demo.model && demo.lastError && !demo.busy) hideError();
    } catch (e) {
      el.model.textContent = "offline";
      el.model.classList.add("bad");
      showError("Cannot reach the server: " + e.message);
    } finally {
      demo.ready = true;
    }
  }

  // ------------------------------------------------------------------ attachments

  function kindOf(file) {
    const t = (file.type || "").split("/")[0];
    if (t === "image" || t === "audio" || t === "video") return t;
    const ext = (file.name.split(".").pop() || "").toLowerCase();
    if (["png", "jpg", "jpeg", "gif", "webp", "bmp"].includes(ext)) return "image";
    if (["wav", "mp3", "flac", "ogg", "opus", "m4a", "aac"].includes(ext)) return "audio";
    if (["mp4", "webm", "mov", "mkv", "avi"].includes(ext)) return "video";
    return null;
  }

  function readDataURL(file) {
    return new Promise((resolve, reject) => {
      const r = new FileReader();
      r.onload = () => resolve(r.result);
      r.onerror = () => reject(r.error);
      r.readAsDataURL(file);
    });
  }

  async function addFiles(files) {
    for (const file of files) {
      const kind = kindOf(file);
      if (!kind) { showError(`${file.name}: not an image, audio or video file`); continue; }
      let url;
      try {
        url = await readDataURL(file);
      } catch (e) {
        showError(`${file.name}: ${e}`);
        continue;
      }
      // Some files come without a MIME type: the server sniffs the bytes anyway.
      const part = { type: kind + "_url", [kind + "_url"]: { url } };
      addAttachment({ kind, name: file.name, part, preview: URL.createObjectURL(file) });
    }
  }

  function addAttachment(a) {
    pending.push(a);
    demo.attachments = pending.length;
    renderAttachments();
  }

  function thumb(kind, src, small) {
    if (kind === "image") { const i = make("img"); i.src = src; i.alt = "image"; return i; }
    if (kind === "video") {
      const v = make("video"); v.src = src; v.muted = true; v.preload = "metadata";
      if (!small) v.controls = true;
      return v;
    }
    if (small) return make("span", "kind", "♪");
    const a = make("audio"); a.src = src; a.controls = true; a.preload = "metadata";
    return a;
  }

  function renderAttachments() {
    el.attachments.replaceChildren(...pending.map((a, i) => {
      const chip = make("span", "chip");
      chip.title = a.name;
      const x = make("button", null, "×");
      x.type = "button";
      x.title = "Remove";
      x.addEventListener("click", () => {
        pending.splice(i, 1);
        demo.attachments = pending.length;
        renderAttachments();
      });
      chip.append(thumb(a.kind, a.preview, true), make("span", "label", a.name), x);
      return chip;
    }));
  }

  // ------------------------------------------------------------------ microphone

  async function startRecording() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      showError("This browser cannot record here (the page needs https or localhost).");
      return;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true },
      });
    } catch (e) {
      showError("Microphone unavailable: " + (e.message || e.name));
      return;
    }
    const ctx = new (window.AudioContext || window.webkitAudioContext)();
    if (ctx.state === "suspended") await ctx.resume();
    const source = ctx.createMediaStreamSource(stream);
    // ScriptProcessor works everywhere without a worklet module; its output stays silent.
    const proc = ctx.createScriptProcessor(4096, 1, 1);
    const chunks = [];
    proc.onaudioprocess = (e) => chunks.push(new Float32Array(e.inputBuffer.getChannelData(0)));
    source.connect(proc);
    proc.connect(ctx.destination);
    recorder = { stream, ctx, source, proc, chunks, t0: performance.now() };
    el.mic.classList.add("recording");
    el.mic.title = "Stop recording";
    const tick = () => {
      if (!recorder) return;
      const secs = ((performance.now() - recorder.t0) / 1000).toFixed(1);
      setStatus(`Recording… ${secs} s (click the microphone to stop)`);
      setTimeout(tick, 200);
    };
    tick();
  }

  function stopRecording() {
    const r = recorder;
    recorder = null;
    el.mic.classList.remove("recording");
    el.mic.title = "Record from the microphone";
    setStatus("");
    r.proc.disconnect();
    r.source.disconnect();
    r.stream.getTracks().forEach((t) => t.stop());
    const pcm = resample(concat(r.chunks), r.ctx.sampleRate, MIC_RATE);
    r.ctx.close();
    if (pcm.length < MIC_RATE / 10) { showError("The recording is empty."); return; }
    const wav = encodeWav(pcm, MIC_RATE);
    const data = bytesToBase64(wav);
    demo.recordings += 1;
    addAttachment({
      kind: "audio",
      name: `recording ${(pcm.length / MIC_RATE).toFixed(1)} s`,
      part: { type: "input_audio", input_audio: { data, format: "wav" } },
      preview: URL.createObjectURL(new Blob([wav], { type: "audio/wav" })),
    });
  }

  // ------------------------------------------------------------------ speech playback

  // Created (or resumed) inside the click that sends, so autoplay rules let it play.
  function audioOut() {
    if (!player) {
      const ctx = new (window.AudioContext || window.webkitAudioContext)();
      player = { ctx, next: 0, sources: new Set() };
    }
    if (player.ctx.state === "suspended") player.ctx.resume();
    return player;
  }

  // Chunks are scheduled back to back on the audio clock: gapless while the stream keeps up.
  function play(pcm) {
    const p = audioOut();
    const buf = p.ctx.createBuffer(1, pcm.length, PCM_RATE);
    buf.copyToChannel(pcm, 0);
    const src = p.ctx.createBufferSource();
    src.buffer = buf;
    src.connect(p.ctx.destination);
    const now = p.ctx.currentTime;
    if (p.next < now + 0.01) p.next = now + LEAD_S;
    src.start(p.next);
    p.next += buf.duration;
    p.sources.add(src);
    src.onended = () => p.sources.delete(src);
    demo.scheduledSeconds += buf.duration;
  }

  function stopAudio() {
    if (!player) return;
    for (const s of player.sources) { try { s.stop(); } catch { /* not started */ } }
    player.sources.clear();
    player.next = 0;
  }

  // ------------------------------------------------------------------ conversation

  function addMessage(role) {
    el.empty.hidden = true;
    const msg = make("div", "msg " + role);
    const bubble = make("div", "bubble");
    const media = make("div", "media");
    const text = make("span", "text");
    bubble.append(media, text);
    const meta = make("div", "meta");
    msg.append(make("div", "who", role === "user" ? "You" : "qomni"), bubble, meta);
    el.log.append(msg);
    return { msg, bubble, media, text, meta };
  }

  function replayButtons(view, chunks) {
    const pcm = concat(chunks);
    const secs = pcm.length / PCM_RATE;
    const replay = make("button", null, `▶ ${secs.toFixed(1)} s`);
    replay.type = "button";
    replay.title = "Play the spoken reply again";
    replay.addEventListener("click", () => { stopAudio(); play(pcm); });
    const save = make("a", null, "save");
    save.href = URL.createObjectURL(new Blob([encodeWav(pcm, PCM_RATE)], { type: "audio/wav" }));
    save.download = "qomni-reply.wav";
    view.meta.append(replay, save);
  }

  function setBusy(busy) {
    demo.busy = busy;
    el.send.hidden = busy;
    el.stop.hidden = !busy;
  }

  async function send() {
    if (demo.busy) return;
    if (recorder) stopRecording();
    const text = el.input.value.trim();
    if (!text && !pending.length) { el.input.focus(); return; }
    hideError();
    const speak = el.speak.checked;
    if (speak) audioOut(); // inside the user's gesture
    stopAudio();

    // The user's turn: text first, then the media, as one OpenAI content list.
    const attachments = pending;
    const content = [];
    if (text) content.push({ type: "text", text });
    for (const a of attachments) content.push(a.part);
    const userMsg = { role: "user", content };
    history.push(userMsg);
    const user = addMessage("user");
    for (const a of attachments) user.media.append(thumb(a.kind, a.preview, false));
    user.text.textContent = text;
    el.input.value = "";
    autosize();
    pending = [];
    demo.attachments = 0;
    renderAttachments();

    const bot = addMessage("assistant");
    bot.bubble.classList.add("pending");
    bot.msg.classList.add("streaming");
    toBottom();
    setBusy(true);
    demo.requests += 1;
    demo.finishReason = null;
    demo.usage = null;
    controller = new AbortController();
    const chunks = [];
    let reply = "";
    let failed = null;
    const t0 = performance.now();
    let firstAudio = null;
    setStatus(speak ? "Thinking… (speech will play as it arrives)" : "Thinking…");

    try {
      if (!demo.model || modelFor !== el.apiKey.value.trim()) await loadModel();
      const body = {
        model: demo.model || "default",
        messages: history,
        stream: true,
        stream_options: { include_usage: true },
      };
      const max = parseInt(el.maxTokens.value, 10);
      if (max > 0) body.max_completion_tokens = max;
      if (speak) {
        body.modalities = ["text", "audio"];
        body.audio = { voice: el.voice.value, format: "pcm16" };
      }
      const resp = await fetch("v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!resp.ok) throw new Error(await readError(resp));

      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      let done = false;
      const handle = (block) => {
        const data = block.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) return;
        if (data === "[DONE]") { done = true; return; }
        const ev = JSON.parse(data);
        if (ev.error) throw new Error(describe("", ev));
        if (ev.usage) demo.usage = ev.usage;
        const choice = ev.choices && ev.choices[0];
        if (!choice) return;
        const delta = choice.delta || {};
        if (delta.content) {
          const stick = nearBottom();
          reply += delta.content;
          bot.text.textContent = reply;
          demo.textChunks += 1;
          if (stick) toBottom();
        }
        if (delta.audio && delta.audio.data) {
          const pcm = base64ToFloat(delta.audio.data);
          chunks.push(pcm);
          demo.audioChunks += 1;
          demo.audioSamples += pcm.length;
          if (firstAudio === null) firstAudio = performance.now() - t0;
          if (speak) play(pcm);
        }
        if (choice.finish_reason) demo.finishReason = choice.finish_reason;
      };
      while (!done) {
        const { value, done: eof } = await reader.read();
        if (eof) break;
        buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
        let i;
        while (!done && (i = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          handle(block);
        }
      }
      if (!done && buf.trim()) handle(buf);
    } catch (e) {
      failed = e.name === "AbortError" ? "stopped" : e.message || String(e);
      if (e instanceof TypeError && failed !== "stopped") {
        failed = "Cannot reach the server: " + failed;
      }
    } finally {
      controller = null;
      setBusy(false);
      bot.msg.classList.remove("streaming");
      bot.bubble.classList.remove("pending");
    }

    const secs = ((performance.now() - t0) / 1000).toFixed(1);
    if (failed && !reply && !chunks.length) {
      // Nothing came back: take the turn out of the conversation and give the input back.
      history.pop();
      bot.msg.remove();
      user.msg.classList.add("failed");
      const note = failed === "stopped" ? "stopped, not sent" : "not sent";
      user.meta.append(make("span", "err", note));
      if (!el.input.value) { el.input.value = text; autosize(); }
      if (!pending.length) {
        pending = attachments;
        demo.attachments = pending.length;
        renderAttachments();
      }
      if (failed !== "stopped") showError(failed);
      setStatus("");
      return;
    }
    history.push({ role: "assistant", content: reply });
    demo.replies += 1;
    const info = [];
    if (failed === "stopped") info.push("stopped");
    else if (failed) { showError(failed); info.push("error"); }
    else if (demo.finishReason && demo.finishReason !== "stop") info.push(demo.finishReason);
    if (demo.usage) info.push(`${demo.usage.completion_tokens} tokens`);
    info.push(`${secs} s`);
    if (firstAudio !== null) info.push(`first audio ${(firstAudio / 1000).toFixed(2)} s`);
    const stick = nearBottom();
    bot.meta.append(make("span", null, info.join(" · ")));
    if (chunks.length) replayButtons(bot, chunks);
    if (stick) toBottom();
    setStatus("");
  }

  function stop() {
    if (controller) controller.abort();
    stopAudio();
  }

  function clearChat() {
    stop();
    history.length = 0;
    for (const m of el.log.querySelectorAll(".msg")) m.remove();
    el.empty.hidden = false;
    hideError();
  }

  function autosize() {
    el.input.style.height = "auto";
    el.input.style.height = Math.min(el.input.scrollHeight + 2, 200) + "px";
  }

  // ------------------------------------------------------------------ wiring

  initSettings();
  el.form.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  el.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  el.input.addEventListener("input", autosize);
  el.stop.addEventListener("click", stop);
  el.clear.addEventListener("click", clearChat);
  el.errorClose.addEventListener("click", hideError);
  el.attach.addEventListener("click", () => el.file.click());
  el.file.addEventListener("change", async () => {
    await addFiles([...el.file.files]);
    el.file.value = "";
  });
  el.mic.addEventListener("click", () => (recorder ? stopRecording() : startRecording()));
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer && e.dataTransfer.files.length) addFiles([...e.dataTransfer.files]);
  });
  el.input.addEventListener("paste", (e) => {
    const files = [...((e.clipboardData && e.clipboardData.files) || [])];
    if (files.length) { e.preventDefault(); addFiles(files); }
  });
  loadModel();
  el.input.focus();
})();
