// rawcast browser page: microphone + camera over WebRTC (POST /v1/realtime/calls),
// events back on the "oai-events" data channel, rendered as live captions and panes.
// Plain JS, no build step. Server text is only ever set with textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"), statusText: $("status-text"), speech: $("speech"),
  key: $("api-key"), language: $("language"), captions: $("captions"),
  start: $("start"), stop: $("stop"), video: $("video"), scene: $("scene"),
  liveTranscript: $("live-transcript"), liveTranslation: $("live-translation"),
  transcript: $("transcript"), translation: $("translation"),
  translationLanguage: $("translation-language"), captionsList: $("captions-list"),
  error: $("error"),
};

const MAX_LINES = 200;
const call = {
  stream: null, pc: null, dc: null, location: null,
  running: false, retries: 0, timer: null, generation: 0,
};

function setStatus(kind, text) {
  ui.status.className = `status ${kind}`;
  ui.statusText.textContent = text || kind;
}

function showError(message) {
  ui.error.hidden = !message;
  ui.error.textContent = message || "";
}

function authHeaders() {
  const key = ui.key.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function sessionConfig() {
  return {
    type: "transcription",
    rawcast: { translate: ui.language.value || null, captions: ui.captions.checked },
  };
}

// --- panes ---------------------------------------------------------------------------

function lineFor(pane, itemId) {
  let p = pane.querySelector(`p[data-item="${CSS.escape(itemId)}"]`);
  if (!p) {
    p = document.createElement("p");
    p.dataset.item = itemId;
    p.className = "line";
    const fin = document.createElement("span");
    fin.className = "final";
    const part = document.createElement("span");
    part.className = "partial";
    p.append(fin, part);
    pane.append(p);
    while (pane.children.length > MAX_LINES) pane.firstElementChild.remove();
  }
  return p;
}

function partial(pane, live, itemId, delta) {
  const p = lineFor(pane, itemId);
  const part = p.querySelector(".partial");
  part.textContent += (part.textContent && delta && !delta.startsWith(" ") ? " " : "") + delta;
  live.textContent = part.textContent;
  live.classList.add("partial");
  pane.parentElement.scrollTop = pane.parentElement.scrollHeight;
}

function final(pane, live, itemId, text) {
  const p = lineFor(pane, itemId);
  p.querySelector(".partial").textContent = "";
  p.querySelector(".final").textContent = text;
  p.classList.add("done");
  live.textContent = text;
  live.classList.remove("partial");
  pane.parentElement.scrollTop = pane.parentElement.scrollHeight;
}

function caption(ev) {
  const p = document.createElement("p");
  const t = document.createElement("time");
  t.textContent = `${(ev.start_ms / 1000).toFixed(1)} s`;
  const span = document.createElement("span");
  span.className = "caption";
  span.textContent = ev.text;
  p.append(t, span);
  ui.captionsList.prepend(p);
  while (ui.captionsList.children.length > MAX_LINES) ui.captionsList.lastElementChild.remove();
  ui.scene.textContent = ev.text;
  ui.scene.hidden = !ev.text;
}

function onEvent(message) {
  let ev;
  try { ev = JSON.parse(message.data); } catch { return; }
  switch (ev.type) {
    case "session.created":
    case "session.updated":
      ui.translationLanguage.textContent = ev.session?.rawcast?.translate || "(off)";
      break;
    case "input_audio_buffer.speech_started": ui.speech.hidden = false; break;
    case "input_audio_buffer.speech_stopped": ui.speech.hidden = true; break;
    case "conversation.item.input_audio_transcription.delta":
      partial(ui.transcript, ui.liveTranscript, ev.item_id, ev.delta || ""); break;
    case "conversation.item.input_audio_transcription.completed":
      final(ui.transcript, ui.liveTranscript, ev.item_id, ev.transcript || ""); break;
    case "rawcast.translation.delta":
      partial(ui.translation, ui.liveTranslation, ev.item_id, ev.delta || ""); break;
    case "rawcast.translation.completed":
      final(ui.translation, ui.liveTranslation, ev.item_id, ev.text || ""); break;
    case "rawcast.caption.completed": caption(ev); break;
    case "error": showError(ev.error?.message || "server error"); break;
    default: break;
  }
}

// A live change of settings: OpenAI's session.update, with the rawcast part only.
function sendUpdate(rawcast) {
  if (call.dc && call.dc.readyState === "open") {
    call.dc.send(JSON.stringify({ type: "session.update", session: { type: "transcription", rawcast } }));
  }
}

// --- connection ----------------------------------------------------------------------

function waitForIce(pc, ms) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { clearTimeout(timer); resolve(); };
    const timer = setTimeout(done, ms);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") done();
    });
  });
}

class Fatal extends Error {}

