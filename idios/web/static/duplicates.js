// The duplicates view of the built-in page: start a duplicates job for the chosen model, follow its progress,
// cancel it, and page through its groups. Loaded after app.js, whose helpers ($, api, show, model, ...) it uses;
// like app.js it talks to the service only through the public API (POST /models/{m}/duplicates, /jobs...).
"use strict";

const POLL_MS = 700;
// `gen` changes whenever the view starts over (another model, another job): an answer that arrives for an
// older generation is dropped instead of drawing one model's job into another's view.
// `starting` holds "Find duplicates" disabled while its request is out, whatever a background read shows meanwhile.
const dup = { job: null, gen: 0, timer: 0, next: null, starting: false };

const jobPath = (id, rest = "") => `jobs/${encodeURIComponent(id)}${rest}`;
const plural = (n, word) => `${n.toLocaleString()} ${word}${n === 1 ? "" : "s"}`;

function stopPolling() {
  clearTimeout(dup.timer);
  dup.timer = 0;
}

function resetDuplicates() {
  stopPolling();
  dup.gen += 1;
  dup.job = null;
  dup.next = null;
  $("dup-job").hidden = true;
  $("dup-groups").replaceChildren();
  $("dup-more").hidden = true;
  $("dup-cancel").hidden = true;
  $("dup-start").disabled = false;
  show("dup-status", "");
  return dup.gen;
}

function jobText(job) {
  const settings = [`min. similarity ${job.min_similarity}`];
  if (job.filter) settings.push(`filter ${JSON.stringify(job.filter)}`);
  const of = `${job.done.toLocaleString()} of ${plural(job.total, "image")}`;
  switch (job.state) {
    case "running": {
      const pct = job.total ? Math.floor((100 * job.done) / job.total) : 0;
      return `Running: ${of} examined (${pct}%), ${settings.join(", ")}.`;
    }
    case "done":
      return `Done: ${plural(job.groups, "group")} of near-copies among ${plural(job.total, "image")}, ` +
        `${settings.join(", ")}.`;
    case "cancelled":
      return `Cancelled after ${of}.`;
    case "failed":
      return `Failed after ${of}: ${job.error || "the service gave no reason"}.`;
    default:
      return `${job.state}: ${of}.`;
  }
}

// Draw a job record; the data- attributes carry the raw figures for scripts and tests.
function showJob(job) {
  dup.job = job;
  const box = $("dup-job");
  box.hidden = false;
  Object.assign(box.dataset, { job: job.job, state: job.state, done: job.done, total: job.total });
  const progress = $("dup-progress");
  progress.max = Math.max(job.total, 1);
  progress.value = job.state === "done" ? progress.max : job.done;
  $("dup-state").textContent = jobText(job);
  const running = job.state === "running";
  $("dup-cancel").hidden = !running;
  $("dup-start").disabled = running || dup.starting;
}

// What tells a group's members apart in a narrow caption: the url's last path segment and its query (the
// copies of a group often share the whole host and folder); the whole url is its title.
function shortName(url) {
  try {
    const u = new URL(url);
    const last = u.pathname.split("/").filter(Boolean).pop() || u.host;
    return `${decodeURIComponent(last)}${u.search}`;
  } catch {
    return url;  // not a URL: an id of an uploaded image
  }
}

function groupThumb(url, n) {
  const li = document.createElement("li");
  const link = thumbLink(url, `copy ${n}`);  // app.js
  link.title = url;
  const caption = document.createElement("p");
  caption.className = "url";
  caption.textContent = shortName(url);
  caption.title = url;
  li.append(link, caption);
  return li;
}

function groupRow(group) {
  const li = document.createElement("li");
  li.className = "group";
  const info = document.createElement("p");
  info.className = "group-info";
  const sim = document.createElement("span");
  sim.className = "similarity";
  sim.textContent = `≥ ${group.similarity.toFixed(1)}`;
  sim.title = "the lowest similarity between two images of the group, 100 = identical";
  const size = document.createElement("span");
  size.className = "size";
  size.textContent = plural(group.size, "image");
  info.append(sim, size);
  if (group.exact === true) {
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = "exact copies";
    badge.title = "the same picture by its perceptual hash: copies, resizes, re-encodings";
    info.append(badge);
  }
  const strip = document.createElement("ul");
  strip.className = "strip";
  strip.append(...group.urls.map((url, i) => groupThumb(url, i + 1)));
  li.append(info, strip);
  return li;
}

function pageSize() {
  const raw = $("dup-limit").value.trim();
  const n = raw ? Number(raw) : 20;
  if (!Number.isInteger(n) || n < 1 || n > 1000) throw new Error("Groups per page must be a whole number from 1 to 1000.");
  return n;
}

// One page of the finished job's groups, appended below those shown.
async function loadGroups(gen, cursor) {
  const params = new URLSearchParams({ limit: String(pageSize()) });
  if (cursor) params.set("cursor", cursor);
  // the first page comes by itself (a job found done): quietly, as every background read here, so the busy
  // indicator stays for what the user asked; "More groups" shows it
  const page = await api(`${jobPath(dup.job.job, "/groups")}?${params}`, { quiet: !cursor });
  if (gen !== dup.gen) return;
  $("dup-groups").append(...page.groups.map(groupRow));
  dup.next = page.next;
  $("dup-more").hidden = !page.next;
  if (!cursor && !page.groups.length) show("dup-status", "No near-copies at this similarity.", "ok");
}

