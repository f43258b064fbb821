// The page's only script: sends the picked image to /v1/classify (multipart) and shows the answer: the labels
// the server returns, which min_confidence may make fewer than five, or none.
// Below it, the key's last hour from /v1/usage: requests per minute as bars, p95 latency as a line, in an SVG
// drawn here (no library: the page loads nothing from elsewhere).
// The key stays in this tab unless "Remember" is ticked; then, and only then, it is kept in localStorage.
"use strict";

const STORAGE_KEY = "classify.apiKey";
const TOP_K = 5;
const KEY_SHAPE = /^sk-[A-Za-z0-9_-]{43}$/;  // what the server issues (auth.KEY_PATTERN)
const $ = (id) => document.getElementById(id);

function plainError(status, body, headers) {
  const code = body && body.error ? body.error.code : "";
  const serverMessage = body && body.error ? body.error.message : "";
  if (status === 401 && code === "revoked_api_key") return "This API key has been revoked. Use another key.";
  if (status === 401) return "This API key was not accepted. Check that you pasted all of it (it starts with sk-), or ask for a new one.";
  if (status === 429) {
    const wait = headers.get("Retry-After") || "a few";
    return `Too many requests with this key. Wait ${wait} seconds, then try again.`;
  }
  if (["not_an_image", "corrupt_image", "empty_image"].includes(code)) {
    return "That file is not an image the server can read. Try a JPEG, PNG, GIF, WEBP, BMP or TIFF file. (" + serverMessage + ")";
  }
  if (status === 413) return "That image is too large. " + serverMessage;
  if (status >= 500) return "The server had a problem (" + status + "). Try again in a moment.";
  return serverMessage || `The server answered ${status}.`;
}

function showQuota(headers) {
  const limit = headers.get("X-RateLimit-Limit");
  const remaining = headers.get("X-RateLimit-Remaining");
  const reset = headers.get("X-RateLimit-Reset");
  if (limit === null || remaining === null) {
    $("quota").textContent = "";  // a refused key has no quota: do not leave the last key's on show
    return;
  }
  $("quota").textContent = `Quota: ${remaining} of ${limit} requests left in this window` +
    (reset && reset !== "0" ? `; the next one frees up in ${reset} s.` : ".");
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("result").hidden = true;
}

function minConfidencePercent() {
  const value = $("min-confidence").valueAsNumber;
  return Number.isNaN(value) ? 0 : value;  // an empty box: no minimum
}

function showPredictions(answer, roundTripMs, minPercent) {
  const list = $("predictions");
  list.replaceChildren();
  $("no-predictions").hidden = answer.predictions.length > 0;
  $("no-predictions").textContent = `No label is at least ${minPercent} % likely: lower the minimum to see some.`;
  for (const prediction of answer.predictions) {
    const percent = (prediction.confidence * 100).toFixed(1);
    const item = document.createElement("li");
    item.innerHTML = '<div class="label"><span class="name"></span><span class="percent"></span></div>' +
                     '<div class="bar"><span></span></div>';
    item.querySelector(".name").textContent = prediction.label;  // textContent: labels are never parsed as HTML
    item.querySelector(".percent").textContent = percent + " %";
    item.querySelector(".bar span").style.width = percent + "%";
    list.append(item);
  }
  $("meta").textContent = `Model ${answer.model}: ${answer.inference_ms.toFixed(1)} ms in the model, ` +
                          `${Math.round(roundTripMs)} ms round trip.`;
  $("error").hidden = true;
  $("result").hidden = false;
}

async function classify(file) {
  const key = $("key").value.trim();
  if (!key) return showError("Paste your API key first: it starts with sk-.");
  // A key pasted with an invisible or curly character would make fetch throw, and look like a dead server.
  if (!KEY_SHAPE.test(key)) return showError("That does not look like a whole API key: sk- and 43 letters, " +
                                             "digits, - or _. Paste it again.");
  const minPercent = minConfidencePercent();
  if (!(minPercent >= 0 && minPercent <= 100)) return showError("The minimum must be a number from 0 to 100 %.");
  rememberKey();
  if ($("preview").src) URL.revokeObjectURL($("preview").src);
  $("preview").src = URL.createObjectURL(file);
  const form = new FormData();
  form.append("file", file);
  form.append("top_k", String(TOP_K));
  form.append("min_confidence", String(minPercent / 100));
  const started = performance.now();
  let response;
  try {
    response = await fetch("/v1/classify", { method: "POST", headers: { Authorization: "Bearer " + key }, body: form });
  } catch (error) {
    return showError("Could not reach the server. Is it running?");
  }
  const roundTripMs = performance.now() - started;
  showQuota(response.headers);
  const body = await response.json().catch(() => null);
  showUsage(key);
  if (!response.ok) return showError(plainError(response.status, body, response.headers));
  showPredictions(body, roundTripMs, minPercent);
}

