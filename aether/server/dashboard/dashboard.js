// The ports dashboard: one WebSocket (authenticated by the HttpOnly cookie this page cannot
// read), the `ports` channel's snapshot and events, `kill`, `visibility`, and the port
// registry from the `config` channel; labels are written through the registry's REST API
// (`PUT /api/ports/KEY`, which takes this page's cookie for a label). What a person hides is
// kept in localStorage. Everything shown is set as text, never as HTML.
"use strict";

(() => {
  const body = document.body;
  const workspace = body.dataset.workspace;
  const wsUrl = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}` +
    `/workspaces/${encodeURIComponent(workspace)}/ws`;
  const BACKOFF_MS = [500, 1000, 2000, 4000, 8000];

  let ports = new Map();        // port -> its latest `open` or `update`, plus our own state
  let snapshot = null;          // while (re)connecting: the server's snapshot, gathered here
  let snapshotEnd = null;       // the id of the request whose answer ends the snapshot
  let registry = [];            // the registry's entries
  let socket = null;
  let attempt = 0;              // failed connections since the last success
  let everConnected = false;
  let nextId = 1;
  let lostBecause = "";         // why the last connection ended, while reconnecting
  let protocolsKnown = false;   // the server detects protocols (it has sent one)
  let showHidden = false;       // the hidden rows shown, faded, for a moment
  const ownPort = Number(body.dataset.ownPort);
  const HIDDEN_KEY = "aether.dashboard.hidden";
  let hidden = loadHidden();    // {ports: [port], processes: [name]} the person chose to hide

  const $ = (id) => document.getElementById(id);
  const connection = $("connection");

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props)) {
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value);
    }
    for (const child of children) if (child != null) node.append(child);
    return node;
  }

  // -- the connection ----------------------------------------------------------------------

  function setConnection(state, text) {
    connection.className = `connection ${state}`;
    connection.textContent = text;
    body.dataset.connection = state;
  }

  function connect() {
    socket = new WebSocket(wsUrl);
    let opened = false;
    socket.addEventListener("open", () => {
      opened = true;
      attempt = 0;
      setConnection(everConnected ? "reconnected" : "connected", everConnected ? "reconnected" : "connected");
      if (everConnected) {
        setTimeout(() => body.dataset.connection === "reconnected" && setConnection("connected", "connected"), 4000);
      }
      everConnected = true;
      // The server first sends an `open` for every port, then answers this request: what came
      // before the answer is the whole table, and replaces the old one at once.
      snapshot = new Map();
      snapshotEnd = `registry-${nextId++}`;
      send({channel: "config", type: "registry", id: snapshotEnd});
    });
    socket.addEventListener("message", (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch (_) {
        return showError("the server sent something that is not JSON");
      }
      handle(message);
    });
    socket.addEventListener("close", (event) => {
      socket = null;
      snapshot = snapshotEnd = null;
      for (const row of ports.values()) row.killing = row.toggling = false;
      render();
      reconnectLater(opened, event);
    });
  }

  async function reconnectLater(wasOpen, event) {
    const delay = BACKOFF_MS[Math.min(attempt, BACKOFF_MS.length - 1)] * (0.8 + Math.random() * 0.4);
    attempt += 1;
    if (!wasOpen && attempt >= 2 && await signedOut()) {
      return setConnection("signed-out",
        "signed out: the workspace token has changed; open the dashboard address aether serve prints");
    }
    if (wasOpen) lostBecause = event.code === 1001 ? " (the server stopped)" : "";
    setConnection("lost", `connection lost${lostBecause} — reconnecting in ${Math.max(1, Math.round(delay / 1000))} s…`);
    setTimeout(connect, delay);
  }

  // Whether the cookie no longer opens the dashboard (a server reached, saying 401), as
  // opposed to a server not reachable at all.
  async function signedOut() {
    try {
      const response = await fetch("/dashboard/session", {cache: "no-store", credentials: "same-origin"});
      return response.status === 401;
    } catch (_) {
      return false;
    }
  }

  function send(message) {
    if (!socket || socket.readyState !== WebSocket.OPEN) {
      showError("not connected: try again once the dashboard has reconnected");
      return false;
    }
    socket.send(JSON.stringify(message));
    return true;
  }

  // -- messages ----------------------------------------------------------------------------

  function handle(message) {
    const table = snapshot || ports;
    if (message.channel === "ports") {
      if ("protocol" in message) protocolsKnown = true;
      if (message.type === "open") {
        table.set(message.port, {...message});
      } else if (message.type === "update") {
        // The port's whole state again (a new owner, another address): replace the server's
        // fields, keep ours (a kill or a toggle in flight, the time it first answered).
        table.set(message.port, {...table.get(message.port), ...message});
      } else if (message.type === "ready") {
        const row = table.get(message.port);
        if (row) row.readyMs = message.ms;
      } else if (message.type === "close") {
        table.delete(message.port);
      } else if (message.type === "visibility") {
        const row = table.get(message.port);
        if (row) {
          row.visibility = message.visibility;
          row.toggling = false;
        }
      } else if (message.type === "error") {
        const row = table.get(message.port);
        if (row) row.killing = row.toggling = false;
        showError(message.message);  // the server's words name the port
      }
    } else if (message.channel === "config" && message.type === "registry") {
      // A push after a change, or the answer to our request: both are the whole registry.
      registry = Array.isArray(message.ports) ? message.ports : [];
    } else if (message.type === "error") {
      showError(message.message);
    }
    if (snapshot && message.id === snapshotEnd) {
      ports = snapshot;
      snapshot = snapshotEnd = null;
    }
    if (!snapshot) renderSoon();
  }

  // Messages come in bursts (a `docker compose up`, a test suite's thousand listeners). A
  // message renders at once unless rendering would take more than a fifth of the page's time
  // (the last render's cost, against the time since it ended); then it waits for the next
  // frame with the others. Rendering once per message held Chromium's main thread for
  // minutes when 1,000 ports opened at once; now every row is in within about a second, and
  // one port's row appears as fast as before (bench/dashboard.py --burst 1000). A tab in the
  // background renders once it is shown again.
  let renderPending = false;
  let renderedAt = -Infinity;
  let renderCost = 0;

  function renderTimed() {
    const started = performance.now();
    render();
    renderedAt = performance.now();
    renderCost = renderedAt - started;
  }

  function renderSoon() {
    if (renderPending) return;
    if (performance.now() - renderedAt > 4 * renderCost) {
      renderTimed();
      return;
    }
    renderPending = true;
    requestAnimationFrame(() => {
      renderPending = false;
      renderTimed();
    });
  }

  // -- actions -----------------------------------------------------------------------------

  function kill(row) {
    const what = row.process ? `${row.process} (pid ${row.pid})` : "its process";
    if (!window.confirm(`Kill ${what} listening on port ${row.port}?`)) return;
    if (send({channel: "ports", type: "kill", port: row.port, id: `kill-${nextId++}`})) {
      row.killing = true;
      render();
    }
  }

  function toggle(row) {
    const visibility = row.visibility === "public" ? "private" : "public";
    if (send({channel: "ports", type: "visibility", port: row.port, visibility, id: `vis-${nextId++}`})) {
      row.toggling = true;
      render();
    }
  }

  function registryKey(port) {
    return namesOf(port)[0] || null;
  }

  // A label goes to the port's registry entry; a port with none gets one, named after the label.
  async function editLabel(row) {
    const current = labelOf(row) || "";
    const label = window.prompt(`Label for port ${row.port} (one word; empty to clear)`, current);
    if (label === null || label.trim() === current) return;
    const word = label.trim();
    let key = registryKey(row.port);
    if (!key) {
      if (!word) return;
      key = word.toLowerCase().replace(/[^a-z0-9-]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 63);
      if (!key || /^\d+$/.test(key)) key = `port-${row.port}`;
    }
    try {
      const response = await fetch(`/api/ports/${encodeURIComponent(key)}`, {
        method: "PUT", credentials: "same-origin", cache: "no-store",
        headers: {"Content-Type": "application/json"},
        body: JSON.stringify({port: row.port, label: word}),
      });
      if (!response.ok) {
        const answer = await response.json().catch(() => ({}));
        return showError(`label for port ${row.port}: ${answer.message || response.status}`);
      }
      // The registry's push on the config channel updates the tables; this asks at once.
      send({channel: "config", type: "registry", id: `registry-${nextId++}`});
    } catch (_) {
      showError(`label for port ${row.port}: the server could not be reached`);
    }
  }

  async function copyUrl(row, button) {
    let done = false;
    try {
      await navigator.clipboard.writeText(row.url);
      done = true;
    } catch (_) {
      // Not a secure context (plain HTTP on a host other than localhost): the old way.
      const area = el("textarea", {class: "sr-only", readonly: ""});
      area.value = row.url;
      body.append(area);
      area.select();
      try { done = document.execCommand("copy"); } catch (_) { done = false; }
      area.remove();
    }
    button.textContent = done ? "copied" : "copy failed";
    button.dataset.copied = String(done);
    setTimeout(() => { button.textContent = "copy"; delete button.dataset.copied; }, 1500);
  }

  // -- hiding ------------------------------------------------------------------------------

  function loadHidden() {
    try {
      const value = JSON.parse(localStorage.getItem(HIDDEN_KEY) || "{}");
      return {ports: Array.isArray(value.ports) ? value.ports : [],
        processes: Array.isArray(value.processes) ? value.processes : []};
    } catch (_) {
      return {ports: [], processes: []};
    }
  }

  function saveHidden() {
    try { localStorage.setItem(HIDDEN_KEY, JSON.stringify(hidden)); } catch (_) { /* private mode */ }
    render();
  }

  function toggleHidden(list, value) {
    const at = hidden[list].indexOf(value);
    if (at >= 0) hidden[list].splice(at, 1);
    else hidden[list].push(value);
    saveHidden();
  }

  const BROWSERS = /^(chrome|chromium|chromium-browse|chrome_crashpad|headless_shell|firefox|firefox-esr|msedge|brave|opera|chromedriver|geckodriver)\b/i;
  const DEVTOOLS = /(^|\s)--(remote-debugging-port|inspect|inspect-brk|inspect-port)(=|\s|$)/;
  const AETHER = /(^|[\s/])aether(\s+\S+)*\s+serve(\s|$)|-m\s+aether\b.*\sserve(\s|$)/;

  // Why a port is hidden without being asked to, or null: browsers' and debuggers' own ports
  // (a devtools endpoint, node --inspect), this server's listener, a rule's onOpen "ignore".
  function hiddenByDefault(row) {
    const command = row.command || "";
    if (row.on_open === "ignore") return "ignored by a rule";
    if (row.port === ownPort || AETHER.test(command)) return "aether";
    if (DEVTOOLS.test(command) || (row.process === "node" && row.port === 9229)) return "devtools";
    if (BROWSERS.test(row.process || "") || BROWSERS.test(command.split(/\s/)[0].split("/").pop() || "")) return "browser";
    return null;
  }

  function hiddenWhy(row) {
    if (hidden.ports.includes(row.port)) return "hidden";
    if (row.process && hidden.processes.includes(row.process)) return `${row.process} hidden`;
    return hiddenByDefault(row);
  }

  function matches(row, terms) {
    if (!terms.length) return true;
    const text = [row.port, row.process, row.command, row.cwd, containerOf(row), labelOf(row), row.protocol, row.url,
      ...(row.addresses || []), ...namesOf(row.port)].filter((v) => v != null).join(" ").toLowerCase();
    return terms.every((term) => text.includes(term));
  }

  function showError(text) {
    const item = el("p", {class: "error"}, el("span", {text}),
      el("button", {type: "button", text: "dismiss", onclick: () => item.remove()}));
    const errors = $("errors");
    errors.append(item);
    while (errors.children.length > 5) errors.firstElementChild.remove();
  }

  // -- rendering ---------------------------------------------------------------------------

  function duration(ms) {
    const s = Math.max(0, Math.floor(ms / 1000));
    if (s < 60) return `${s} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ${String(s % 60).padStart(2, "0")} s`;
    const h = Math.floor(m / 60);
    if (h < 24) return `${h} h ${String(m % 60).padStart(2, "0")} min`;
    return `${Math.floor(h / 24)} d ${h % 24} h`;
  }

  function openFor(row) {
    // `opened` is the server's clock; a browser whose clock is behind must not show less than 0.
    // A port open before the server started opened after its owner did: that start time is
    // a bound a restart does not lose.
    if (row.seenAtStart && row.started) return `≤ ${duration(Date.now() - row.started)}`;
    const text = duration(Date.now() - row.opened);
    return row.seenAtStart ? `≥ ${text}` : text;
  }

  function openForTitle(row) {
    if (!row.seenAtStart) return `since ${new Date(row.opened).toLocaleString()}`;
    const at = `already listening when the server started, at ${new Date(row.opened).toLocaleString()}`;
    return row.started ? `${at}; its process started at ${new Date(row.started).toLocaleString()}` : at;
  }

  // A port Docker publishes is its container's: `container: NAME (IMAGE)`.
  function containerOf(row) {
    const box = row.container;
    return box ? `container: ${box.name}${box.image ? ` (${box.image})` : ""}` : "";
  }

  function labelOf(row) {
    const entry = registry.find((e) => e.port === row.port && e.label);
    return entry ? entry.label : (row.label || null);
  }

  // The ``ready`` message's time, else the ``ready`` of the port's open or update: a page
  // opened (or reconnected) after the port answered gets no ``ready`` message for it.
  function readyMs(row) {
    return row.readyMs != null ? row.readyMs : (row.ready != null ? row.ready : null);
  }

  function readyText(row) {
    // A port that listened before the server started: its time is counted from the server's
    // start, which says nothing of how long the app took. That it answers is what is known.
    if (readyMs(row) != null) return row.seenAtStart ? "answering" : `ready in ${readyMs(row)} ms`;
    if (row.protocol === "tcp") return "";
    return protocolsKnown ? "not answering yet" : "";
  }

  function namesOf(port) {
    return registry.filter((entry) => entry.port === port).map((entry) => entry.key);
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function setAttr(node, name, value) {
    if (value === null) node.removeAttribute(name);
    else if (node.getAttribute(name) !== value) node.setAttribute(name, value);
  }

  // One <tr> per open port, made once and then updated in place: a row keeps its identity
  // (and a button under the pointer stays the same button) while other ports come and go.
  const views = new Map();

  function makeView(port) {
    const act = (fn) => () => ports.has(port) && fn(ports.get(port));
    const view = {
      process: el("span", {class: "process"}),
      label: el("span", {class: "label"}),
      container: el("div", {class: "container"}),
      command: el("div", {class: "command"}),
      cwd: el("div", {class: "cwd"}),
      names: el("div", {class: "key"}),
      pid: el("td", {class: "num", "data-label": "PID"}),
      address: el("td", {class: "address", "data-label": "Address"}),
      badge: el("span"),
      toggle: el("button", {type: "button", class: "toggle", "data-action": "visibility", onclick: act(toggle)}),
      duration: el("td", {class: "duration", "data-label": "Open for"}),
      link: el("a", {target: "_blank", rel: "noopener noreferrer", class: "preview"}),
      protocol: el("span", {class: "protocol"}),
      ready: el("span", {class: "ready"}),
      copy: el("button", {type: "button", class: "copy", "data-action": "copy", text: "copy"}),
      labelButton: el("button", {type: "button", "data-action": "label", text: "label", onclick: act(editLabel)}),
      hidePort: el("button", {type: "button", "data-action": "hide-port", onclick: act((row) => toggleHidden("ports", row.port))}),
      hideProcess: el("button", {type: "button", "data-action": "hide-process",
        onclick: act((row) => row.process && toggleHidden("processes", row.process))}),
      why: el("span", {class: "why"}),
      kill: el("button", {type: "button", class: "kill", "data-action": "kill", onclick: act(kill)}),
    };
    view.copy.addEventListener("click", () => ports.has(port) && copyUrl(ports.get(port), view.copy));
    view.tr = el("tr", {"data-port": String(port)},
      el("td", {class: "num port", "data-label": "Port", text: String(port)}),
      el("td", {class: "who", "data-label": "Process"}, el("div", {}, view.process, view.label), view.container, view.command, view.cwd,
        view.names),
      view.pid, view.address,
      el("td", {"data-label": "Visibility"}, view.badge, view.toggle),
      view.duration,
      el("td", {class: "preview-cell", "data-label": "Preview"}, view.link,
        el("div", {class: "states"}, view.protocol, view.ready, view.copy)),
      el("td", {class: "actions"}, el("div", {class: "action-list"},
        view.why, view.labelButton, view.hidePort, view.hideProcess, view.kill)));
    return view;
  }

  function updateView(view, row, why) {
    setText(view.process, row.process || "—");
    setText(view.label, labelOf(row) || "");
    setText(view.container, containerOf(row));
    setText(view.command, row.command || "");
    setAttr(view.command, "title", row.command || null);
    setText(view.cwd, row.cwd ? `in ${row.cwd}` : "");
    setText(view.names, namesOf(row.port).join(", "));
    setText(view.pid, row.pid == null ? "—" : String(row.pid));
    setText(view.address, (row.addresses || []).join(", ") || "—");
    setAttr(view.badge, "class", `badge ${row.visibility}`);
    setText(view.badge, row.visibility);
    setText(view.toggle, row.visibility === "public" ? "make private" : "make public");
    view.toggle.disabled = Boolean(row.toggling);
    setText(view.duration, openFor(row));
    setAttr(view.duration, "title", openForTitle(row));
    // A private preview needs a grant that only the server can make: /open/ redirects with one.
    setAttr(view.link, "href", row.visibility === "public" ? row.url : `/open/${row.port}`);
    setText(view.link, row.url);
    setAttr(view.protocol, "class", row.protocol ? `protocol badge ${row.protocol}` : "protocol");
    setText(view.protocol, row.protocol || "");
    setAttr(view.ready, "class", readyMs(row) != null ? "ready badge open" : "ready");
    setText(view.ready, readyText(row));
    const byUser = hidden.ports.includes(row.port);
    setText(view.hidePort, byUser ? "unhide" : "hide");
    const processHidden = row.process && hidden.processes.includes(row.process);
    view.hideProcess.hidden = !row.process;
    setText(view.hideProcess, row.process ? `${processHidden ? "unhide" : "hide"} all ${row.process}` : "");
    setText(view.why, why ? `(${why})` : "");
    setAttr(view.tr, "class", why ? "hidden-row" : null);
    setText(view.kill, row.killing ? "killing…" : "kill");
    view.kill.disabled = Boolean(row.killing);
  }

  // Both tables: a registry row says whether its port listens, a port row names its entries.
  function render() {
    renderPorts();
    renderRegistry();
  }

  function renderPorts() {
    const tbody = document.querySelector("#ports tbody");
    for (const [port, view] of views) {
      if (!ports.has(port)) {
        view.tr.remove();
        views.delete(port);
      }
    }
    const terms = $("filter").value.toLowerCase().split(/\s+/).filter(Boolean);
    let hiddenCount = 0;
    const shown = [];
    for (const row of [...ports.values()].sort((a, b) => a.port - b.port)) {
      const why = hiddenWhy(row);
      if (why) hiddenCount += 1;
      if ((why && !showHidden) || !matches(row, terms)) continue;
      shown.push([row, why]);
    }
    const shownPorts = new Set(shown.map(([row]) => row.port));
    for (const [port, view] of views) {
      if (!shownPorts.has(port)) view.tr.remove();
    }
    shown.forEach(([row, why], index) => {
      let view = views.get(row.port);
      if (!view) views.set(row.port, view = makeView(row.port));
      updateView(view, row, why);
      if (tbody.children[index] !== view.tr) tbody.insertBefore(view.tr, tbody.children[index] || null);
    });
    const total = ports.size;
    setText($("port-count"), !total ? "" : shown.length === total ? `(${total})` : `(${shown.length} of ${total})`);
    const button = $("show-hidden");
    button.hidden = hiddenCount === 0;
    setText(button, showHidden ? `hide ${hiddenCount} again` : `show ${hiddenCount} hidden`);
    const none = $("all-filtered");
    none.hidden = !(total && !shown.length);
    setText(none, terms.length ? "No port matches the filter." : "Every open port is hidden.");
  }

  let registryShown = null;  // what the registry table shows now, to leave it be when unchanged

  function renderRegistry() {
    const shown = JSON.stringify([registry, registry.map((entry) => ports.has(entry.port))]);
    if (shown === registryShown) return;
    registryShown = shown;
    const rows = registry.map((entry) => {
      const open = ports.has(entry.port);
      return el("tr", {"data-key": entry.key},
        el("td", {class: "mono", "data-label": "Name", text: entry.key}),
        el("td", {"data-label": "App", text: entry.app || "—"}),
        el("td", {"data-label": "Label", text: entry.label || "—"}),
        el("td", {class: "num", "data-label": "Port", text: String(entry.port)}),
        el("td", {"data-label": "Status"}, el("span", {class: `badge ${open ? "open" : "closed"}`, text: open ? "listening" : "not listening"})),
        el("td", {class: "muted", text: entry.description || ""}));
    });
    document.querySelector("#registry tbody").replaceChildren(...rows);
    setText($("registry-count"), registry.length ? `(${registry.length})` : "");
  }

  setInterval(() => {
    for (const [port, view] of views) {
      const row = ports.get(port);
      if (row) setText(view.duration, openFor(row));
    }
  }, 1000);

  $("filter").addEventListener("input", () => renderPorts());
  $("show-hidden").addEventListener("click", () => { showHidden = !showHidden; renderPorts(); });
  window.addEventListener("storage", (event) => {
    if (event.key === HIDDEN_KEY) { hidden = loadHidden(); render(); }
  });

  setConnection("connecting", "connecting…");
  connect();
})();