// Show `job` and carry on: poll it while it runs, show its first page of groups once it is done.
async function follow(job, gen) {
  if (gen !== dup.gen) return;
  showJob(job);
  if (job.state === "running") {
    stopPolling();
    dup.timer = setTimeout(() => poll(job.job, gen), POLL_MS);
  } else if (job.state === "done" && !$("dup-groups").children.length) {
    try {
      await loadGroups(gen, null);
    } catch (err) {
      if (gen === dup.gen) show("dup-status", err.message, "error");
    }
  }
}

async function poll(id, gen) {
  let job;
  try {
    job = await api(jobPath(id), { quiet: true });
  } catch (err) {
    if (gen !== dup.gen) return;
    if (err instanceof ApiError && err.status === 404) {  // gone, e.g. the service restarted: nothing to follow
      show("dup-status", err.message, "error");
      $("dup-cancel").hidden = true;
      $("dup-start").disabled = false;
      return;
    }
    show("dup-status", `${err.message} Trying again…`, "warn");  // a blip: keep following, a little slower
    dup.timer = setTimeout(() => poll(id, gen), POLL_MS * 4);
    return;
  }
  if (gen !== dup.gen) return;
  if ($("dup-status").classList.contains("warn") && $("dup-status").textContent.endsWith("Trying again…")) {
    show("dup-status", "");
  }
  await follow(job, gen);
}

function duplicatesRequest() {
  const body = {};
  // a number input holding text reads as empty: say so rather than quietly use the default
  if ($("dup-min-similarity").validity.badInput) throw new Error("Min. similarity must be a number from 0 to 100.");
  const minSim = $("dup-min-similarity").value.trim();
  if (minSim) body.min_similarity = Number(minSim);
  const filter = parseJsonField($("dup-filter").value, "The metadata filter");
  if (filter) body.filter = filter;
  pageSize();  // refuse a bad page size now, not after the whole job has run
  return body;
}

async function startDuplicates(e) {
  e.preventDefault();
  const name = model();
  if (!name) return;
  const start = $("dup-start");
  start.disabled = true;
  dup.starting = true;
  // the view keeps the job it shows (or the model's latest, still loading) until the service has started another:
  // a refused start (a bad threshold, say) leaves it in place
  show("dup-status", "");
  let id;
  let note = "";
  try {
    const body = duplicatesRequest();
    try {
      id = (await api(`models/${encodeURIComponent(name)}/duplicates`, { json: body })).job;
    } catch (err) {
      // one job per model at a time: follow the one already running (started elsewhere or before a reload)
      if (!(err instanceof ApiError && err.status === 409 && err.body && err.body.job)) throw err;
      id = err.body.job;
      note = `${err.message}: showing that job.`;
    }
    dup.starting = false;
    const gen = resetDuplicates();  // from here an older read's answer is dropped
    if (note) show("dup-status", note, "warn");
    const job = await api(jobPath(id));
    await follow(job, gen);
  } catch (err) {
    dup.starting = false;
    start.disabled = !!dup.job && dup.job.state === "running";
    show("dup-status", err.message, "error");
  }
}

async function cancelDuplicates() {
  const job = dup.job;
  if (!job) return;
  const gen = dup.gen;
  const button = $("dup-cancel");
  button.disabled = true;
  try {
    const record = await api(jobPath(job.job), { method: "DELETE" });
    if (gen !== dup.gen) return;
    stopPolling();
    showJob(record);
  } catch (err) {
    if (gen !== dup.gen) return;
    show("dup-status", err.message, err instanceof ApiError && err.status === 409 ? "warn" : "error");
    if (err instanceof ApiError && err.status === 409) {  // it finished meanwhile: show how, now
      stopPolling();
      poll(job.job, gen);
    }
  } finally {
    button.disabled = false;
  }
}

async function moreGroups() {
  const button = $("dup-more");
  button.disabled = true;
  try {
    await loadGroups(dup.gen, dup.next);
  } catch (err) {
    show("dup-status", err.message, "error");
  } finally {
    button.disabled = false;
  }
}

// The model's latest job (GET /jobs lists them newest first), so that a reload finds a job that still runs.
async function showLatestJob() {
  const gen = resetDuplicates();
  const name = model();
  if (!name) return;
  try {
    const jobs = await api(`jobs?${new URLSearchParams({ model: name })}`, { quiet: true });
    if (gen === dup.gen && jobs.length) await follow(jobs[0], gen);
  } catch (err) {
    if (gen === dup.gen) show("dup-status", err.message, "error");
  }
}

window.addEventListener("DOMContentLoaded", () => {
  $("dup-form").addEventListener("submit", startDuplicates);
  $("dup-cancel").addEventListener("click", cancelDuplicates);
  $("dup-more").addEventListener("click", moreGroups);
  document.addEventListener("modelchange", showLatestJob);
});
