// The live release page: a websocket for events, a windowed log view.
// Lines carry a per-release sequence number: duplicates are dropped, and a
// gap (or a reconnect) is filled from the HTTP log API, so nothing is lost.
(function () {
  "use strict";
  var root = document.getElementById("release");
  if (!root) return;
  var ROW = 18, OVERSCAN = 30;
  var view = document.getElementById("log");
  var spacer = view.querySelector(".log-spacer");
  var rows = view.querySelector(".log-rows");
  var stateLabel = document.getElementById("log-state");
  var controls = {
    step: document.getElementById("log-step"), host: document.getElementById("log-host"),
    stream: document.getElementById("log-stream"), text: document.getElementById("log-filter"),
    follow: document.getElementById("log-follow")
  };
  var state = { lines: [], lastSeq: 0, filtered: [], hosts: {}, socket: null, retry: 500, filling: null, pending: [] };
  window.greenlightLog = state;

  function matches(line) {
    return (!controls.step.value || line.step === controls.step.value) &&
      (!controls.host.value || line.host === controls.host.value) &&
      (!controls.stream.value || line.stream === controls.stream.value) &&
      (!controls.text.value || line.text.indexOf(controls.text.value) !== -1);
  }

  function add(lines) {
    var added = false;
    lines.forEach(function (line) {
      if (line.seq <= state.lastSeq) return;  // seen it
      state.lines.push(line);
      state.lastSeq = line.seq;
      if (line.host && !state.hosts[line.host]) {
        state.hosts[line.host] = true;
        var option = document.createElement("option");
        option.textContent = line.host;
        controls.host.appendChild(option);
      }
      if (matches(line)) state.filtered.push(line);
      added = true;
    });
    if (added) schedule();
  }

  // Lines are added only in order: a line past a gap waits (in `pending`)
  // until the gap is fetched, so the log never skips a number it will not
  // get back.
  function receive(lines) {
    var next = state.lastSeq, ready = [];
    for (var i = 0; i < lines.length; i++) {
      if (lines[i].seq <= next) continue;  // seen it
      if (state.filling || lines[i].seq > next + 1) {  // a gap: fetch what is missing first
        state.pending = state.pending.concat(lines.slice(i));
        break;
      }
      ready.push(lines[i]);
      next = lines[i].seq;
    }
    add(ready);
    if (state.pending.length) backfill();
  }

  function backfill() {
    if (state.filling) return state.filling;
    state.filling = (function page() {
      return fetch(root.dataset.logsUrl + "?after=" + state.lastSeq, { credentials: "same-origin" })
        .then(function (r) {
          if (!r.ok) throw new Error("the log answered " + r.status);
          return r.json();
        })
        .then(function (data) {
          add(data.lines);
          if (data.lines.length) return page();
        });
    })().then(function () {
      state.filling = null;
      var pending = state.pending; state.pending = [];
      receive(pending);  // what came meanwhile; a gap still in it starts another back-fill
    }, function () {
      // the server is away (restarting, say): keep what waits, and ask again soon
      state.filling = null;
      setTimeout(backfill, 1000);
    });
    return state.filling;
  }

  var frame = null;
  function schedule() { if (!frame) frame = requestAnimationFrame(render); }

  function render() {
    frame = null;
    spacer.style.height = (state.filtered.length * ROW) + "px";
    if (controls.follow.checked) view.scrollTop = view.scrollHeight;
    var first = Math.max(0, Math.floor(view.scrollTop / ROW) - OVERSCAN);
    var last = Math.min(state.filtered.length, Math.ceil((view.scrollTop + view.clientHeight) / ROW) + OVERSCAN);
    var html = [];
    for (var i = first; i < last; i++) {
      var l = state.filtered[i];
      html.push('<div class="log-line ' + l.stream + '" data-seq="' + l.seq + '"><span class="seq">' + l.seq +
        '</span><span class="host">' + escape(l.host || "") + '</span><span class="stream">' + l.stream +
        '</span><span class="text">' + escape(l.text) + "</span></div>");
    }
    rows.style.transform = "translateY(" + (first * ROW) + "px)";
    rows.innerHTML = html.join("");
  }

  function escape(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }

  function refilter() {
    state.filtered = state.lines.filter(matches);
    schedule();
  }
  ["step", "host", "stream"].forEach(function (k) { controls[k].addEventListener("change", refilter); });
  controls.text.addEventListener("input", refilter);
  controls.follow.addEventListener("change", schedule);
  view.addEventListener("scroll", function () {
    var atBottom = view.scrollTop + view.clientHeight >= view.scrollHeight - ROW;
    if (controls.follow.checked !== atBottom) controls.follow.checked = atBottom;  // scrolling up stops following
    schedule();
  });

  // Into #panel-slot, which no swap replaces: a refresh asked for while one is
  // on its way waits in htmx's queue (the last one asked for) with the target
  // it was given. Targeting #panel itself, that target was the panel the
  // earlier refresh swapped out of the page, and the later answer (a gate
  // that opened, the release rolled back) went nowhere.
  function refreshPanel() {
    if (window.htmx) {
      htmx.ajax("GET", root.dataset.panelUrl, { target: "#panel-slot", swap: "innerHTML" });
    }
  }
  // the title follows the panel once its new content is in place (htmx.ajax's
  // promise resolves at once for a queued refresh, before its swap)
  document.body.addEventListener("htmx:afterSettle", retitle);

  // the flash messages ("Release #1 started.") said what happened then: once the
  // panel's state moves on, they are stale, and go
  var shownState = (document.getElementById("panel") || { dataset: {} }).dataset.state;
  document.body.addEventListener("htmx:afterSettle", function () {
    var panel = document.getElementById("panel");
    if (!panel || panel.dataset.state === shownState) return;
    shownState = panel.dataset.state;
    document.querySelectorAll("main > .message").forEach(function (m) { m.remove(); });
  });

  function retitle() {
    var panel = document.getElementById("panel");
    var waiting = panel && panel.dataset.waiting !== "0";
    document.title = (waiting ? "(waiting) " : "") + document.title.replace(/^\(waiting\) /, "");
  }

  function connect() {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(scheme + location.host + root.dataset.wsPath);
    state.socket = socket;
    stateLabel.textContent = "connecting…";
    socket.onopen = function () {
      state.retry = 500;
      socket.send(JSON.stringify({ after: state.lastSeq }));
      refreshPanel();  // whatever changed while we were away
    };
    socket.onmessage = function (event) {
      var message = JSON.parse(event.data);
      if (message.type === "log") receive(message.lines);
      else if (message.type === "replayed") stateLabel.textContent = "live";
      else if (message.type === "step" || message.type === "gate" || message.type === "release") {
        refreshPanel();
        if (window.greenlightAnnounce) window.greenlightAnnounce(message, root.dataset.release);
      }
      else if (message.type === "notify" && window.greenlightNotify) window.greenlightNotify(message);
    };
    socket.onclose = function () {
      stateLabel.textContent = "reconnecting…";
      setTimeout(connect, state.retry);
      state.retry = Math.min(state.retry * 2, 5000);
    };
  }
  connect();
})();
