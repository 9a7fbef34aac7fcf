// backdoor-scan's page: every piece of data comes from the /v1 API, fetched with the API key in the Authorization
// header. The key lives in this tab's sessionStorage only: never in a URL, never in a cookie. Text from the server
// (file names, messages) is set with textContent, never parsed as HTML; the report is shown in a sandboxed iframe.
"use strict";

(() => {
  const KEY = "bds-api-key";
  const FINAL = new Set(["succeeded", "failed", "cancelled"]);
  const POLL_BUSY_MS = 1000;
  const POLL_IDLE_MS = 5000;
  const authRequired = document.body.dataset.auth !== "disabled";
  let timer = null;
  let view = null;
  let reportUrl = null;

  const $ = (id) => document.getElementById(id);

  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  class Unauthorized extends Error {}

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const key = sessionStorage.getItem(KEY);
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(path, { ...options, headers, credentials: "omit", cache: "no-store" });
    if (response.status === 401 && authRequired) {
      sessionStorage.removeItem(KEY);
      showKey("The API key was refused; enter it again.");
      throw new Unauthorized();
    }
    return response;
  }

  async function problem(response) {
    try {
      const body = await response.json();
      if (body && body.detail) return `${body.detail} (${body.code || response.status})`;
    } catch (error) {
      // not JSON: fall through to the status line
    }
    return `HTTP ${response.status} ${response.statusText}`;
  }

  function stopPolling() {
    if (timer !== null) clearTimeout(timer);
    timer = null;
  }

  function show(name) {
    for (const id of ["key-view", "list-view", "scan-view"]) $(id).hidden = id !== name;
    $("forget").hidden = !authRequired || name === "key-view";
  }

  function showKey(message) {
    stopPolling();
    view = "key";
    show("key-view");
    $("key-error").textContent = message || "";
    $("key").focus();
  }

  // --- the scans list -------------------------------------------------------------------------------------------

  function age(timestamp) {
    const seconds = Math.max(0, (Date.now() - Date.parse(timestamp)) / 1000);
    if (seconds < 60) return `${Math.round(seconds)} s ago`;
    if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
    return `${Math.round(seconds / 86400)} d ago`;
  }

  function badge(text, kind) {
    return el("span", { class: `badge ${kind || ""}` }, text);
  }

  function verdictBadge(verdict) {
    if (!verdict) return "";
    const kind = { backdoored: "bad", unsafe_file: "bad", clean: "good" }[verdict] || "grey";
    return badge(verdict.replace("_", " "), kind);
  }

  function statusCell(scan) {
    const cell = el("td", { "data-label": "Status", class: "status" }, badge(scan.status, scan.status));
    if (!FINAL.has(scan.status)) {
      const fraction = scan.progress ? scan.progress.fraction : 0;
      cell.append(
        el("progress", { max: "1", value: String(fraction) }),
        el("span", { class: "stage" }, `${Math.round(100 * fraction)}% ${scan.progress ? scan.progress.stage : ""}`),
      );
    } else if (scan.error) {
      cell.append(el("span", { class: "stage" }, scan.error.code));
    }
    return cell;
  }

  function scanRow(scan) {
    const flagged = scan.result && scan.result.flagged_classes ? scan.result.flagged_classes.join(", ") : "";
    const link =
      scan.status === "succeeded"
        ? el("a", { href: `#scan/${encodeURIComponent(scan.id)}`, class: "open" }, "Report and try an image")
        : el("a", { href: `#scan/${encodeURIComponent(scan.id)}`, class: "open" }, "Details");
    return el(
      "tr",
      { id: `scan-${scan.id}`, "data-status": scan.status },
      el("td", { "data-label": "Model", class: "model" }, scan.model.filename),
      statusCell(scan),
      el("td", { "data-label": "Verdict", class: "verdict" }, verdictBadge(scan.verdict)),
      el("td", { "data-label": "Flagged", class: "flagged" }, flagged || (scan.verdict ? "none" : "")),
      el("td", { "data-label": "Submitted", class: "age", title: scan.created_at }, age(scan.created_at)),
      el("td", { class: "actions" }, link),
    );
  }

  async function refreshList() {
    stopPolling();
    let busy = false;
    try {
      const response = await api("/v1/scans?limit=50");
      if (!response.ok) throw new Error(await problem(response));
      const page = await response.json();
      if (view !== "list") return;
      $("scans").tBodies[0].replaceChildren(...page.items.map(scanRow));
      $("no-scans").hidden = page.items.length > 0;
      $("list-error").textContent = "";
      busy = page.items.some((scan) => !FINAL.has(scan.status));
    } catch (error) {
      if (error instanceof Unauthorized) return;
      $("list-error").textContent = `Could not load the scans: ${error.message}`;
    }
    if (view === "list") timer = setTimeout(refreshList, busy ? POLL_BUSY_MS : POLL_IDLE_MS);
  }

  async function submitScan(event) {
    event.preventDefault();
    const form = event.target;
    const status = $("submit-status");
    const body = new FormData();
    for (const [name, value] of new FormData(form)) {
      if (name === "detector") continue;
      if (value instanceof File ? value.size > 0 || value.name : String(value).trim()) body.append(name, value);
    }
    const detectors = [...form.querySelectorAll("input[name=detector]")];
    const chosen = detectors.filter((box) => box.checked).map((box) => box.value);
    if (chosen.length === 0) {
      status.textContent = "Choose at least one detector.";
      return;
    }
    if (chosen.length < detectors.length) body.append("detectors", chosen.join(","));
    status.textContent = "Uploading...";
    $("submit-button").disabled = true;
    try {
      const response = await api("/v1/scans", { method: "POST", body });
      if (response.ok) {
        const scan = await response.json();
        status.textContent =
          response.status === 200
            ? `This upload was scanned before: ${scan.model.filename} (${scan.status}).`
            : `Queued: ${scan.model.filename}.`;
        form.reset();
      } else {
        status.textContent = `Refused: ${await problem(response)}`;
      }
    } catch (error) {
      if (!(error instanceof Unauthorized)) status.textContent = `Upload failed: ${error.message}`;
    } finally {
      $("submit-button").disabled = false;
    }
    if (view === "list") refreshList();
  }

  // --- one scan: its state, its report, try an image -----------------------------------------------------------

  function percent(value) {
    return `${(100 * value).toFixed(1)}%`;
  }

  function triedCard(title, tried, kind, triggerClass) {
    const flipped = triggerClass !== undefined && tried.prediction === triggerClass;
    const images = el(
      "div",
      { class: "pair" },
      el("figure", {}, el("img", { src: tried.image_png, alt: `${title}: image`, class: "pixel" }), el("figcaption", {}, "image")),
    );
    if (tried.gradcam_png) {
      images.append(
        el(
          "figure",
          {},
          el("img", { src: tried.gradcam_png, alt: `${title}: Grad-CAM`, class: "pixel" }),
          el("figcaption", {}, "Grad-CAM"),
        ),
      );
    }
    return el(
      "article",
      {
        class: `tried ${flipped ? "flipped" : ""}`,
        "data-kind": kind,
        "data-trigger": triggerClass === undefined ? null : String(triggerClass),
      },
      el("h3", {}, title),
      images,
      el(
        "p",
        { class: "answer" },
        "Prediction ",
        el("strong", { class: "prediction" }, String(tried.prediction)),
        ` (confidence ${percent(tried.confidence)})`,
        flipped ? el("span", { class: "badge bad" }, "trigger's class") : null,
      ),
    );
  }

  function showTried(result) {
    const input = result.input;
    const what =
      input.kind === "sample"
        ? `Clean sample ${input.sample} (row ${input.row} of the data file, label ${input.label})`
        : `Uploaded image ${input.filename || ""}`;
    const cards = el("div", { class: "cards" }, triedCard("As is", result.clean, "clean"));
    for (const stamped of result.stamped) {
      cards.append(
        triedCard(`With class ${stamped.trigger_class}'s trigger`, stamped, "stamped", stamped.trigger_class),
      );
    }
    const notes = [];
    if (result.stamped.length === 0 && result.not_stamped.length === 0) {
      notes.push("No class was flagged: there is no trigger to stamp.");
    }
    for (const missing of result.not_stamped) notes.push(`Class ${missing.trigger_class}: ${missing.reason}.`);
    if (result.gradcam.status !== "ok") notes.push(`Grad-CAM ${result.gradcam.status}: ${result.gradcam.detail}`);
    $("try-result").replaceChildren(
      el("p", { class: "note" }, what),
      cards,
      ...notes.map((text) => el("p", { class: "note" }, text)),
    );
  }

  async function tryImage(event) {
    event.preventDefault();
    const form = event.target;
    const body = new FormData(form);
    $("try-status").textContent = "Running the model...";
    for (const button of document.querySelectorAll("#try button")) button.disabled = true;
    try {
      const response = await api(`/v1/scans/${encodeURIComponent(view.id)}/try`, { method: "POST", body });
      if (response.ok) {
        showTried(await response.json());
        $("try-status").textContent = "";
      } else {
        $("try-status").textContent = `Refused: ${await problem(response)}`;
      }
    } catch (error) {
      if (!(error instanceof Unauthorized)) $("try-status").textContent = `Failed: ${error.message}`;
    } finally {
      for (const button of document.querySelectorAll("#try button")) button.disabled = false;
    }
  }

  async function loadReport(scan) {
    const response = await api(scan.links.report);
    if (!response.ok) {
      $("scan-error").textContent = `The report could not be loaded: ${await problem(response)}`;
      return;
    }
    const page = await response.text();
    if (view === null || view.id !== scan.id) return;
    $("report").srcdoc = page;
    if (reportUrl) URL.revokeObjectURL(reportUrl);
    reportUrl = URL.createObjectURL(new Blob([page], { type: "text/html" }));
    $("report-download").href = reportUrl;
    $("report-download").setAttribute("download", `backdoor-scan-report-${scan.id}.html`);
    $("report-section").hidden = false;
  }

  function showScan(scan) {
    $("scan-title").textContent = scan.model.filename;
    const summary = $("scan-summary");
    summary.replaceChildren(badge(scan.status, scan.status), " ", verdictBadge(scan.verdict));
    if (scan.result) {
      const flagged = scan.result.flagged_classes || [];
      summary.append(` flagged classes: ${flagged.length ? flagged.join(", ") : "none"}`);
    }
    const progress = $("scan-progress");
    progress.hidden = FINAL.has(scan.status);
    progress.querySelector("progress").value = scan.progress.fraction;
    progress.querySelector(".stage").textContent =
      `${Math.round(100 * scan.progress.fraction)}% ${scan.progress.stage}: ${scan.progress.message}`;
    $("scan-error").textContent = scan.error ? `${scan.error.code}: ${scan.error.detail}` : "";
  }

  async function refreshScan(id) {
    stopPolling();
    try {
      const response = await api(`/v1/scans/${encodeURIComponent(id)}`);
      if (view === null || view.id !== id) return;
      if (!response.ok) {
        $("scan-title").textContent = "Scan";
        $("scan-error").textContent = await problem(response);
        return;
      }
      const scan = await response.json();
      showScan(scan);
      if (!FINAL.has(scan.status)) {
        timer = setTimeout(() => refreshScan(id), POLL_BUSY_MS);
        return;
      }
      if (scan.status === "succeeded") {
        const triable = scan.verdict !== "unsafe_file" && !scan.options.trust_code;
        $("try").hidden = !triable;
        $("sample-form").hidden = !scan.data;
        if (scan.data) $("sample-hint").textContent = `an index into ${scan.data.filename}`;
        await loadReport(scan);
      }
    } catch (error) {
      if (!(error instanceof Unauthorized)) $("scan-error").textContent = `Could not load the scan: ${error.message}`;
    }
  }

  // --- routing ---------------------------------------------------------------------------------------------------

  function route() {
    stopPolling();
    if (authRequired && !sessionStorage.getItem(KEY)) {
      showKey();
      return;
    }
    const match = /^#scan\/([A-Za-z0-9_-]{1,64})$/.exec(location.hash);
    if (match) {
      view = { id: match[1] };
      for (const id of ["try", "report-section"]) $(id).hidden = true;
      $("try-result").replaceChildren();
      $("try-status").textContent = "";
      $("report").removeAttribute("srcdoc");
      $("scan-title").textContent = "";
      $("scan-summary").replaceChildren();
      show("scan-view");
      refreshScan(match[1]);
    } else {
      view = "list";
      show("list-view");
      refreshList();
    }
  }

  async function enterKey(event) {
    event.preventDefault();
    const key = $("key").value.trim();
    if (!key) return;
    const response = await fetch("/v1/scans?limit=1", {
      headers: { Authorization: `Bearer ${key}` },
      credentials: "omit",
      cache: "no-store",
    });
    if (response.status === 401) {
      $("key-error").textContent = "This key is not valid here.";
      return;
    }
    sessionStorage.setItem(KEY, key);
    $("key").value = "";
    route();
  }

  function forgetKey() {
    sessionStorage.removeItem(KEY);
    showKey();
  }

  $("key-form").addEventListener("submit", enterKey);
  $("submit-form").addEventListener("submit", submitScan);
  $("image-form").addEventListener("submit", tryImage);
  $("sample-form").addEventListener("submit", tryImage);
  $("forget").addEventListener("click", forgetKey);
  window.addEventListener("hashchange", route);
  route();
})();
