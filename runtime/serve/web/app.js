// huatuo-local's page: the same OpenAI-compatible API as every other client, nothing fetched from elsewhere.
"use strict";

const MAX_IMAGES = 6;  // the release's limit per conversation
const $ = (sel) => document.querySelector(sel);

const state = {
  key: sessionStorage.getItem("huatuo-key") || "",  // the tab's only: gone when the tab closes
  model: "", quant: "",
  history: [],      // OpenAI messages sent so far (images as data: URIs, with their window and frame)
  turns: [],        // for the page and the export: {question, images: [{name, seen}], answer, note}
  pending: [],      // images waiting for the next question
  controller: null, // the answer being streamed (Stop aborts it)
};

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = !message;
}

// Another error beside those shown (two bad files dropped at once: both are said).
function addError(message) {
  const box = $("#error");
  box.textContent = box.hidden || !box.textContent ? message : box.textContent + "\n" + message;
  box.hidden = false;
}

// One sentence for every error the server can give, in its own words plus what to do.
function explain(status, body) {
  const err = (body && body.error) || {};
  const text = err.message || `HTTP ${status}`;
  if (status === 401) { askKey(); return "The API key was refused: enter this server's key."; }
  if (err.code === "context_length_exceeded") return text + " Start a new conversation.";
  if (err.code === "queue_full") return "The server is busy answering others; try again in a few seconds.";
  if (err.code === "loading") return "The model is still loading; try again in a few seconds.";
  if (err.code === "model_not_loaded") return "The model could not be loaded: " + text;
  if (status === 413) return "Too large: " + text;
  if (err.code === "invalid_image") return "This image cannot be read: " + text;
  if (err.code === "invalid_schema") return "The JSON Schema in Settings cannot be enforced: " + text;
  return text;
}

async function api(path, body) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) {
    let data = null;
    try { data = await response.json(); } catch (e) { /* not JSON */ }
    const err = new Error(explain(response.status, data));
    err.code = data && data.error ? data.error.code : null;
    throw err;
  }
  return response.json();
}

function askKey() {
  $("#key-form").hidden = false;
  $("#key").focus();
}

$("#key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.key = $("#key").value.trim();
  sessionStorage.setItem("huatuo-key", state.key);
  $("#key-form").hidden = true;
  showError("");
  loadStatus();
  refreshPreviews();
});

async function loadStatus() {
  try {
    const h = await (await fetch("/health", { headers: headers() })).json();
    if (h.status === "ok" && !h.model) {  // a keyed server says more once it has the key
      $("#model").textContent = "API key needed";
      if (state.key) showError("The API key was not accepted: enter this server's key.");
      askKey();
      return;
    }
    if (h.status === "ok") {
      state.model = h.model; state.quant = h.quant || "";
      $("#model").textContent = h.model;
      // The model is named NAME:QUANT already; a model without a manifest shows its quant beside it.
      $("#quant").textContent = state.quant && !h.model.includes(":") ? "(" + state.quant + ")" : "";
      if (h.auth && !state.key) askKey();
      return;
    }
    $("#model").textContent = h.status === "error" ? "model not loaded: " + h.error : "loading the model…";
    if (h.status === "error") { showError("The model could not be loaded: " + h.error); return; }
  } catch (e) {
    $("#model").textContent = "server not reachable";
  }
  setTimeout(loadStatus, 1500);
}

// --- images -------------------------------------------------------------------------------

// A study folder travels as one zip (stored, not compressed: DICOM pixels rarely shrink and the server reads
// it in memory), the same as a zip the user drops; the server groups, orders and chooses its slices.
const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

