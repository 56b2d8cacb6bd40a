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
  var note = document.getElementById("log-note");
  var state = { lines: [], lastSeq: 0, filtered: [], hosts: {}, socket: null, retry: 500, filling: null, pending: [],
    target: null, jump: false, expanded: {}, extra: {} };
  window.greenlightLog = state;

  // The view is shareable: the filters live in the query string (step, host,
  // stream, q) and the linked line in the hash (#L1234). The URL follows the
  // controls with replaceState: changing a filter adds no history entry.
  var FILTERS = { step: "step", host: "host", stream: "stream", q: "text" };
  function addHost(host) {
    if (!host || state.hosts[host]) return;
    state.hosts[host] = true;
    var option = document.createElement("option");
    option.textContent = host;
    controls.host.appendChild(option);
  }
  function readUrl() {
    var params = new URLSearchParams(location.search);
    Object.keys(FILTERS).forEach(function (name) {
      var value = params.get(name);
      if (value === null) return;
      if (name === "host") addHost(value);  // its lines are on their way
      controls[FILTERS[name]].value = value;
    });
    readHash();
  }
  function readHash() {
    var m = /^#L(\d+)$/.exec(location.hash);
    if (!m) return;
    state.target = parseInt(m[1], 10);
    state.jump = true;  // once the line is here (it may still be on its way), scroll to it
    controls.follow.checked = false;
  }
  function writeUrl() {
    var params = new URLSearchParams(location.search);
    Object.keys(FILTERS).forEach(function (name) {
      var value = controls[FILTERS[name]].value;
      if (value) params.set(name, value); else params.delete(name);
    });
    var query = params.toString();
    history.replaceState(history.state, "", location.pathname + (query ? "?" + query : "") +
      (state.target ? "#L" + state.target : ""));
  }

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
      addHost(line.host);
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

  // Rows are ROW tall, but for the lines expanded in place: `state.extra`
  // holds how much taller each of those is (measured once it is drawn), so
  // the offsets of the rows after it shift by that much. They are few.
  function indexOf(seq) {  // in state.filtered (in seq order); -1 if absent
    var lo = 0, hi = state.filtered.length - 1;
    while (lo <= hi) {
      var mid = (lo + hi) >> 1, s = state.filtered[mid].seq;
      if (s === seq) return mid;
      if (s < seq) lo = mid + 1; else hi = mid - 1;
    }
    return -1;
  }
  function expandedRows() {
    var list = [];
    Object.keys(state.expanded).forEach(function (seq) {
      var i = indexOf(+seq);
      if (i !== -1) list.push({ i: i, extra: state.extra[seq] || 0 });
    });
    return list.sort(function (a, b) { return a.i - b.i; });
  }
  function offsetOf(i, tall) {
    var y = i * ROW;
    for (var k = 0; k < tall.length && tall[k].i < i; k++) y += tall[k].extra;
    return y;
  }
  function indexAt(y, tall) {
    var more = 0;
    for (var k = 0; k < tall.length; k++) {
      var top = tall[k].i * ROW + more;
      if (y < top) break;
      if (y < top + ROW + tall[k].extra) return tall[k].i;
      more += tall[k].extra;
    }
    return Math.floor((y - more) / ROW);
  }

  var timeFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  function stamp(line) {  // to the second, in the viewer's zone; UTC on hover
    if (line.local === undefined) {
      var at = new Date(line.at);
      line.local = isNaN(at) ? "" : timeFormat.format(at);
      line.utc = isNaN(at) ? "" : at.toISOString().slice(0, 19).replace("T", " ") + " UTC";
    }
  }

  function render() {
    frame = null;
    var tall = expandedRows();
    var total = state.filtered.length * ROW;
    tall.forEach(function (t) { total += t.extra; });
    spacer.style.height = total + "px";
    if (state.jump && state.target) {
      var at = indexOf(state.target);
      if (at !== -1) {
        state.jump = false;
        controls.follow.checked = false;
        note.textContent = "";
        view.scrollTop = Math.max(0, offsetOf(at, tall) - (view.clientHeight - ROW) / 2);
      } else if (state.lastSeq >= state.target) {  // here (lines come in order, without gaps), but filtered out
        state.jump = false;
        note.textContent = "line " + state.target + " is hidden by the filters";
      } else if (stateLabel.textContent === "live") {
        note.textContent = "line " + state.target + " is not in the log yet";  // it may come: the jump waits
      }
    }
    if (controls.follow.checked) view.scrollTop = view.scrollHeight;
    var first = Math.max(0, indexAt(view.scrollTop, tall) - OVERSCAN);
    var last = Math.min(state.filtered.length, indexAt(view.scrollTop + view.clientHeight, tall) + 1 + OVERSCAN);
    var focused = document.activeElement, keep = null;
    if (focused && rows.contains(focused)) {
      keep = { seq: focused.closest(".log-line").dataset.seq, part: focused.classList.contains("seq") ? ".seq" : ".text" };
    }
    var html = [];
    for (var i = first; i < last; i++) {
      var l = state.filtered[i];
      stamp(l);
      var open = state.expanded[l.seq];
      html.push('<div class="log-line ' + l.stream + (open ? " long expanded" : "") + (l.seq === state.target ? " target" : "") +
        '" data-seq="' + l.seq + '"><a class="seq" href="#L' + l.seq + '">' + l.seq +
        '</a><time class="at" datetime="' + escape(l.at || "") + '" title="' + l.utc + '">' + l.local +
        '</time><span class="host">' + escape(l.host || "") + '</span><span class="stream">' + l.stream +
        '</span><span class="text"' + (open ? ' tabindex="0" role="button" aria-expanded="true"' : "") + ">" +
        escape(l.text) + "</span></div>");
    }
    rows.style.transform = "translateY(" + offsetOf(first, tall) + "px)";
    rows.innerHTML = html.join("");
    // a line cut by the view's edge (its ellipsis) expands on a click or Enter;
    // an expanded one's height is measured, and the rows after it move down
    var moved = false;
    rows.querySelectorAll(".log-line").forEach(function (row) {
      var seq = row.dataset.seq;
      if (state.expanded[seq]) {
        var extra = Math.max(0, row.offsetHeight - ROW);
        if (extra !== (state.extra[seq] || 0)) { state.extra[seq] = extra; moved = true; }
        return;
      }
      var text = row.lastChild;
      if (text.scrollWidth > text.clientWidth) {
        row.classList.add("long");
        text.tabIndex = 0;
        text.setAttribute("role", "button");
        text.setAttribute("aria-expanded", "false");
        text.title = "show the whole line";
      }
    });
    if (keep) {
      var again = rows.querySelector('.log-line[data-seq="' + keep.seq + '"] ' + keep.part);
      if (again) again.focus({ preventScroll: true });
    }
    if (moved) schedule();
  }

  function escape(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  }

  function toggle(row) {
    var seq = row.dataset.seq;
    if (state.expanded[seq]) { delete state.expanded[seq]; delete state.extra[seq]; }
    else if (row.classList.contains("long")) { state.expanded[seq] = true; controls.follow.checked = false; }
    else return;
    schedule();
  }
  function target(seq) {  // a line number clicked: the line's link is in the URL
    state.target = seq;
    state.jump = false;
    note.textContent = "";
    writeUrl();
    schedule();
  }
  rows.addEventListener("click", function (event) {
    var link = event.target.closest(".seq");
    if (link) {
      event.preventDefault();  // no history entry, no jump to a missing anchor
      target(parseInt(link.closest(".log-line").dataset.seq, 10));
      return;
    }
    if (event.target.closest(".text") && !(window.getSelection && String(window.getSelection()))) {
      toggle(event.target.closest(".log-line"));
    }
  });
  rows.addEventListener("keydown", function (event) {
    if ((event.key === "Enter" || event.key === " ") && event.target.classList.contains("text")) {
      event.preventDefault();
      toggle(event.target.closest(".log-line"));
    }
  });
  window.addEventListener("hashchange", function () { readHash(); schedule(); });

  function refilter() {
    state.filtered = state.lines.filter(matches);
    if (state.target && note.textContent) state.jump = true;  // the linked line was not shown: it may be now
    writeUrl();
    schedule();
  }
  readUrl();
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
      else if (message.type === "replayed") { stateLabel.textContent = "live"; schedule(); }
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
