// voxtral-rtc browser client.
//
// One WebRTC call: the microphone goes up as an Opus track, and the server answers on the
// data channel "oai-events" with OpenAI Realtime transcription events. Signalling is the
// SmallWebRTC shape: POST /api/offer {sdp, type} -> {sdp, type, pc_id}. We send the offer
// only once ICE gathering has finished (non-trickle): one round trip, nothing to PATCH, and it
// works the same behind any proxy.

const $ = (sel) => document.querySelector(sel);

const ui = {
  start: $("#start"),
  stop: $("#stop"),
  state: $("#state"),
  engine: $("#engine"),
  speaking: $("#speaking"),
  speakingLabel: $("#speaking .speaking-label"),
  level: $("#level"),
  error: $("#error"),
  errorTitle: $("#error .banner-title"),
  errorMessage: $("#error .message"),
  errorDismiss: $("#error-dismiss"),
  scroller: $("#scroller"),
  empty: $("#empty"),
  list: $("#utterances"),
  copy: $("#copy"),
  clear: $("#clear"),
  settings: $("#settings-form"),
  settingsNote: $("#settings-note"),
  token: $("#token"),
};

// Longest wait for ICE gathering. Host candidates arrive in milliseconds; an unreachable STUN
// server would otherwise hold the call for tens of seconds, and the host candidates we already
// have are enough for a server on the same network.
const ICE_GATHER_TIMEOUT_MS = 3000;
const SETTINGS_KEY = "voxtral-rtc.settings";
// The access token (server.auth_tokens) lives only in this tab's sessionStorage: the page
// itself holds no secret, and the token is gone when the tab closes.
const TOKEN_KEY = "voxtral-rtc.token";
const AUTH_CODES = new Set(["unauthorized", "invalid_token"]);
const STATE_LABELS = {
  idle: "Idle",
  connecting: "Connecting…",
  connected: "Connected",
  failed: "Failed",
  closed: "Closed",
};

/** Everything that belongs to one call; replaced as a whole by the next Start. */
let call = null;

// ---------------------------------------------------------------------------------------------
// Small helpers

/** An Error whose message is fit to show to a person, with the server's code when there is one. */
class UserError extends Error {
  constructor(message, code = "") {
    super(message);
    this.code = code;
  }
}

function setState(state) {
  ui.state.dataset.state = state;
  ui.state.textContent = STATE_LABELS[state] ?? state;
  const busy = state === "connecting" || state === "connected";
  ui.start.disabled = busy;
  ui.stop.disabled = !busy;
  document.body.dataset.callState = state;
  if (!busy) setSpeaking(false, "Not listening");
}

function setSpeaking(active, label) {
  ui.speaking.dataset.active = String(active);
  ui.speaking.classList.toggle("is-speaking", active);
  ui.speakingLabel.textContent = label ?? (active ? "Speaking" : "Listening");
}

function showError(message, { title = "Something went wrong", code = "" } = {}) {
  ui.errorTitle.textContent = title;
  ui.errorMessage.textContent = code ? `${message} (${code})` : message;
  ui.error.hidden = false;
}

function hideError() {
  ui.error.hidden = true;
  ui.errorMessage.textContent = "";
}

/** Formats milliseconds of call audio as m:ss.t, the way a recorder shows it. */
function formatClock(ms) {
  if (typeof ms !== "number" || !Number.isFinite(ms)) return "";
  const totalTenths = Math.max(0, Math.round(ms / 100));
  const minutes = Math.floor(totalTenths / 600);
  const seconds = Math.floor((totalTenths % 600) / 10);
  return `${minutes}:${String(seconds).padStart(2, "0")}.${totalTenths % 10}`;
}

/** Reads an HTTP response; a non-2xx answer becomes a UserError with the server's message. */
async function readJson(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // An empty or non-JSON body (a proxy's HTML error page, say): fall through to the status.
  }
  if (!response.ok) {
    const err = body && body.error;
    if (err && err.message) throw new UserError(err.message, err.code || err.type || "");
    throw new UserError(`The server answered ${response.status} ${response.statusText}.`);
  }
  return body;
}

/** The Authorization header for the API when the person entered a token. */
function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function fetchConfig() {
  const response = await fetch("/api/config", { cache: "no-store", headers: authHeaders() });
  return readJson(response);
}