function crc32(bytes) {
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

async function folderAsZip(name, entries) {  // entries: [[relative path, File], ...]
  const parts = [], central = [];
  let offset = 0;
  const enc = new TextEncoder();
  for (const [path, file] of entries) {
    if (path.split("/").some((p) => p.startsWith("."))) continue;  // hidden files, as the CLI skips them
    const data = new Uint8Array(await file.arrayBuffer()), nameBytes = enc.encode(path);
    const crc = crc32(data);
    const local = new DataView(new ArrayBuffer(30));
    local.setUint32(0, 0x04034b50, true); local.setUint16(4, 20, true); local.setUint16(6, 0x0800, true);
    local.setUint32(14, crc, true); local.setUint32(18, data.length, true); local.setUint32(22, data.length, true);
    local.setUint16(26, nameBytes.length, true);
    const dir = new DataView(new ArrayBuffer(46));
    dir.setUint32(0, 0x02014b50, true); dir.setUint16(4, 20, true); dir.setUint16(6, 20, true);
    dir.setUint16(8, 0x0800, true); dir.setUint32(16, crc, true); dir.setUint32(20, data.length, true);
    dir.setUint32(24, data.length, true); dir.setUint16(28, nameBytes.length, true); dir.setUint32(42, offset, true);
    parts.push(local, nameBytes, data);
    central.push(dir, nameBytes);
    offset += 30 + nameBytes.length + data.length;
  }
  const size = central.reduce((n, b) => n + b.byteLength, 0);
  const end = new DataView(new ArrayBuffer(22));
  end.setUint32(0, 0x06054b50, true); end.setUint16(8, central.length / 2, true);
  end.setUint16(10, central.length / 2, true); end.setUint32(12, size, true); end.setUint32(16, offset, true);
  return new File([...parts, ...central, end], name + ".zip", { type: "application/zip" });
}

function readTree(entry, prefix = "") {  // a dropped folder's files, with their paths inside it
  return new Promise((resolve, reject) => {
    if (entry.isFile) { entry.file((f) => resolve([[prefix + entry.name, f]]), reject); return; }
    const reader = entry.createReader(), all = [];
    const next = () => reader.readEntries(async (batch) => {
      if (!batch.length) {
        const nested = await Promise.all(all.map((e) => readTree(e, prefix + entry.name + "/")));
        resolve(nested.flat());
        return;
      }
      all.push(...batch);
      next();
    }, reject);
    next();
  });
}

function isDicom(file) {
  return /\.(dcm|dicom)$/i.test(file.name) || file.type === "application/dicom";
}

function isZip(file) {  // a zipped DICOM study: its series, slices and montage are chosen on the card
  return /\.zip$/i.test(file.name) || file.type === "application/zip" || file.type === "application/x-zip-compressed";
}

function readAsDataUri(file, mime) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).replace(/^data:[^;,]*/, "data:" + mime));
    reader.onerror = () => reject(new Error(file.name + ": cannot be read"));
    reader.readAsDataURL(file);
  });
}

function imageSpec(img) {
  const spec = { url: img.uri, name: img.name };  // the name: errors say which file
  if (img.dicom) {
    if (img.window === "custom") spec.window = `${img.center},${img.width}`;
    else if (img.window) spec.window = img.window;
  }
  if (img.frames > 1) spec.frame = img.frame;  // multi-frame DICOM, TIFF and GIF alike
  if (img.study) {  // one picture per part: one slice, or a montage of evenly spaced slices
    if (img.montage) spec.montage = img.montage;
    if (img.series) spec.series = img.series;
    if (img.slices) spec.slices = img.slices;
  }
  return spec;
}

async function addFiles(files) {
  showError("");
  const used = state.history.reduce((n, m) => n + (Array.isArray(m.content)
    ? m.content.filter((p) => p.type === "image_url").length : 0), 0);
  for (const file of files) {
    if (used + state.pending.length >= MAX_IMAGES) {
      showError(`At most ${MAX_IMAGES} images per conversation (the model's limit); start a new conversation.`);
      break;
    }
    const study = isZip(file);
    const dicom = study || isDicom(file);
    const mime = study ? "application/zip" : dicom ? "application/dicom" : (file.type || "application/octet-stream");
    const img = { name: file.name, dicom, study, montage: "3x3", series: "", slices: "",
                  uri: await readAsDataUri(file, mime), window: "", center: 40, width: 400,
                  frame: 0, frames: 1, seen: "", card: null, firstPreview: true };
    state.pending.push(img);
    renderCard(img);
    await preview(img);
  }
}

