// Small things every page needs: local times (to the second, with the zone), running durations, confirmations,
// and a refresh of a server-rendered fragment that never overlaps itself.
(function () {
  "use strict";
  function localTimes(root) {
    root.querySelectorAll("time[data-local]").forEach(function (el) {
      var when = new Date(el.getAttribute("datetime"));
      if (!isNaN(when)) {
        // the server wrote it in UTC; the title keeps that for hovering
        if (!el.dataset.utc) el.dataset.utc = el.textContent;
        el.title = el.dataset.utc;
        el.textContent = when.toLocaleString(undefined, {
          year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
          timeZoneName: "short" });
      }
    });
  }
  document.addEventListener("DOMContentLoaded", function () { localTimes(document); });
  document.addEventListener("htmx:afterSettle", function (event) { localTimes(event.target); });
  window.greenlightLocalTimes = localTimes;

  // "how long so far" (<time data-since datetime=...>), as the server's `duration`
  // filter writes it ('1:02', '3h 04m'), kept current in the browser: no request
  function duration(seconds) {
    if (seconds < 3600) return Math.floor(seconds / 60) + ":" + String(seconds % 60).padStart(2, "0");
    return Math.floor(seconds / 3600) + "h " + String(Math.floor(seconds % 3600 / 60)).padStart(2, "0") + "m";
  }
  function tick() {
    var now = Date.now();
    document.querySelectorAll("time[data-since]").forEach(function (el) {
      var since = Date.parse(el.getAttribute("datetime"));
      if (!isNaN(since)) el.textContent = duration(Math.max(0, Math.floor((now - since) / 1000)));
    });
  }
  setInterval(tick, 1000);

  // Refresh the fragment `selector` from `url` (the server answers an htmx
  // request with the fragment alone), on demand, e.g. once per websocket
  // event. A burst of demands costs at most two requests: one in flight,
  // one queued. The target is looked up when its response arrives, never
  // before: an element replaced by the previous refresh is not a target any
  // more (htmx.ajax's own queue keeps the element it was given, and swapped
  // the newer answer into a detached one).
  window.greenlightRefresher = function (url, selector) {
    var busy = false, again = false;
    var counter = { requests: 0 };
    function run() {
      if (busy) { again = true; return; }
      busy = true;
      counter.requests++;
      fetch(url, { credentials: "same-origin", headers: { "HX-Request": "true", "HX-Current-URL": location.href } })
        .then(function (response) {
          var signIn = response.headers.get("HX-Redirect");  // the session ended: sign in, then back here
          if (signIn) { location.assign(signIn); throw new Error("signed out"); }
          if (!response.ok || response.redirected) throw new Error("the refresh answered " + response.status);
          return response.text();
        })
        .then(function (html) {
          var target = document.querySelector(selector);
          if (target && window.htmx) htmx.swap(target, html, { swapStyle: "outerHTML", swapDelay: 0, settleDelay: 0 });
        })
        .catch(function (error) { console.warn(error.message || error); })  // the next event (or reconnect) tries again
        .then(function () {
          busy = false;
          if (again) { again = false; run(); }
        });
    }
    run.counter = counter;
    run.idle = function () { return !busy; };
    return run;
  };

  // A form (or the button that submits it) may ask "are you sure?" first, in the
  // page's own dialog (#confirm-dialog, in base.html): data-confirm says what will
  // happen, data-confirm-title and data-confirm-button name it. Continue submits
  // the form again, with the same button; a live refresh that replaced the form
  // meanwhile is followed to its successor (same action), or the dialog does nothing.
  var dialog = null, asked = null;
  function ask(form, submitter, asker) {
    dialog = dialog || document.getElementById("confirm-dialog");
    if (!dialog || !dialog.showModal) return false;
    document.getElementById("confirm-title").textContent = asker.dataset.confirmTitle || "Are you sure?";
    document.getElementById("confirm-text").textContent = asker.dataset.confirm;
    document.getElementById("confirm-ok").textContent = asker.dataset.confirmButton || "Continue";
    asked = { form: form, submitter: submitter,
              action: submitter && submitter.getAttribute("formaction") || form.getAttribute("action") };
    dialog.returnValue = "";
    dialog.showModal();
    return true;
  }
  document.addEventListener("close", function (event) {
    if (event.target !== dialog || !asked) return;
    var was = asked; asked = null;
    if (dialog.returnValue !== "ok") return;
    var form = was.form, submitter = was.submitter;
    if (!form.isConnected) {  // refreshed meanwhile: the same button of the new panel, if it is still there
      submitter = null; form = null;
      document.querySelectorAll("form").forEach(function (f) {
        if (form) return;
        if (f.getAttribute("action") === was.action) form = f;
        var b = f.querySelector('[formaction="' + was.action + '"]');
        if (b) { form = f; submitter = b; }
      });
      if (!form) return;
    }
    form.dataset.confirmed = "1";
    if (submitter) form.requestSubmit(submitter); else form.requestSubmit();
  }, true);

  document.addEventListener("submit", function (event) {
    if (event.target.method === "dialog") return;
    var asker = (event.submitter && event.submitter.dataset.confirm) ? event.submitter : event.target;
    var question = asker.dataset ? asker.dataset.confirm : null;
    if (question && !event.target.dataset.confirmed) {
      event.preventDefault();
      ask(event.target, event.submitter, asker);
      return;
    }
    delete event.target.dataset.confirmed;
    // one click, one request: a second click while the first is on its way does nothing
    if (event.target.dataset.sent) { event.preventDefault(); return; }
    event.target.dataset.sent = "1";
  }, true);

  // Narrow screens: the navigation folds behind its Menu button (CSS shows the
  // button under 760px, and hides the navigation only once this script runs)
  document.addEventListener("DOMContentLoaded", function () {
    var toggle = document.querySelector(".menu-toggle"), bar = toggle && toggle.closest(".topbar");
    if (!bar) return;
    bar.classList.add("collapsible");
    toggle.addEventListener("click", function () {
      var open = bar.classList.toggle("open");
      toggle.setAttribute("aria-expanded", open ? "true" : "false");
    });
    document.addEventListener("keydown", function (event) {
      if (event.key === "Escape" && bar.classList.contains("open")) {
        bar.classList.remove("open");
        toggle.setAttribute("aria-expanded", "false");
        toggle.focus();
      }
    });
  });

  // A live update said to screen readers (#announcer, aria-live=polite, in base.html):
  // "verify_directly waits for approval", "release #12 succeeded". `release` is
  // the number the page is about, or null on the dashboard (then every release is named).
  var GATE_WORDS = { awaiting_approval: "waits for approval", succeeded: "approved", failed: "rejected", cancelled: "cancelled" };
  function announcement(message, release) {
    var words;
    if (message.type === "release") {
      if (message.status === "awaiting_approval") return null;  // its gate says which
      return "release #" + message.id + " " + String(message.status).replace(/_/g, " ");
    }
    if (message.type === "gate") {
      words = GATE_WORDS[message.status];
      if (!words) return null;
      return (release ? "" : "release #" + message.release + ": ") + message.key + " " + words;
    }
    if (message.type === "step" && message.status === "failed") {
      return (release ? "" : "release #" + message.release + ": ") + "step " + message.key + " failed";
    }
    return null;
  }
  var said = null, saidAt = 0;
  window.greenlightAnnounce = function (message, release) {
    var region = document.getElementById("announcer"), text = announcement(message, release);
    // the same news twice in a row within seconds (an event and its echo) is said once; a gate open again after a retry is news
    if (!region || !text || (text === said && Date.now() - saidAt < 5000)) return;
    said = text; saidAt = Date.now();
    // replace the text (aria-atomic): a reader says the newest news, not a growing list
    region.textContent = text;
  };
})();