function showConfigError(err) {
  const needsToken = err && AUTH_CODES.has(err.code);
  ui.engine.textContent = needsToken ? "access token needed" : "server unreachable";
  ui.engine.title = needsToken ? "Enter the server's access token under Settings" : "";
  ui.engine.classList.add("badge-warn");
}

function showEngine(config) {
  if (!config) return;
  const ready = config.ready !== false;
  ui.engine.textContent = config.engine ? `engine: ${config.engine}` : "engine";
  ui.engine.classList.toggle("badge-warn", !ready);
  ui.engine.title = ready ? "Transcription engine (ready)" : "The engine is still loading";
}

// ---------------------------------------------------------------------------------------------
// Settings (session.update)

function loadSettings() {
  try {
    return JSON.parse(localStorage.getItem(SETTINGS_KEY) || "null");
  } catch {
    return null;
  }
}

function readSettingsForm() {
  const f = ui.settings.elements;
  return {
    language: f.language.value,
    threshold: Number(f.threshold.value),
    silence_duration_ms: Math.round(Number(f.silence_duration_ms.value)),
    prefix_padding_ms: Math.round(Number(f.prefix_padding_ms.value)),
  };
}

function fillSettingsForm(s) {
  if (!s) return;
  const f = ui.settings.elements;
  if (typeof s.language === "string") {
    // The server may run with a language the list does not offer; show it rather than hide it.
    if (s.language && ![...f.language.options].some((o) => o.value === s.language)) {
      f.language.add(new Option(s.language, s.language));
    }
    f.language.value = s.language;
  }
  if (Number.isFinite(s.threshold)) f.threshold.value = s.threshold;
  if (Number.isFinite(s.silence_duration_ms)) f.silence_duration_ms.value = s.silence_duration_ms;
  if (Number.isFinite(s.prefix_padding_ms)) f.prefix_padding_ms.value = s.prefix_padding_ms;
  f.threshold_out.value = Number(f.threshold.value).toFixed(2);
}

function sessionUpdate(s) {
  return {
    type: "session.update",
    session: {
      // An empty language is meaningful: back to the server's default (or detection).
      input_audio_transcription: { language: s.language },
      turn_detection: {
        type: "server_vad",
        threshold: s.threshold,
        prefix_padding_ms: s.prefix_padding_ms,
        silence_duration_ms: s.silence_duration_ms,
      },
    },
  };
}

/** Mirrors the server's session (session.created / session.updated) into the form. */
function reflectSession(session) {
  if (!session || loadSettings()) return; // the person's own choice wins over the defaults
  const td = session.turn_detection || {};
  const tr = session.input_audio_transcription || {};
  fillSettingsForm({
    language: tr.language || "",
    threshold: td.threshold,
    silence_duration_ms: td.silence_duration_ms,
    prefix_padding_ms: td.prefix_padding_ms,
  });
}

// ---------------------------------------------------------------------------------------------
// The transcript list

const items = new Map(); // item_id -> {el, interim, final, stoppedAt, status}

function isNearBottom() {
  const s = ui.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight < 48;
}

/** Keeps the newest line in view, unless the person scrolled up to read something. */
function withAutoScroll(fn) {
  const follow = isNearBottom();
  fn();
  if (follow) ui.scroller.scrollTop = ui.scroller.scrollHeight;
}

function refreshListChrome() {
  const has = items.size > 0;
  ui.empty.hidden = has;
  ui.copy.disabled = !has;
  ui.clear.disabled = !has;
}

function getItem(itemId, audioStartMs) {
  let item = items.get(itemId);
  if (item) return item;
  const el = document.createElement("li");
  el.className = "utterance";
  el.dataset.itemId = itemId;
  el.dataset.status = "listening";
  el.innerHTML = `
    <div class="utt-meta">
      <span class="utt-time"></span>
      <span class="utt-status"></span>
      <span class="latency" hidden></span>
    </div>
    <p class="utt-text"><span class="final"></span><span class="interim"></span></p>`;
  item = {
    el,
    time: el.querySelector(".utt-time"),
    statusEl: el.querySelector(".utt-status"),
    latency: el.querySelector(".latency"),
    final: el.querySelector(".final"),
    interim: el.querySelector(".interim"),
    interimText: "",
    stoppedAt: null,
  };
  item.time.textContent = formatClock(audioStartMs);
  items.set(itemId, item);
  withAutoScroll(() => ui.list.append(el));
  setItemStatus(item, "listening");
  refreshListChrome();
  return item;
}