async function connect() {
  const generation = ++call.generation;
  setStatus(call.retries ? "reconnecting" : "connecting", call.retries ? "reconnecting" : "connecting");
  const r = await fetch("/v1/config", { headers: authHeaders() });
  const config = await r.json().catch(() => ({}));
  if (!r.ok) throw new Fatal(config.error?.message || `config: HTTP ${r.status}`);

  const pc = new RTCPeerConnection({ iceServers: config.ice_servers || [] });
  call.pc = pc;
  for (const track of call.stream.getTracks()) {
    pc.addTransceiver(track, { direction: "sendonly", streams: [call.stream] });
  }
  const dc = pc.createDataChannel("oai-events");
  call.dc = dc;
  dc.onmessage = onEvent;
  dc.onopen = () => { call.retries = 0; setStatus("live", "live"); showError(""); };
  // A lost network shows as a failed peer connection; a call the server ended, as the
  // data channel closing. Either way: reconnect with backoff.
  dc.onclose = () => { if (generation === call.generation) dropped(); };
  pc.onconnectionstatechange = () => {
    if (generation !== call.generation) return;
    if (["failed", "closed"].includes(pc.connectionState)) dropped();
    if (pc.connectionState === "disconnected") {  // often transient: give it 5 s
      setTimeout(() => {
        if (generation === call.generation && pc.connectionState === "disconnected") dropped();
      }, 5000);
    }
  };

  await pc.setLocalDescription(await pc.createOffer());
  await waitForIce(pc, 2000);
  const form = new FormData();
  form.append("sdp", new Blob([pc.localDescription.sdp], { type: "application/sdp" }));
  form.append("session", new Blob([JSON.stringify(sessionConfig())], { type: "application/json" }));
  const answer = await fetch(config.calls_url || "/v1/realtime/calls", {
    method: "POST", body: form, headers: authHeaders(),
  });
  if (!answer.ok) {
    const body = await answer.json().catch(() => ({}));
    const message = body.error?.message || `HTTP ${answer.status}`;
    if (answer.status >= 500 || answer.status === 429) throw new Error(message);
    throw new Fatal(message);
  }
  const location = answer.headers.get("Location");
  if (generation !== call.generation) {  // stopped meanwhile: hang up the new call
    if (location) fetch(location, { method: "DELETE", headers: authHeaders() }).catch(() => {});
    return;
  }
  call.location = location;
  await pc.setRemoteDescription({ type: "answer", sdp: await answer.text() });
}

function teardown() {
  call.generation++;
  if (call.dc) call.dc.onmessage = null;
  if (call.pc) call.pc.close();
  if (call.location) {
    fetch(call.location, { method: "DELETE", headers: authHeaders(), keepalive: true }).catch(() => {});
  }
  call.pc = call.dc = call.location = null;
}

function dropped() {
  teardown();
  if (!call.running) return;
  const delay = Math.min(30, 2 ** call.retries) * (0.8 + 0.4 * Math.random());
  call.retries += 1;
  setStatus("reconnecting", `connection lost: retrying in ${delay.toFixed(0)} s`);
  clearTimeout(call.timer);
  call.timer = setTimeout(attempt, delay * 1000);
}

async function attempt() {
  if (!call.running) return;
  try {
    await connect();
  } catch (e) {
    if (!call.running) return;
    if (e instanceof Fatal) {
      stop();
      setStatus("error", "error");
      showError(e.message);
    } else {
      showError(e.message);
      dropped();
    }
  }
}

async function start() {
  showError("");
  ui.start.disabled = true;
  try {
    try {
      call.stream = await navigator.mediaDevices.getUserMedia({
        audio: true,
        video: { width: { ideal: 640 }, height: { ideal: 360 }, frameRate: { ideal: 15, max: 15 } },
      });
    } catch {
      call.stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    }
  } catch (e) {
    ui.start.disabled = false;
    setStatus("error", "no microphone");
    showError(`microphone: ${e.message}`);
    return;
  }
  ui.video.srcObject = call.stream;
  sessionStorage.setItem("rawcast.apiKey", ui.key.value);
  call.running = true;
  call.retries = 0;
  ui.stop.disabled = false;
  await attempt();
}

function stop() {
  call.running = false;
  clearTimeout(call.timer);
  teardown();
  if (call.stream) call.stream.getTracks().forEach((t) => t.stop());
  call.stream = null;
  ui.video.srcObject = null;
  ui.start.disabled = false;
  ui.stop.disabled = true;
  ui.speech.hidden = true;
  setStatus("idle", "idle");
}

ui.key.value = sessionStorage.getItem("rawcast.apiKey") || "";
ui.start.addEventListener("click", start);
ui.stop.addEventListener("click", stop);
ui.language.addEventListener("change", () => {
  ui.translationLanguage.textContent = ui.language.value || "(off)";
  sendUpdate({ translate: ui.language.value || null });
});
ui.captions.addEventListener("change", () => sendUpdate({ captions: ui.captions.checked }));
window.addEventListener("pagehide", () => { if (call.running) teardown(); });
