// The built-in search page. It talks to the service only through the public API, with relative URLs so that
// it also works behind a reverse proxy under a path prefix. No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
// query: the search shown, {base: its query part, file, label, preview, refine: [{url, weight}]}; null before one.
// asked: how many searches were sent; only the answer to the latest one is shown.
const state = { models: [], busy: 0, query: null, asked: 0 };

class ApiError extends Error {
  constructor(status, body, message) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

// One line a person can act on, from any error body the API answers with.
function describe(status, body) {
  if (body && Array.isArray(body.detail)) {
    return body.detail.map((d) => {
      const where = (d.loc || []).filter((p) => p !== "body").join(".");
      return `${where ? where + ": " : ""}${d.msg}${d.type ? ` (${d.type})` : ""}`;
    }).join("; ");
  }
  if (body && typeof body.detail === "string") {
    const models = Array.isArray(body.models) ? ` Loaded models: ${body.models.join(", ")}.` : "";
    return `${body.detail}${body.type ? ` (${body.type})` : ""}${models}`;
  }
  return `The service answered HTTP ${status}.`;
}

function setBusy(delta) {
  state.busy += delta;
  $("busy").hidden = state.busy === 0;
  document.body.setAttribute("aria-busy", state.busy > 0 ? "true" : "false");
}

// fetch() a route of the API: JSON in (or a FormData), JSON out; an ApiError for any non-2xx answer.
// `quiet`: no busy indicator (a running job is polled about once a second: the spinner would flicker).
async function api(path, { json, form, method, quiet } = {}) {
  const init = { method: method || (json !== undefined || form ? "POST" : "GET"), headers: {} };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form) {
    init.body = form;
  }
  if (!quiet) setBusy(1);
  try {
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, null, `Cannot reach the Idios service (${err.message}).`);
    }
    const isJson = (resp.headers.get("Content-Type") || "").includes("application/json");
    const body = resp.status === 204 ? null : isJson ? await resp.json() : await resp.text();
    if (!resp.ok) throw new ApiError(resp.status, body, describe(resp.status, body));
    return body;
  } finally {
    if (!quiet) setBusy(-1);
  }
}

function show(id, text, kind) {
  const el = $(id);
  el.textContent = text;
  el.className = `status ${kind || ""}`;
  el.hidden = !text;
}

// Run `work` for a form: its buttons are disabled meanwhile, and a failure is shown in the form's status line.
async function guarded(statusId, form, work) {
  const buttons = form ? form.querySelectorAll("button") : [];
  buttons.forEach((b) => { b.disabled = true; });
  show(statusId, "");
  try {
    await work();
  } catch (err) {
    show(statusId, err.message, "error");
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
  }
}

const model = () => $("model").value;
const route = (name) => `models/${encodeURIComponent(model())}/${name}`;
const isWeb = (url) => /^https?:\/\//i.test(url);

function parseJsonField(text, what) {
  if (!text.trim()) return undefined;
  let value;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new Error(`${what} is not valid JSON: ${err.message}`);
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new Error(`${what} must be a JSON object, like {"key": "value"}.`);
  }
  return value;
}

// ---- models and counts ----

async function refreshCount() {
  const name = model();
  if (!name) return;
  const n = await api(`models/${encodeURIComponent(name)}/count`);
  const option = [...$("model").options].find((o) => o.value === name);
  if (option) option.textContent = `${name} (${n})`;
  if (name === model()) $("count").textContent = `${n} image${n === 1 ? "" : "s"}`;
}

function onModelChange() {
  const info = state.models.find((m) => m.name === model());
  $("search-text-form").hidden = !(info && info.text);
  $("results").replaceChildren();
  $("query").hidden = true;
  state.query = null;
  state.asked++;  // an answer still on its way was for the other model
  show("search-status", "");
  refreshCount().catch((err) => show("page-status", err.message, "error"));
  document.dispatchEvent(new CustomEvent("modelchange", { detail: model() }));  // duplicates.js follows it
}

async function loadModels() {
  state.models = (await api("models")).filter((m) => !m.refused);  // refused: not served (see GET /models)
  const select = $("model");
  select.replaceChildren(...state.models.map((m) => new Option(m.name, m.name)));
  if (!state.models.length) {
    show("page-status", "No model is loaded: add a model folder to the service's models directory.", "error");
    return;
  }
  const counts = await Promise.allSettled(
    state.models.map((m) => api(`models/${encodeURIComponent(m.name)}/count`)));
  counts.forEach((c, i) => {
    if (c.status === "fulfilled") select.options[i].textContent = `${state.models[i].name} (${c.value})`;
  });
  onModelChange();
}