const STATUS_TEXT = {
  listening: "listening…",
  transcribing: "transcribing…",
  final: "",
  failed: "failed",
};

function setItemStatus(item, status) {
  item.el.dataset.status = status;
  item.statusEl.textContent = STATUS_TEXT[status] ?? status;
  // The grey placeholder stands in for text until the first words arrive.
  if (status === "listening" || status === "transcribing") {
    item.interim.dataset.placeholder = item.interimText ? "" : STATUS_TEXT[status];
  } else {
    item.interim.dataset.placeholder = "";
  }
}

function setInterim(item, text) {
  item.interimText = text;
  withAutoScroll(() => {
    item.interim.textContent = text;
    item.interim.dataset.placeholder = text ? "" : STATUS_TEXT[item.el.dataset.status] ?? "";
  });
}

function completeItem(itemId, msg, arrivedAt) {
  const text = (msg.transcript ?? "").trim();
  if (!text) {
    // A breath or a click the VAD took for speech: the server completes the item (the
    // protocol needs it) with nothing in it, and nothing was said, so no row and no latency.
    dropItem(itemId);
    return;
  }
  const item = getItem(itemId);
  withAutoScroll(() => {
    item.final.textContent = text;
    item.interim.textContent = "";
    item.interimText = "";
    setItemStatus(item, "final");
  });
  const t = msg.timings || {};
  const parts = [];
  for (const [key, label] of [["vad_ms", "VAD"], ["queue_ms", "queue"], ["engine_ms", "engine"]]) {
    if (typeof t[key] === "number") parts.push(`${label} ${Math.round(t[key])} ms`);
  }
  const serverDetail = parts.length ? `server: ${parts.join(" · ")}` : "";
  if (item.stoppedAt !== null) {
    // Client clock only: the arrival of speech_stopped to the arrival of completed. Both are
    // stamped here, so neither clock skew nor the server's own bookkeeping can distort it.
    const ms = Math.round(arrivedAt - item.stoppedAt);
    item.latency.textContent = `${ms} ms`;
    item.latency.dataset.ms = String(ms);
  } else {
    item.latency.textContent = "—";
  }
  item.latency.title = ["End of speech → final text, in this browser", serverDetail]
    .filter(Boolean)
    .join("\n");
  item.latency.hidden = false;
  if (serverDetail) item.el.title = serverDetail;
}

/** Forgets an item that turned out to hold no utterance (its completed is its last event). */
function dropItem(itemId) {
  const item = items.get(itemId);
  if (!item) return;
  withAutoScroll(() => item.el.remove());
  items.delete(itemId);
  refreshListChrome();
}

function failItem(item, error) {
  const message = (error && error.message) || "Transcription failed.";
  withAutoScroll(() => {
    item.interim.textContent = "";
    item.final.textContent = "";
    item.el.classList.add("is-failed");
    setItemStatus(item, "failed");
    let note = item.el.querySelector(".utt-error");
    if (!note) {
      note = document.createElement("p");
      note.className = "utt-error";
      item.el.append(note);
    }
    note.textContent = error && error.code ? `${message} (${error.code})` : message;
  });
}

function transcriptText() {
  return [...items.values()]
    .map((it) => it.final.textContent.trim() || it.interimText.trim())
    .filter(Boolean)
    .join("\n");
}

// ---------------------------------------------------------------------------------------------
// Data-channel events