function renderCard(img) {
  const card = $("#image-card").content.firstElementChild.cloneNode(true);
  img.card = card;
  card.querySelector("figcaption").textContent = img.name;
  card.querySelector("img").alt = "What the model sees for " + img.name;
  const dicom = card.querySelector(".dicom");
  dicom.hidden = !img.dicom;
  const windowSel = card.querySelector(".window"), center = card.querySelector(".center"),
        width = card.querySelector(".width"), frame = card.querySelector(".frame");
  const label = (el, text) => el.setAttribute("aria-label", text + " for " + img.name);
  label(windowSel, "Window"); label(center, "Window centre"); label(width, "Window width"); label(frame, "Frame");
  windowSel.addEventListener("change", () => {
    img.window = windowSel.value;
    center.disabled = width.disabled = img.window !== "custom";
    preview(img);
  });
  for (const input of [center, width]) {
    input.addEventListener("change", () => {
      img.center = Number(center.value); img.width = Math.max(1, Number(width.value));
      preview(img);
    });
  }
  frame.addEventListener("change", () => { img.frame = Number(frame.value); preview(img); });
  const studyBox = card.querySelector(".study");
  studyBox.hidden = !img.study;
  const montage = card.querySelector(".montage"), series = card.querySelector(".series"),
        slices = card.querySelector(".slices");
  label(montage, "Montage"); label(series, "Series"); label(slices, "Slices");
  const scrub = card.querySelector(".scrub");
  label(scrub, "Slice");
  montage.addEventListener("change", () => {
    img.montage = montage.value;
    img.slices = ""; slices.value = "";  // a new layout starts from its evenly spaced choice
    preview(img);
  });
  // One slice at a time: the scrubber walks the series, each position the exact picture the model would see.
  scrub.addEventListener("input", () => {
    img.slices = scrub.value; slices.value = scrub.value;
    card.querySelector(".scrub-value").textContent = scrub.value;
    preview(img);
  });
  series.addEventListener("change", () => { img.series = series.value.trim(); preview(img); });
  slices.addEventListener("change", () => { img.slices = slices.value.trim(); preview(img); });
  card.querySelector(".remove").setAttribute("aria-label", "Remove " + img.name);
  card.querySelector(".remove").addEventListener("click", () => {
    state.pending = state.pending.filter((p) => p !== img);
    card.remove();
  });
  $("#pending").appendChild(card);
}

function showStudy(img, study) {
  // The scrubber spans the series when one slice is shown (no montage); its place is the slice shown.
  const control = img.card.querySelector(".scrub-control"), scrub = img.card.querySelector(".scrub");
  control.hidden = Boolean(img.montage);
  scrub.max = String(Math.max(0, study.series_slices - 1));
  if (study.slices.length === 1) {
    scrub.value = String(study.slices[0]);
    img.card.querySelector(".scrub-value").textContent = `${study.slices[0]} of ${study.series_slices}` +
      (study.positions_mm ? ` (${study.positions_mm[0]} mm)` : "");
  }
  img.card.querySelector("figcaption").textContent = `${img.name}: series ${study.series_number ?? "?"}, ` +
    (study.montage ? `montage ${study.montage} of slices ${study.slices.join(", ")}` : `slice ${study.slices[0]}`);
}

async function preview(img) {
  const el = img.card.querySelector("img");
  const ticket = (img.ticket = (img.ticket || 0) + 1);  // answers can arrive out of order: keep the newest
  el.setAttribute("aria-busy", "true");
  try {
    const data = await api("/v1/huatuo/preview", { image_url: imageSpec(img) });
    if (ticket !== img.ticket) return;
    img.seen = data.png;
    img.frames = data.frames;
    const frame = img.card.querySelector(".frame");
    frame.max = String(Math.max(0, data.frames - 1));
    frame.disabled = data.frames <= 1;
    img.card.querySelector(".frame-control").hidden = data.frames <= 1;
    showWindow(img, data.window);
    if (data.study) showStudy(img, data.study);
    if (img.firstPreview && data.frames > 1) {  // the loader's default: the middle frame
      img.frame = Math.floor(data.frames / 2); frame.value = String(img.frame); img.firstPreview = false;
    }
    el.src = data.png;
    el.dataset.digest = data.digest;
    img.shown = true;
  } catch (e) {
    if (ticket !== img.ticket) return;
    if (!img.shown && !img.study && (e.code === "invalid_image" || e.code === "image_too_large")) {
      // (A study stays: its error may be a choice to make, e.g. which series.)
      // A file the model could never read (a text file named .png): it does not stay as a broken card.
      state.pending = state.pending.filter((p) => p !== img);
      img.card.remove();
      addError(`${img.name} was not added: ${withoutName(e.message, img.name)}`);
    } else {
      addError(img.name + ": " + withoutName(e.message, img.name));
    }
  } finally {
    if (ticket === img.ticket) el.removeAttribute("aria-busy");
  }
}