// ---- search ----

function searchOptions() {
  const opts = {};
  const limit = $("limit").value.trim();
  const minSim = $("min-similarity").value.trim();
  if (limit) opts.limit = Number(limit);
  if (minSim) opts.min_similarity = Number(minSim);
  const filter = parseJsonField($("filter").value, "The metadata filter");
  if (filter) opts.filter = filter;
  return opts;
}

// "More like this" / "Less like this" on a hit add that stored image to the query as a weighted part
// (search's `queries`): the query itself weighs 1.
const MORE = 1;
const LESS = -0.5;
const REFINE_MAX = 9;  // a search takes at most 10 query parts (idios/api/schemas.py QUERY_PARTS_MAX)

function showQuery(q) {
  const box = $("query");
  const parts = [];
  if (q.preview) {
    const img = document.createElement("img");
    img.src = q.preview;
    img.alt = "";
    img.referrerPolicy = "no-referrer";
    parts.push(img);
  }
  const span = document.createElement("span");
  span.textContent = q.label;
  parts.push(span);
  for (const r of q.refine) {
    const chip = document.createElement("span");
    const what = `${r.weight > 0 ? "more" : "less"} like`;
    chip.className = `refinement ${r.weight > 0 ? "more" : "less"}`;
    chip.title = `${what} ${r.url} (weight ${r.weight})`;
    const thumb = document.createElement("img");
    thumb.src = thumbSource(r.url);
    thumb.alt = "";
    thumb.referrerPolicy = "no-referrer";
    const text = document.createElement("span");
    text.textContent = what;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove “${what} ${r.url}”`);
    remove.addEventListener("click", () => runQuery({ ...q, refine: q.refine.filter((x) => x !== r) }));
    if (isWeb(r.url)) chip.append(thumb);
    chip.append(text, remove);
    parts.push(chip);
  }
  box.replaceChildren(...parts);
  box.hidden = false;
}

// The search request for a query: the plain search while nothing is refined, else a weighted `queries` search.
function queryRequest(q, opts) {
  const fields = !q.refine.length ? (q.base.image ? {} : { ...q.base })
    : { queries: [{ ...q.base, weight: 1 }, ...q.refine.map((r) => ({ indexed: r.url, weight: r.weight }))] };
  if (!q.file) return { json: { ...fields, ...opts } };
  const form = new FormData();
  form.append("image", q.file, q.file.name || "image");
  for (const [k, v] of Object.entries({ ...fields, ...opts })) {
    form.append(k, typeof v === "object" ? JSON.stringify(v) : String(v));
  }
  return { form };
}

// The shown query with `url` added as a part (or, when it is one already, turned to `weight`), searched.
function refine(url, weight) {
  const q = state.query;
  const known = q.refine.some((r) => r.url === url);
  if (!known && q.refine.length >= REFINE_MAX) {
    return show("search-status", `At most ${REFINE_MAX} hits can refine a search: remove one above first.`, "error");
  }
  const refined = known ? q.refine.map((r) => (r.url === url ? { url, weight } : r)) : [...q.refine, { url, weight }];
  return runQuery({ ...q, refine: refined });
}

// A IIIF Image API request (the same pattern as idios/iiif.py IMAGE_REQUEST, query string included): its
// thumbnail comes through the Image API (idios.iiif.thumbnail names the first choice) instead of the master.
const IIIF_IMAGE = new RegExp(
  "^([hH][tT][tT][pP][sS]?://[^/?#]+/[^?#]*[^/?#])/" +
  "(full|square|\\d+,\\d+,\\d+,\\d+|pct:\\d+(?:\\.\\d+)?,\\d+(?:\\.\\d+)?,\\d+(?:\\.\\d+)?,\\d+(?:\\.\\d+)?)/" +
  "(full|\\^?max|\\^?\\d+,|\\^?,\\d+|\\^?!?\\d+,\\d+|\\^?pct:\\d+(?:\\.\\d+)?)/" +
  "(!?\\d+(?:\\.\\d+)?)/(default|color|gray|bitonal|native|grey|colour)\\.(jpg|jpeg|png|gif|webp|tif|tiff|jp2|pdf)" +
  "(\\?[^#]*)?$");
const THUMB_SIDE = 200;

// What to show for a stored url, best first: for a IIIF image, a 200-px derivative fitting the box (!w,h: level
// 2), then 200 px wide (w,: level 1), then the url itself; for any other url, the url.
function thumbSources(url, metadata = null) {
  const m = IIIF_IMAGE.exec(url);
  const service = metadata && metadata.iiif_service;
  let base = null, region = "full", rotation = "0", quality = "default", query = "";
  if (m) {
    [base, region, rotation, quality, query] = [m[1], m[2], m[4], m[5], m[7] || ""];
  } else if (typeof service === "string" && isWeb(service) &&
             url.replace(/\/$/, "") === service.replace(/\/$/, "")) {
    base = service.replace(/\/$/, "");  // a bare service base: the service bulk_ingest recorded for it
  }
  if (!base) return [url];
  const at = (size) => `${base}/${region}/${size}/${rotation}/${quality}.jpg${query}`;
  return [at(`!${THUMB_SIDE},${THUMB_SIDE}`), at(`${THUMB_SIDE},`), url];
}

function thumbSource(url, metadata = null) {
  return thumbSources(url, metadata)[0];
}

// A thumbnail of a stored image linking to it (its url, loaded by the browser); a plain box for a url that is
// only an id. Also used by duplicates.js.
function thumbLink(url, alt, metadata) {
  const link = document.createElement(isWeb(url) ? "a" : "div");
  link.className = "thumb";
  if (isWeb(url)) {
    link.href = url;
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    const img = document.createElement("img");
    const sources = thumbSources(url, metadata);
    img.src = sources.shift();
    img.alt = alt;
    img.loading = "lazy";
    img.referrerPolicy = "no-referrer";
    // a server that cannot cut that size (a level-0 or level-1 IIIF server): the next choice, then give up
    img.addEventListener("error", () => (sources.length ? (img.src = sources.shift()) : link.classList.add("broken")));
    link.append(img);
  }
  return link;
}

function hitCard(hit, rank) {
  const li = document.createElement("li");
  li.className = "hit";
  const link = thumbLink(hit.url, `result ${rank}`, hit.metadata);
  const sim = document.createElement("p");
  sim.className = "similarity";
  sim.textContent = `#${rank} · ${hit.similarity.toFixed(1)}`;
  sim.title = "similarity, 100 = identical";
  const url = document.createElement("p");
  url.className = "url";
  url.textContent = hit.url;
  const actions = document.createElement("div");
  actions.className = "refine";
  const chosen = state.query && state.query.refine.find((r) => r.url === hit.url);
  for (const [text, weight] of [["More like this", MORE], ["Less like this", LESS]]) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = `secondary ${weight > 0 ? "more" : "less"}`;
    button.textContent = text;
    button.setAttribute("aria-pressed", String(!!chosen && chosen.weight === weight));
    button.addEventListener("click", () => refine(hit.url, weight));
    actions.append(button);
  }
  li.append(link, sim, url, actions);
  const manifest = hit.metadata && hit.metadata.iiif_manifest;
  if (typeof manifest === "string" && isWeb(manifest)) {  // bulk_ingest's IIIF input records it
    const a = document.createElement("a");
    a.className = "manifest";
    a.href = manifest;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    a.textContent = "IIIF manifest";
    a.title = manifest;
    li.append(a);
  }
  if (hit.metadata && Object.keys(hit.metadata).length) {
    const meta = document.createElement("pre");
    meta.className = "metadata";
    meta.textContent = JSON.stringify(hit.metadata, null, 1);
    li.append(meta);
  }
  return li;
}