function onEvent(msg) {
  const now = performance.now();
  switch (msg.type) {
    case "session.created":
    case "session.updated":
      reflectSession(msg.session);
      break;
    case "input_audio_buffer.speech_started":
      getItem(msg.item_id, msg.audio_start_ms);
      setSpeaking(true);
      break;
    case "input_audio_buffer.speech_stopped": {
      const item = getItem(msg.item_id);
      item.stoppedAt = now;
      setItemStatus(item, "transcribing");
      setSpeaking(false);
      break;
    }
    case "input_audio_buffer.committed":
      getItem(msg.item_id); // a client-driven commit may be the first we hear of an item
      break;
    case "conversation.item.input_audio_transcription.delta": {
      const item = getItem(msg.item_id);
      if (item.el.dataset.status !== "final") setInterim(item, item.interimText + (msg.delta ?? ""));
      break;
    }
    case "conversation.item.input_audio_transcription.interim": {
      // A replaceable guess (unlike deltas, which only ever append).
      const item = getItem(msg.item_id);
      if (item.el.dataset.status !== "final") setInterim(item, msg.text ?? "");
      break;
    }
    case "conversation.item.input_audio_transcription.completed":
      completeItem(msg.item_id, msg, now);
      break;
    case "conversation.item.input_audio_transcription.failed":
      failItem(getItem(msg.item_id), msg.error);
      break;
    case "error": {
      const err = msg.error || {};
      showError(err.message || "The server reported an error.", {
        title: "Server error",
        code: err.code || "",
      });
      break;
    }
    default:
      // Unknown types are ignored on purpose: the protocol grows by adding events.
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// The microphone level meter (purely cosmetic; a person wants to see the mic is live)

function startMeter(stream, c) {
  const Ctx = window.AudioContext || window.webkitAudioContext;
  if (!Ctx) return;
  const ctx = new Ctx();
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 1024;
  ctx.createMediaStreamSource(stream).connect(analyser);
  const buf = new Float32Array(analyser.fftSize);
  const tick = () => {
    if (call !== c) return;
    analyser.getFloatTimeDomainData(buf);
    let sum = 0;
    for (const v of buf) sum += v * v;
    const rms = Math.sqrt(sum / buf.length);
    // A log scale, so that quiet speech still moves the bar: -60 dBFS .. 0 dBFS -> 0 .. 100 %.
    const db = 20 * Math.log10(rms + 1e-9);
    ui.level.style.width = `${Math.max(0, Math.min(100, ((db + 60) / 60) * 100)).toFixed(1)}%`;
    c.meterFrame = requestAnimationFrame(tick);
  };
  c.audioCtx = ctx;
  tick();
}

// ---------------------------------------------------------------------------------------------
// The call

function waitForIceGathering(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    };
    const check = () => {
      if (pc.iceGatheringState === "complete") done();
    };
    const timer = setTimeout(done, ICE_GATHER_TIMEOUT_MS);
    pc.addEventListener("icegatheringstatechange", check);
  });
}

async function openMicrophone() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new UserError(
      "This page cannot reach a microphone: browsers allow it only over HTTPS or on localhost.",
    );
  }
  try {
    return await navigator.mediaDevices.getUserMedia({
      audio: {
        channelCount: 1,
        echoCancellation: true,
        noiseSuppression: true,
        autoGainControl: true,
      },
      video: false,
    });
  } catch (err) {
    if (err && err.name === "NotAllowedError") {
      throw new UserError("Microphone access was refused. Allow it in the browser and try again.");
    }
    if (err && err.name === "NotFoundError") {
      throw new UserError("No microphone was found.");
    }
    throw new UserError(`Could not open the microphone: ${err && err.message ? err.message : err}`);
  }
}

async function start() {
  if (call) stop("closed");
  hideError();
  const c = { pc: null, dc: null, stream: null, pcId: null, ended: false };
  call = c;
  setState("connecting");
  setSpeaking(false, "Connecting");
  try {
    const config = await fetchConfig();
    showEngine(config);
    if (call !== c) return;

    c.stream = await openMicrophone();
    if (call !== c) return stopTracks(c.stream);
    startMeter(c.stream, c);

    // The server's STUN/TURN list, fetched afresh for every call: TURN entries carry
    // credentials minted for this call alone (webrtc.turn_secret), valid for a limited time.
    c.pc = new RTCPeerConnection({ iceServers: config.ice_servers || [] });
    for (const track of c.stream.getAudioTracks()) c.pc.addTrack(track, c.stream);
    // We create the channel so that the offer carries it (the server never has to offer one).
    c.dc = c.pc.createDataChannel(config.data_channel || "oai-events");
    wireChannel(c);
    wirePeer(c);

    await c.pc.setLocalDescription(await c.pc.createOffer());
    await waitForIceGathering(c.pc);
    if (call !== c) return;

    const response = await fetch("/api/offer", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({ sdp: c.pc.localDescription.sdp, type: "offer" }),
    });
    const answer = await readJson(response);
    if (call !== c) return;
    c.pcId = answer.pc_id;
    await c.pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
  } catch (err) {
    if (call !== c) return;
    console.error(err);
    const message = AUTH_CODES.has(err.code)
      ? "This server needs an access token: enter it under Settings, then Apply."
      : err.message || String(err);
    showError(message, { title: "Could not start the call", code: err.code });
    end(c, "failed");
  }
}

