// The live dashboard: a websocket brings every release's status changes, and
// each one refreshes the fragment over HTTP (greenlightRefresher coalesces a
// burst). No polling: when the socket drops it reconnects with backoff, and
// refreshes once on (re)connecting for what it missed meanwhile.
(function () {
  "use strict";
  var root = document.getElementById("live-dashboard");
  if (!root) return;
  var label = document.getElementById("dashboard-state");
  var refresh = window.greenlightRefresher(root.dataset.refreshUrl, "#dashboard");
  var state = { socket: null, retry: 500, refresh: refresh };
  window.greenlightDashboard = state;

  function connect() {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(scheme + location.host + root.dataset.wsPath);
    state.socket = socket;
    socket.onopen = function () {
      state.retry = 500;
      label.textContent = "live";
      refresh();
    };
    socket.onmessage = function (event) {
      var message = JSON.parse(event.data);
      if (message.type === "notify") { if (window.greenlightNotify) window.greenlightNotify(message); }
      else if (message.type === "release" || message.type === "step" || message.type === "gate") {
        refresh();
        if (window.greenlightAnnounce) window.greenlightAnnounce(message, null);
      }
    };
    socket.onclose = function () {
      label.textContent = "reconnecting…";
      setTimeout(connect, state.retry * (0.5 + Math.random() / 2));  // jitter: not every tab at once after a restart
      state.retry = Math.min(state.retry * 2, 30000);
    };
  }
  connect();
})();
