// "A gate waits for you": the page's feed sends {"type": "notify", ...} to a
// person who may decide a gate that just opened. It shows in the page (a
// notice in a live region, so it works without permission) and, if they
// allowed it, as a system notification; clicking that focuses the release.
// The page offers to turn notifications on once, and remembers the answer.
(function () {
  "use strict";
  var KEY = "greenlight.notifications";  // the answer to our one offer: granted, denied, default (closed), later
  var supported = "Notification" in window;

  function remembered() {
    try { return window.localStorage.getItem(KEY); } catch (e) { return "unavailable"; }
  }
  function remember(answer) {
    try { window.localStorage.setItem(KEY, answer); } catch (e) { /* private mode: the offer may come back */ }
  }

  function offer() {
    var box = document.getElementById("notify-offer");
    if (!box) return;  // only for people who decide gates
    if (!supported || Notification.permission !== "default" || remembered()) return;  // asked before: never nag
    box.hidden = false;
    document.getElementById("notify-on").addEventListener("click", function () {
      box.hidden = true;
      var asked = Notification.requestPermission(function (answer) { remember(answer || "default"); });
      if (asked && asked.then) asked.then(function (answer) { remember(answer || "default"); });
    });
    document.getElementById("notify-later").addEventListener("click", function () {
      box.hidden = true;
      remember("later");
    });
  }
  document.addEventListener("DOMContentLoaded", offer);

  function inPage(notice) {
    var region = document.getElementById("notices");
    if (!region) return;
    var tag = String(notice.tag || "");
    var seen = Array.prototype.some.call(region.children, function (el) { return el.dataset.tag === tag; });
    if (tag && seen) return;
    var item = document.createElement("div");
    item.className = "notice";
    item.dataset.tag = tag;
    var link = document.createElement("a");
    link.href = notice.url;
    link.textContent = notice.title;
    var body = document.createElement("span");
    body.textContent = notice.body || "";
    var close = document.createElement("button");
    close.type = "button";
    close.className = "dismiss";
    close.setAttribute("aria-label", "Dismiss");
    close.textContent = "×";
    close.addEventListener("click", function () { item.remove(); });
    item.append(link, close, body);
    region.appendChild(item);
  }

  function system(notice) {
    if (!supported || Notification.permission !== "granted") return;
    try {
      var shown = new Notification(notice.title, { body: notice.body || "", tag: notice.tag || "" });
      shown.onclick = function (event) {
        if (event && event.preventDefault) event.preventDefault();
        window.focus();
        if (location.pathname !== notice.url) location.assign(notice.url);
        shown.close();
      };
    } catch (e) {
      // a browser that shows them only from a service worker: the notice in the page stands
    }
  }

  window.greenlightNotify = function (notice) {
    inPage(notice);
    system(notice);
  };
})();
