// The demo page. Every action is one call to the service's JSON API; a failed call shows
// the API's error.message where the action was asked for, never nothing.
"use strict";

const $ = (id) => document.getElementById(id);
const BACKBONES = { vilbert: "ViLBERT", lxmert: "LXMERT" };
const GALLERY = "demo";
const MAX_DISPLAY = { width: 400, height: 420 }; // CSS pixels of the shown image

const state = {
  model: null, // name@version of the chosen model
  image: null, // {b64, name, sample}
  samples: [], // from /static/samples/index.json
  regions: [], // the detector's regions of the current image, from /v1/vqa
  grounding: null, // the last /v1/ground result
  galleryReady: false,
  apiKey: sessionStorage.getItem("vqa-api-key") || "",
};

class ApiError extends Error {
  constructor(status, code, message, requestId = null) {
    super(message);
    Object.assign(this, { status, code, requestId });
  }
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  node.append(...children);
  return node;
}

// -- talking to the service ----------------------------------------------------------
async function api(method, path, body, { auth = false } = {}) {
  const headers = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  if (auth && state.apiKey) headers.authorization = `Bearer ${state.apiKey}`;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(0, "network", `The service cannot be reached (${err.message}).`);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const e = (data && data.error) || {};
    const message = e.message || `${response.status} ${response.statusText}`.trim();
    throw new ApiError(response.status, e.code || "http_error", message, e.request_id);
  }
  return data;
}

function blobToBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(new ApiError(0, "read_error", "The file could not be read."));
    reader.readAsDataURL(blob);
  });
}

async function fetchBlob(path) {
  const response = await fetch(path);
  if (!response.ok) throw new ApiError(response.status, "not_found", `${path} is missing`);
  return response.blob();
}

// -- errors and busy buttons ---------------------------------------------------------
function showError(box, err) {
  const details = [
    err.status ? `HTTP ${err.status}` : null,
    err.code,
    err.requestId ? `request ${err.requestId}` : null,
  ];
  box.replaceChildren(err.message, el("small", { textContent: details.filter(Boolean).join(" · ") }));
  box.hidden = false;
}

function clearError(box) {
  box.hidden = true;
  box.replaceChildren();
}

// Run one user action: disable its button while any call of it is out, clear its old
// error, show a new one unless the image changed meanwhile (then the error is old news).
const pending = new Map(); // button -> calls out
async function act(button, errorBox, task, { perImage = true } = {}) {
  const image = state.image;
  clearError(errorBox);
  pending.set(button, (pending.get(button) || 0) + 1);
  button.disabled = true;
  try {
    await task();
  } catch (err) {
    if (perImage && state.image !== image) return;
    showError(errorBox, err instanceof ApiError ? err : new ApiError(0, "page_error", String(err)));
  } finally {
    pending.set(button, pending.get(button) - 1);
    button.disabled = pending.get(button) > 0;
  }
}

function requireImage() {
  if (!state.image) throw new ApiError(0, "no_image", "Choose an image first: upload one or pick a sample.");
  return state.image.b64;
}

// -- models --------------------------------------------------------------------------
async function waitUntilReady() {
  for (;;) {
    try {
      await api("GET", "/readyz");
      $("banner").hidden = true;
      return;
    } catch (err) {
      showError($("banner"), new ApiError(err.status, err.code, `The service is not ready yet: ${err.message}. Retrying…`));
      await new Promise((r) => setTimeout(r, 2000));
    }
  }
}

async function loadModels() {
  const order = Object.keys(BACKBONES);
  const rank = (m) => (order.includes(m.backbone) ? order.indexOf(m.backbone) : order.length);
  const models = (await api("GET", "/v1/models")).sort((a, b) => rank(a) - rank(b));
  const group = $("models");
  group.replaceChildren();
  if (!models.length) throw new ApiError(0, "no_models", "The service has no models loaded.");
  for (const m of models) {
    const ref = `${m.name}@${m.version}`;
    const input = el("input", { type: "radio", name: "model", value: ref, checked: !group.children.length });
    input.addEventListener("change", () => selectModel(ref));
    const label = el(
      "label",
      { title: `${ref}, detector ${m.detector || "none"}` },
      input,
      el("span", { className: "name", textContent: BACKBONES[m.backbone] || m.backbone }),
      el("span", { className: "ref", textContent: ref }),
    );
    group.append(label);
  }
  state.model = `${models[0].name}@${models[0].version}`;
}

function selectModel(ref) {
  state.model = ref;
  if (state.image) ask();
}

// -- the image and its boxes ---------------------------------------------------------
async function loadSamples() {
  const index = await api("GET", "/static/samples/index.json");
  state.samples = index.samples;
  const strip = $("samples");
  for (const sample of state.samples) {
    const button = el(
      "button",
      { type: "button", title: sample.captions[0] || sample.id },
      el("img", { src: `/static/samples/${sample.file}`, alt: `sample ${sample.id}` }),
    );
    button.dataset.sample = sample.id;
    button.setAttribute("aria-pressed", "false");
    button.addEventListener("click", () => useSample(sample));
    strip.append(button);
  }
}