// Search for `q` (a new search, or the shown one refined by a hit's buttons or a removed refinement) and show
// its answer: only then does `q` become the query shown, so a failed search leaves the page as it was, and an
// answer that comes after a later search was sent is dropped.
async function runQuery(q, form = null) {
  const asked = ++state.asked;
  await guarded("search-status", form, async () => {
    const hits = await api(route("search"), queryRequest(q, searchOptions()));
    if (asked !== state.asked) return;  // a later search was sent meanwhile: its answer is the one to show
    state.query = q;
    showQuery(q);
    $("results").replaceChildren(...hits.map((h, i) => hitCard(h, i + 1)));
    show("search-status", hits.length ? `${hits.length} result${hits.length === 1 ? "" : "s"}, best first.`
      : "No stored image matches.", "ok");
  });
}

function search(form, base, file, label, preview) {
  return runQuery({ base, file, label, preview, refine: [] }, form);
}

function searchFile(file) {
  if (!file) return;
  search(null, { image: true }, file, `Query: ${file.name || "pasted image"}`, URL.createObjectURL(file));
}

function searchUrl(url) {
  url = url.trim();
  if (!url) return show("search-status", "Enter the URL of an image to search with.", "error");
  return search($("search-url-form"), { url }, null, `Query: ${url}`, isWeb(url) ? thumbSource(url) : null);
}