const SVG = "http://www.w3.org/2000/svg";
const CHART = { width: 600, height: 120, top: 8, bottom: 4 };

function svgElement(name, attributes) {
  const element = document.createElementNS(SVG, name);
  for (const [attribute, value] of Object.entries(attributes)) element.setAttribute(attribute, String(value));
  return element;
}

async function showUsage(key) {
  const start = Math.floor(Date.now() / 1000) - 3600;
  let response;
  try {
    response = await fetch(`/v1/usage?start_time=${start}&bucket_width=1m`, { headers: { Authorization: "Bearer " + key } });
  } catch (error) {
    return;  // the classify answer already says whether the server is reachable
  }
  if (!response.ok) {
    $("usage").hidden = true;
    return;
  }
  const usage = await response.json();
  drawUsage(usage.buckets);
  const p95 = usage.latency_ms.p95;
  $("usage-summary").replaceChildren(`${counted(usage.total_requests, "request")}, ${usage.by_status.succeeded} ` +
                                     `answered 200, ${counted(usage.images, "image")}`);
  const latency = document.createElement("span");
  latency.className = "p95-key";
  latency.textContent = p95 === null ? "" : `; p95 ${p95} ms (the line)`;
  $("usage-summary").append(latency, ".");
  $("usage").hidden = false;
}

function counted(count, noun) {
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}

function drawUsage(buckets) {
  const chart = $("usage-chart");
  chart.replaceChildren();
  const slot = CHART.width / buckets.length;
  const plotHeight = CHART.height - CHART.top - CHART.bottom;
  const most = Math.max(1, ...buckets.map((bucket) => bucket.total_requests));
  const slowest = Math.max(1, ...buckets.map((bucket) => bucket.latency_ms.p95 || 0));
  const bottom = CHART.height - CHART.bottom;
  chart.append(svgElement("line", { class: "axis", x1: 0, y1: bottom, x2: CHART.width, y2: bottom }));
  const points = [];
  const dots = [];
  buckets.forEach((bucket, index) => {
    const height = plotHeight * bucket.total_requests / most;
    const bar = svgElement("rect", { class: "requests", x: index * slot + 1, y: bottom - height,
                                     width: Math.max(1, slot - 2), height, "data-requests": bucket.total_requests });
    const title = svgElement("title", {});
    title.textContent = `${new Date(bucket.start_time * 1000).toLocaleTimeString()}: ${bucket.total_requests} ` +
                        `requests` + (bucket.latency_ms.p95 === null ? "" : `, p95 ${bucket.latency_ms.p95} ms`);
    bar.append(title);
    chart.append(bar);
    if (bucket.latency_ms.p95 !== null) {
      const x = (index + 0.5) * slot;
      const y = bottom - plotHeight * bucket.latency_ms.p95 / slowest;
      points.push(`${x},${y}`);
      dots.push(svgElement("circle", { class: "p95-dot", cx: x, cy: y, r: 3 }));  // a lone minute shows too
    }
  });
  chart.append(svgElement("polyline", { class: "p95", points: points.join(" ") }), ...dots);
}

function rememberKey() {
  if ($("remember").checked) localStorage.setItem(STORAGE_KEY, $("key").value.trim());
  else localStorage.removeItem(STORAGE_KEY);
}

function setUp() {
  const saved = localStorage.getItem(STORAGE_KEY);
  if (saved) {
    $("key").value = saved;
    $("remember").checked = true;
  }
  $("remember").addEventListener("change", rememberKey);
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    $("file").value = "";  // so that picking the same file again sends it again
    if (file) classify(file);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) classify(event.dataTransfer.files[0]);
  });
}

setUp();
