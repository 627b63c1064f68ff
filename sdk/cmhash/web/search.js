// The search page: text or image queries to /api/search, results as a grid of thumbnails
// (or of names, for items that are texts). Names are set as text, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;

async function loadInfo() {
  const response = await fetch("/api/info");
  info = await response.json();
  const select = $("collection");
  for (const c of info.collections) {
    const option = document.createElement("option");
    option.value = c.name;
    option.textContent = `${c.name} (${c.items} items)`;
    select.appendChild(option);
  }
  $("collection-label").hidden = info.collections.length < 2;
  $("k").max = info.limits.max_k;
  if (!info.modalities.includes("text")) $("text-form").hidden = true;
  if (!info.modalities.includes("image")) $("image-form").hidden = true;
  $("status").textContent = `${info.collections.map((c) => c.items).reduce((a, b) => a + b, 0)} items, ` +
    `${info.collections[0].bits}-bit codes`;
}

function options(form) {
  form.append("k", $("k").value || "10");
  if ($("radius").value !== "") form.append("radius", $("radius").value);
  form.append("collection", $("collection").value);
  return form;
}

async function search(form, what) {
  $("error").textContent = "";
  $("status").textContent = `searching for ${what} ...`;
  document.body.dataset.state = "searching";
  let body;
  try {
    const response = await fetch("/api/search", { method: "POST", body: options(form) });
    body = await response.json();
    if (!response.ok) throw new Error(body.error || response.statusText);
  } catch (err) {
    $("error").textContent = err.message;
    $("status").textContent = "";
    document.body.dataset.state = "error";
    return;
  }
  show(body, what);
}

function show(body, what) {
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of body.results) {
    const figure = document.createElement("figure");
    figure.className = "hit";
    figure.dataset.id = hit.id;
    figure.dataset.name = hit.name ?? "";
    figure.dataset.distance = hit.distance;
    if (hit.thumbnail) {
      const img = document.createElement("img");
      img.src = hit.thumbnail;
      img.alt = hit.name ?? `item ${hit.id}`;
      img.loading = "eager";
      figure.appendChild(img);
    } else {
      const text = document.createElement("div");
      text.className = "text";
      text.textContent = hit.name ?? `item ${hit.id}`;
      figure.appendChild(text);
    }
    const caption = document.createElement("figcaption");
    const distance = document.createElement("span");
    distance.className = "distance";
    distance.textContent = `${hit.distance}`;
    caption.append(`#${hit.rank} · distance `, distance);
    if (hit.thumbnail) caption.append(` · ${hit.name ?? "id " + hit.id}`);  // a text item shows its name above
    figure.appendChild(caption);
    grid.appendChild(figure);
  }
  $("status").textContent = `${body.results.length} results for ${what} in ${(body.seconds * 1000).toFixed(1)} ms`;
  document.body.dataset.state = "done";
}

$("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = new FormData();
  form.append("text", $("text").value);
  search(form, `"${$("text").value}"`);
});

$("image").addEventListener("change", () => {
  const file = $("image").files[0];
  if (!file) return;
  const preview = $("preview");
  preview.src = URL.createObjectURL(file);
  preview.style.display = "inline";
  const form = new FormData();
  form.append("image", file);
  search(form, file.name);
});

loadInfo().catch((err) => { $("error").textContent = `cannot reach the service: ${err.message}`; });