function searchText(text) {
  if (!text.trim()) return show("search-status", "Enter some text to search for.", "error");
  return search($("search-text-form"), { text }, null, `Query: “${text}”`, null);
}

function wireDrop() {
  const drop = $("drop");
  const stop = (e) => { e.preventDefault(); e.stopPropagation(); };
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { stop(e); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { stop(e); drop.classList.remove("over"); }));
  drop.addEventListener("drop", (e) => {
    const file = e.dataTransfer.files[0];
    if (file) return searchFile(file);
    const url = (e.dataTransfer.getData("text/uri-list") || e.dataTransfer.getData("text/plain") || "").split("\n")[0];
    if (url) {
      $("search-url").value = url.trim();
      searchUrl(url);
    }
  });
  $("search-file").addEventListener("change", (e) => {
    searchFile(e.target.files[0]);
    e.target.value = "";
  });
  document.addEventListener("paste", (e) => {
    if (e.target instanceof HTMLInputElement || e.target instanceof HTMLTextAreaElement) return;
    const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (item) searchFile(item.getAsFile());
  });
}

// ---- add ----

async function addImage(e) {
  e.preventDefault();
  const form = $("add-form");
  await guarded("add-status", form, async () => {
    const url = $("add-url").value.trim();
    if (!url) throw new Error("Enter the image URL; with an uploaded file it is the image's id.");
    const metadata = parseJsonField($("add-metadata").value, "Metadata");
    const file = $("add-file").files[0];
    const replace = $("add-replace").checked;
    let request;
    if (file) {
      const data = new FormData();
      data.append("url", url);
      data.append("image", file, file.name || "image");
      if (metadata) data.append("metadata", JSON.stringify(metadata));
      request = { form: data };
    } else {
      request = { json: metadata ? { url, metadata } : { url } };
    }
    try {
      await api(route(replace ? "add" : "search_add"), request);
      show("add-status", `${replace ? "Stored" : "Added"}: ${url}`, "ok");
      form.reset();
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 409)) throw err;
      show("add-status", `Already there: ${url} (tick “Replace” to store it again).`, "warn");
    }
    await refreshCount();
  });
}

// ---- compare ----

async function compare(e) {
  e.preventDefault();
  const form = $("compare-form");
  await guarded("compare-status", form, async () => {
    const sides = [["url", "image", "compare-a"], ["other", "other_image", "compare-b"]].map(([field, fileField, id]) => (
      { field, fileField, url: $(id).value.trim(), file: $(`${id}-file`).files[0] }));
    for (const [i, side] of sides.entries()) {
      if (!side.url && !side.file) throw new Error(`Give the ${i ? "second" : "first"} image: a URL or a file.`);
    }
    let request;
    if (sides.some((s) => s.file)) {
      const data = new FormData();
      for (const s of sides) {
        if (s.file) data.append(s.fileField, s.file, s.file.name || "image");
        else data.append(s.field, s.url);
      }
      request = { form: data };
    } else {
      request = { json: { url: sides[0].url, other: sides[1].url } };
    }
    const score = await api(route("compare"), request);
    show("compare-status", `Similarity ${Number(score).toFixed(1)} / 100`, "ok");
  });
}

window.addEventListener("DOMContentLoaded", () => {
  $("model").addEventListener("change", onModelChange);
  $("search-url-form").addEventListener("submit", (e) => { e.preventDefault(); searchUrl($("search-url").value); });
  $("search-text-form").addEventListener("submit", (e) => { e.preventDefault(); searchText($("search-text").value); });
  $("add-form").addEventListener("submit", addImage);
  $("compare-form").addEventListener("submit", compare);
  wireDrop();
  loadModels().catch((err) => show("page-status", `Could not load the models: ${err.message}`, "error"));
});