async function useSample(sample) {
  const blob = await fetchBlob(`/static/samples/${sample.file}`);
  const others = state.samples.filter((s) => s !== sample);
  const other = others[(state.samples.indexOf(sample) + 1) % others.length];
  $("question").value = sample.questions[0]?.question || "";
  $("expression").value = sample.refexps[0] || "";
  $("texts").value = [sample.captions.at(-2), other?.captions.at(-2)].filter(Boolean).join("\n");
  $("caption").value = sample.captions.at(-2) || "";
  await setImage(blob, sample.id, sample);
}

async function setImage(blob, name, sample = null) {
  state.image = { b64: await blobToBase64(blob), name, sample };
  state.regions = [];
  state.grounding = null;
  for (const id of ["answers", "scores", "ground-result", "ask-meta", "match-meta"]) $(id).replaceChildren();
  for (const id of ["ask-error", "ground-error", "match-error"]) clearError($(id));
  for (const b of $("samples").children) b.setAttribute("aria-pressed", String(b.dataset.sample === sample?.id));
  const img = $("image");
  if (img.src) URL.revokeObjectURL(img.src);
  $("overlay").replaceChildren();
  $("frame").hidden = false;
  $("placeholder").hidden = true;
  $("image-caption").textContent = name;
  img.src = URL.createObjectURL(blob);
  if ($("question").value.trim()) ask();
}

function fitImage() {
  const img = $("image");
  const { naturalWidth: w, naturalHeight: h } = img;
  const maxWidth = Math.min(MAX_DISPLAY.width, $("stage").clientWidth - 16);
  const scale = Math.min(maxWidth / w, MAX_DISPLAY.height / h);
  img.style.width = `${Math.round(w * scale)}px`;
  img.style.imageRendering = scale >= 2 ? "pixelated" : "auto"; // keep small scenes crisp
  $("image-caption").textContent = `${state.image?.name || ""} · ${w}×${h} pixels`;
  drawBoxes();
}

function imageFailed() {
  $("frame").hidden = true;
  const p = $("placeholder");
  p.hidden = false;
  p.textContent = `The browser cannot display ${state.image?.name || "this file"}; see the service's answer on the right.`;
}

// Boxes are in the image's pixels; percentages of the shown image keep them in place at any scale.
function boxElement([x1, y1, x2, y2], kind, text) {
  const { naturalWidth: w, naturalHeight: h } = $("image");
  const box = el("div", { className: `box ${kind}` }, el("span", { className: "tag", textContent: text }));
  Object.assign(box.style, {
    left: `${(100 * x1) / w}%`,
    top: `${(100 * y1) / h}%`,
    width: `${(100 * (x2 - x1)) / w}%`,
    height: `${(100 * (y2 - y1)) / h}%`,
  });
  if (y1 / h < 0.12) box.classList.add("top"); // no room above: the tag goes inside
  if (x1 / w > 0.5) box.classList.add("right"); // tags grow leftwards near the right edge
  return box;
}

function drawBoxes() {
  const overlay = $("overlay");
  overlay.replaceChildren();
  if (!$("image").naturalWidth) return;
  for (const r of state.regions) {
    const name = [r.attributes?.color, r.label].filter(Boolean).join(" ");
    overlay.append(boxElement(r.box, "region", name));
  }
  const g = state.grounding;
  if (g) overlay.append(boxElement(g.box, "grounded", `${g.expression} · ${percent(g.score)}`));
}

// -- results -------------------------------------------------------------------------
function percent(p) {
  return `${(100 * p).toFixed(p >= 0.995 || p < 0.005 ? 1 : 0)}%`;
}

function renderBars(list, rows) {
  list.replaceChildren(
    ...rows.map(([label, score]) => {
      const fill = el("span", { className: "fill" });
      fill.style.width = `${Math.max(0, Math.min(1, score)) * 100}%`;
      return el(
        "li",
        {},
        el("span", { className: "label", textContent: label, title: label }),
        el("span", { className: "track" }, fill),
        el("span", { className: "value", textContent: score.toFixed(3) }),
      );
    }),
  );
}

async function ask() {
  await act($("ask"), $("ask-error"), async () => {
    $("answers").replaceChildren();
    $("ask-meta").replaceChildren();
    const question = $("question").value;
    const image = state.image;
    const body = { image: requireImage(), questions: [question], model: state.model, top_k: 5 };
    const res = await api("POST", "/v1/vqa", body);
    if (state.image !== image) return; // the image changed while we waited
    state.regions = res.regions;
    drawBoxes();
    renderBars($("answers"), res.answers[0].answers.map((a) => [a.answer, a.score]));
    const truth = state.image.sample?.questions.find((q) => q.question === question.trim());
    $("ask-meta").append(`${res.model} · ${res.regions.length} regions detected`);
    if (truth) $("ask-meta").append(" · the scene's answer: ", el("span", { className: "truth", textContent: truth.answer }));
  });
}

