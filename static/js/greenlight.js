// Small things every page needs: local times, and confirmations.
(function () {
  "use strict";
  function localTimes(root) {
    root.querySelectorAll("time[data-local]").forEach(function (el) {
      var when = new Date(el.getAttribute("datetime"));
      if (!isNaN(when)) {
        el.textContent = when.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
        el.title = when.toString();
      }
    });
  }
  document.addEventListener("DOMContentLoaded", function () { localTimes(document); });
  document.addEventListener("htmx:afterSettle", function (event) { localTimes(event.target); });
  window.greenlightLocalTimes = localTimes;

  // a form (or the button that submits it) may ask "are you sure?" first
  document.addEventListener("submit", function (event) {
    var asker = (event.submitter && event.submitter.dataset.confirm) ? event.submitter : event.target;
    var question = asker.dataset ? asker.dataset.confirm : null;
    if (question && !window.confirm(question)) { event.preventDefault(); return; }
    // one click, one request: a second click while the first is on its way does nothing
    if (event.target.dataset.sent) { event.preventDefault(); return; }
    event.target.dataset.sent = "1";
  }, true);
})();