// The server names the file in its messages already (the `name` sent with each image).
function withoutName(message, name) {
  const at = message.indexOf(name + ": ");
  return at >= 0 ? message.slice(0, at) + message.slice(at + name.length + 2) : message;
}

// Centre and width show the window the picture was made with: the preset's, the file's own, or the
// percentile range used when the file has none.
function showWindow(img, used) {
  const center = img.card.querySelector(".center"), width = img.card.querySelector(".width");
  const note = img.card.querySelector(".window-note");
  if (img.window !== "custom" && used && used.center !== null) {
    center.value = String(used.center); width.value = String(used.width);
    img.center = used.center; img.width = used.width;
  }
  note.textContent = used ? "in use: " + (used.center !== null ? `${used.center} / ${used.width}, ` : "") +
    (used.source === "chosen" ? (img.window && img.window !== "custom" ? img.window + " preset" : "chosen")
                              : used.source) : "";
}

function refreshPreviews() { for (const img of state.pending) preview(img); }

const drop = $("#drop");
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", async (ev) => {
  ev.preventDefault();
  drop.classList.remove("over");
  const entries = [...ev.dataTransfer.items].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry());
  const files = [...ev.dataTransfer.files];
  const out = [];
  for (let k = 0; k < files.length; k++) {  // a dropped folder is a study: zipped here, read by the server
    if (entries[k] && entries[k].isDirectory) out.push(await folderAsZip(entries[k].name, await readTree(entries[k])));
    else out.push(files[k]);
  }
  addFiles(out);
});
$("#folder").addEventListener("change", async (ev) => {
  const files = [...ev.target.files];
  ev.target.value = "";
  if (!files.length) return;
  const top = (files[0].webkitRelativePath || files[0].name).split("/")[0];
  addFiles([await folderAsZip(top, files.map((f) => [f.webkitRelativePath || f.name, f]))]);
});
drop.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") $("#file").click(); });
$("#file").addEventListener("change", (ev) => { addFiles([...ev.target.files]); ev.target.value = ""; });

// --- conversation -------------------------------------------------------------------------

function renderTurn(turn) {
  const li = document.createElement("li");
  const q = document.createElement("p");
  q.innerHTML = '<span class="who">You</span>';
  q.append(document.createTextNode(turn.question));
  li.appendChild(q);
  if (turn.images.length) {
    const thumbs = document.createElement("div");
    thumbs.className = "thumbs";
    for (const im of turn.images) {
      const t = document.createElement("img");
      t.src = im.seen; t.alt = "What the model saw for " + im.name;
      thumbs.appendChild(t);
    }
    li.appendChild(thumbs);
  }
  const a = document.createElement("p");
  a.innerHTML = '<span class="who">Assistant</span>';
  const text = document.createElement("span");
  text.className = "answer";
  a.appendChild(text);
  const note = document.createElement("span");
  note.className = "note";
  a.appendChild(note);
  const copy = document.createElement("button");
  copy.type = "button"; copy.className = "copy"; copy.textContent = "Copy";
  copy.setAttribute("aria-label", "Copy this answer");
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(turn.answer);
      copy.textContent = "Copied";
    } catch (e) {
      showError("The browser did not allow copying; select the answer's text instead.");
    }
    setTimeout(() => { copy.textContent = "Copy"; }, 1500);
  });
  a.appendChild(copy);
  li.appendChild(a);
  $("#turns").appendChild(li);
  turn.el = text; turn.noteEl = note;
  li.scrollIntoView({ block: "end" });
}

function setBusy(busy) {
  $("#send").disabled = busy;
  $("#stop").disabled = !busy;
  $("#question").setAttribute("aria-busy", String(busy));
}

