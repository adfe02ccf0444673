// The ports dashboard: one WebSocket (authenticated by the HttpOnly cookie this page cannot
// read), the `ports` channel's snapshot and events, `kill`, `visibility`, and the port
// registry from the `config` channel. Everything shown is set as text, never as HTML.
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
      if (message.type === "open") {
        table.set(message.port, {...message});
      } else if (message.type === "update") {
        // The port's whole state again (a new owner, another address): replace the server's
        // fields, keep ours (a kill or a toggle in flight).
        table.set(message.port, {...table.get(message.port), ...message});
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
    if (!snapshot) render();
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
    const text = duration(Date.now() - row.opened);
    return row.seenAtStart ? `≥ ${text}` : text;
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
    const view = {
      process: el("span"),
      names: el("div", {class: "key"}),
      pid: el("td", {class: "num"}),
      address: el("td", {class: "address"}),
      badge: el("span"),
      toggle: el("button", {type: "button", class: "toggle", "data-action": "visibility",
        onclick: () => ports.has(port) && toggle(ports.get(port))}),
      duration: el("td", {class: "duration"}),
      link: el("a", {target: "_blank", rel: "noopener noreferrer", class: "preview"}),
      kill: el("button", {type: "button", class: "kill", "data-action": "kill",
        onclick: () => ports.has(port) && kill(ports.get(port))}),
    };
    view.tr = el("tr", {"data-port": String(port)},
      el("td", {class: "num port", text: String(port)}),
      el("td", {}, view.process, view.names),
      view.pid, view.address,
      el("td", {}, view.badge, view.toggle),
      view.duration,
      el("td", {}, view.link),
      el("td", {class: "actions"}, view.kill));
    return view;
  }

  function updateView(view, row) {
    setText(view.process, row.process || "—");
    setText(view.names, namesOf(row.port).join(", "));
    setText(view.pid, row.pid == null ? "—" : String(row.pid));
    setText(view.address, (row.addresses || []).join(", ") || "—");
    setAttr(view.badge, "class", `badge ${row.visibility}`);
    setText(view.badge, row.visibility);
    setText(view.toggle, row.visibility === "public" ? "make private" : "make public");
    view.toggle.disabled = Boolean(row.toggling);
    setText(view.duration, openFor(row));
    setAttr(view.duration, "title", (row.seenAtStart ? "already listening when the server started, at " : "since ") +
      new Date(row.opened).toLocaleString());
    // A private preview needs a grant that only the server can make: /open/ redirects with one.
    setAttr(view.link, "href", row.visibility === "public" ? row.url : `/open/${row.port}`);
    setText(view.link, row.url);
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
    const sorted = [...ports.values()].sort((a, b) => a.port - b.port);
    sorted.forEach((row, index) => {
      let view = views.get(row.port);
      if (!view) views.set(row.port, view = makeView(row.port));
      updateView(view, row);
      if (tbody.children[index] !== view.tr) tbody.insertBefore(view.tr, tbody.children[index] || null);
    });
    setText($("port-count"), ports.size ? `(${ports.size})` : "");
  }

  let registryShown = null;  // what the registry table shows now, to leave it be when unchanged

  function renderRegistry() {
    const shown = JSON.stringify([registry, registry.map((entry) => ports.has(entry.port))]);
    if (shown === registryShown) return;
    registryShown = shown;
    const rows = registry.map((entry) => {
      const open = ports.has(entry.port);
      return el("tr", {"data-key": entry.key},
        el("td", {class: "mono", text: entry.key}),
        el("td", {text: entry.app || "—"}),
        el("td", {text: entry.label || "—"}),
        el("td", {class: "num", text: String(entry.port)}),
        el("td", {}, el("span", {class: `badge ${open ? "open" : "closed"}`, text: open ? "listening" : "not listening"})),
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

  setConnection("connecting", "connecting…");
  connect();
})();