function wirePeer(c) {
  c.pc.addEventListener("connectionstatechange", () => {
    if (call !== c) return;
    const s = c.pc.connectionState;
    if (s === "connected") {
      setState("connected");
      setSpeaking(false, "Listening");
    } else if (s === "failed") {
      showError("The connection to the server was lost.", { title: "Call failed" });
      end(c, "failed");
    } else if (s === "closed") {
      end(c, "closed");
    }
  });
}

function wireChannel(c) {
  c.dc.addEventListener("open", () => {
    // Settings the person applied before (or during an earlier call) travel with every call.
    const saved = loadSettings();
    if (saved) c.dc.send(JSON.stringify(sessionUpdate(saved)));
  });
  c.dc.addEventListener("message", (ev) => {
    if (call !== c) return;
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      console.warn("ignoring a non-JSON data-channel message", ev.data);
      return;
    }
    onEvent(msg);
  });
  c.dc.addEventListener("close", () => {
    // The server closes the channel when it ends the call (idle timeout, shutdown).
    if (call === c && !c.ended) end(c, "closed");
  });
}

function stopTracks(stream) {
  if (stream) for (const t of stream.getTracks()) t.stop();
}

/** Releases everything the call holds: channel, peer connection, microphone, meter. */
function end(c, state) {
  if (c.ended) return;
  c.ended = true;
  if (c.meterFrame) cancelAnimationFrame(c.meterFrame);
  if (c.audioCtx) c.audioCtx.close().catch(() => {});
  try {
    if (c.dc) c.dc.close();
  } catch {
    /* already closed */
  }
  if (c.pc) c.pc.close();
  stopTracks(c.stream);
  ui.level.style.width = "0%";
  if (call === c) {
    call = null;
    setState(state);
  }
}

function stop(state = "closed") {
  if (call) end(call, state);
}

// ---------------------------------------------------------------------------------------------
// Wiring

ui.start.addEventListener("click", () => start());
ui.stop.addEventListener("click", () => stop("closed"));
ui.errorDismiss.addEventListener("click", hideError);

ui.clear.addEventListener("click", () => {
  items.clear();
  ui.list.replaceChildren();
  refreshListChrome();
});

ui.copy.addEventListener("click", async () => {
  try {
    await navigator.clipboard.writeText(transcriptText());
    ui.copy.textContent = "Copied";
  } catch {
    ui.copy.textContent = "Copy failed";
  }
  setTimeout(() => (ui.copy.textContent = "Copy"), 1500);
});

ui.settings.elements.threshold.addEventListener("input", (ev) => {
  ui.settings.elements.threshold_out.value = Number(ev.target.value).toFixed(2);
});

ui.settings.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const s = readSettingsForm();
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(s));
  const token = ui.token.value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
  fetchConfig().then(showEngine).catch(showConfigError);
  if (call && call.dc && call.dc.readyState === "open") {
    call.dc.send(JSON.stringify(sessionUpdate(s)));
    ui.settingsNote.textContent = "Sent to the current call; kept for the next ones.";
  } else {
    ui.settingsNote.textContent = "Saved; sent when the next call starts.";
  }
});

// Closing the tab should hang up at once rather than leave the server to notice ~40 s later.
window.addEventListener("pagehide", () => stop("closed"));

fillSettingsForm(loadSettings());
ui.token.value = sessionStorage.getItem(TOKEN_KEY) || "";
setState("idle");
refreshListChrome();
fetchConfig().then(showEngine).catch(showConfigError);