async function ask(question) {
  showError("");
  const images = state.pending.slice();
  const content = images.map((img) => ({ type: "image_url", image_url: imageSpec(img) }));
  content.push({ type: "text", text: question });
  const message = { role: "user", content };
  const turn = { question, images: images.map((i) => ({ name: i.name, seen: i.seen })), answer: "", note: "" };
  const body = {
    model: state.model, messages: [...state.history, message], stream: true, stream_options: { include_usage: true },
    temperature: Number($("#temperature").value), max_tokens: Math.max(1, Number($("#max-tokens").value)),
  };
  const schemaText = $("#schema").value.trim();
  if (schemaText) {  // the server enforces it while sampling; a schema it cannot enforce comes back as a 400
    let schema;
    try { schema = JSON.parse(schemaText); } catch (e) {
      showError(`The JSON Schema in Settings is not valid JSON (${e.message}); fix it or empty the field.`);
      $("#question").value = question;  // nothing was asked: the question stays to send again
      $("#chat").dataset.state = "error";
      return;
    }
    body.response_format = { type: "json_schema", json_schema: { name: "answer", schema } };
  }
  state.controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let first = 0, usage = null, shown = false;
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
      body: JSON.stringify(body), signal: state.controller.signal });
    if (!response.ok) {
      let data = null;
      try { data = await response.json(); } catch (e) { /* not JSON */ }
      throw new Error(explain(response.status, data));
    }
    state.turns.push(turn); renderTurn(turn); shown = true;
    state.pending = []; $("#pending").replaceChildren();
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, cut).replace(/\r$/, "");
        buffer = buffer.slice(cut + 1);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message);
        if (event.usage) usage = event.usage;
        if (event.huatuo_record) turn.record = event.huatuo_record;  // what produced the answer (the export keeps it)
        for (const choice of event.choices || []) {
          const piece = (choice.delta && choice.delta.content) || "";
          if (piece) {
            if (!first) first = performance.now();
            turn.answer += piece;
            turn.el.textContent = turn.answer;
          }
        }
      }
    }
    turn.noteEl.textContent = "";
    if (usage && first) {
      const seconds = (performance.now() - first) / 1000;
      const rate = usage.completion_tokens > 1 && seconds > 0 ? (usage.completion_tokens - 1) / seconds : 0;
      $("#stats").textContent = `last answer: first token ${((first - started) / 1000).toFixed(2)} s, ` +
        `${rate.toFixed(1)} tokens/s`;
    }
    $("#chat").dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") {
      turn.note = " (stopped)";
      if (turn.noteEl) turn.noteEl.textContent = turn.note;
      $("#chat").dataset.state = "stopped";
    } else {
      showError(e.message);
      $("#chat").dataset.state = "error";
      if (!shown) { setBusy(false); state.controller = null; return; }
    }
  }
  state.history.push(message, { role: "assistant", content: turn.answer });
  state.controller = null;
  setBusy(false);
  $("#question").focus();
}

$("#ask").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const question = $("#question").value.trim();
  if (!question || state.controller) return;
  $("#question").value = "";
  $("#chat").dataset.state = "asking";
  ask(question);
});

$("#question").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {  // Shift+Enter: a new line
    ev.preventDefault();
    $("#ask").requestSubmit();
  }
});

$("#stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });

$("#new").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.history = []; state.turns = []; state.pending = [];
  $("#turns").replaceChildren(); $("#pending").replaceChildren();
  $("#stats").textContent = ""; showError("");
  $("#question").focus();
});

$("#export").addEventListener("click", () => {
  const lines = [`# huatuo-local conversation (${state.model})`, "", `_${$("#notice").textContent}_`, ""];
  for (const t of state.turns) {
    const names = t.images.map((i) => i.name).join(", ");
    lines.push(`**You**${names ? " (images: " + names + ")" : ""}: ${t.question}`, "");
    lines.push(`**Assistant**: ${t.answer}${t.note}`, "");
    if (t.record) {  // the answer's record: model files, engine, settings, seed, each picture's digest
      lines.push("<details><summary>record</summary>", "", "```json", JSON.stringify(t.record, null, 2), "```", "",
        "</details>", "");
    }
  }
  const blob = new Blob([lines.join("\n")], { type: "text/markdown;charset=utf-8" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "huatuo-conversation.md";
  document.body.appendChild(link);
  link.click();
  link.remove();
});

loadStatus();