async function ground() {
  await act($("ground"), $("ground-error"), async () => {
    $("ground-result").replaceChildren();
    const image = state.image;
    const body = { image: requireImage(), expressions: [$("expression").value], model: state.model };
    const res = await api("POST", "/v1/ground", body);
    if (state.image !== image) return;
    const g = res.results[0];
    state.grounding = g;
    drawBoxes();
    const box = g.box.map((v) => Math.round(v)).join(", ");
    $("ground-result").append(
      `“${g.expression}” is region ${g.region_index} at [${box}], `,
      el("span", { className: "pill", textContent: percent(g.score) }),
      ` · ${res.model}`,
    );
  });
}

async function match() {
  await act($("match"), $("match-error"), async () => {
    $("scores").replaceChildren();
    $("match-meta").replaceChildren();
    const texts = $("texts").value.split("\n").map((t) => t.trim()).filter(Boolean);
    const res = await api("POST", "/v1/match", { image: requireImage(), texts, model: state.model });
    renderBars($("scores"), res.scores.map((s) => [s.text, s.score]));
    $("match-meta").textContent = `${res.model} · probability that each text describes the image`;
  });
}

// -- the demo gallery ----------------------------------------------------------------
function withKeyHint(err) {
  if (err.status === 401) {
    $("key-row").hidden = false;
    err.message = `${err.message}. This service protects gallery writes: enter its API key and search again.`;
  }
  return err;
}

// Create gallery "demo" from the samples unless it is there; 409 means someone beat us to it.
async function ensureGallery() {
  if (state.galleryReady) return;
  state.apiKey = $("api-key").value.trim();
  sessionStorage.setItem("vqa-api-key", state.apiKey);
  let info = null;
  try {
    info = await api("GET", `/v1/galleries/${GALLERY}`);
  } catch (err) {
    if (err.status !== 404) throw err;
  }
  if (!info) {
    try {
      await api("PUT", `/v1/galleries/${GALLERY}`, { model: state.model }, { auth: true });
    } catch (err) {
      if (err.status !== 409) throw withKeyHint(err);
    }
  }
  if (!info || info.count === 0) {
    const images = await Promise.all(
      state.samples.map(async (s) => ({ id: s.id, image: await blobToBase64(await fetchBlob(`/static/samples/${s.file}`)) })),
    );
    try {
      await api("POST", `/v1/galleries/${GALLERY}/images`, { images }, { auth: true });
    } catch (err) {
      if (err.status !== 409) throw withKeyHint(err);
    }
  }
  state.galleryReady = true;
}

function hitFigure(hit, rank) {
  const sample = state.samples.find((s) => s.id === hit.id);
  const thumb = sample
    ? el("img", { src: `/static/samples/${sample.file}`, alt: hit.id })
    : el("span", { className: "missing", textContent: hit.id });
  const button = el("button", { type: "button", title: sample ? "use this image" : hit.id }, thumb);
  if (sample) button.addEventListener("click", () => useSample(sample));
  const caption = el("figcaption", {}, el("b", { textContent: `#${rank} ` }), `${hit.score.toFixed(3)}`);
  const figure = el("figure", { className: "hit" }, button, caption);
  figure.dataset.id = hit.id;
  return figure;
}

async function search() {
  await act($("search"), $("search-error"), async () => {
    $("hits").replaceChildren();
    $("search-meta").replaceChildren();
    await ensureGallery();
    const body = { caption: $("caption").value, k: 6 };
    const res = await api("POST", `/v1/galleries/${GALLERY}/search`, body);
    $("hits").replaceChildren(...res.results.map((hit, i) => hitFigure(hit, i + 1)));
    $("search-meta").textContent = res.results.length
      ? `gallery “${GALLERY}” · ranked by ${res.model} · click a hit to use it`
      : `gallery “${GALLERY}” has no images yet`;
  }, { perImage: false });
}

// -- wiring --------------------------------------------------------------------------
function onSubmit(id, handler) {
  $(id).addEventListener("submit", (event) => {
    event.preventDefault();
    handler();
  });
}

function wire() {
  onSubmit("ask-form", ask);
  onSubmit("ground-form", ground);
  onSubmit("match-form", match);
  onSubmit("search-form", search);
  onSubmit("key-row", search);
  $("image").addEventListener("load", fitImage);
  $("image").addEventListener("error", imageFailed);
  $("show-regions").addEventListener("change", (e) => $("overlay").classList.toggle("no-regions", !e.target.checked));
  $("api-key").value = state.apiKey;
  $("file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) setImage(file, file.name);
    e.target.value = ""; // choosing the same file again fires again
  });
  const stage = $("stage");
  stage.addEventListener("dragover", (e) => {
    e.preventDefault();
    stage.classList.add("dragging");
  });
  stage.addEventListener("dragleave", () => stage.classList.remove("dragging"));
  stage.addEventListener("drop", (e) => {
    e.preventDefault();
    stage.classList.remove("dragging");
    const file = e.dataTransfer.files[0];
    if (file) setImage(file, file.name);
  });
}

async function main() {
  wire();
  await waitUntilReady();
  try {
    await loadModels();
    await loadSamples();
  } catch (err) {
    showError($("banner"), err);
    return;
  }
  if (state.samples.length && !state.image) await useSample(state.samples[0]);
  document.body.dataset.ready = "true";
}

main();
